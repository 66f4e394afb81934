"""Build of the optional CUDA extension flexkern._C (everything else is in pyproject.toml).

FLEXKERN_BUILD_CUDA selects it:
  auto (default)  build with CMake + ninja when nvcc, cmake and pybind11 are found; a missing tool
                  or a failed build leaves the package without the extension (it still works)
  1 / on          build it; a missing tool or a failed build is an error
  0 / off         never build it
The module is written into the flexkern/ package directory (also for editable installs).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
_SWITCH = "FLEXKERN_BUILD_CUDA"


def _build_mode() -> str:
    value = os.environ.get(_SWITCH, "auto").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "on", "true", "yes"):
        return "on"
    if value in ("0", "off", "false", "no"):
        return "off"
    raise ValueError(f"{_SWITCH} must be auto, 1 or 0, got {value!r}")


def _find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    candidates.append(shutil.which("nvcc"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _find_tool(name: str) -> str | None:
    """A tool on PATH, else the one installed next to this Python (pip's cmake / ninja)."""
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if found:
        return found
    try:  # the cmake and ninja wheels expose their binary directory
        module = __import__(name)
        folder = getattr(module, "CMAKE_BIN_DIR", None) or getattr(module, "BIN_DIR", None)
        return shutil.which(name, path=folder) if folder else None
    except ImportError:
        return None


def _pybind11_cmake_dir() -> str | None:
    try:
        out = subprocess.run([sys.executable, "-m", "pybind11", "--cmakedir"], check=True,
                             capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _missing_tools() -> tuple[dict[str, str], list[str]]:
    tools = {"nvcc": _find_nvcc(), "cmake": _find_tool("cmake"), "ninja": _find_tool("ninja"),
             "pybind11": _pybind11_cmake_dir()}
    return {k: v for k, v in tools.items() if v}, [k for k, v in tools.items() if not v]


class CMakeExtension(Extension):
    """An extension whose build is delegated to CMakeLists.txt."""

    def __init__(self, name: str, optional: bool):
        super().__init__(name, sources=[], optional=optional)


class BuildCMake(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        tools, missing = _missing_tools()
        if missing:
            raise CompileError(f"cannot build {ext.name}: {', '.join(missing)} not found")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            tools["cmake"], "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={tools['ninja']}",
            f"-DCMAKE_CUDA_COMPILER={tools['nvcc']}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={tools['pybind11']}",
            f"-DFLEXKERN_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        try:
            subprocess.run(configure, check=True)
            subprocess.run([tools["cmake"], "--build", str(build_dir)], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise CompileError(f"building {ext.name} with CMake failed: {exc}") from exc


def _ext_modules() -> list[Extension]:
    mode = _build_mode()
    if mode == "off":
        return []
    if mode == "auto" and _find_nvcc() is None:
        print(f"flexkern: nvcc not found, building without the CUDA extension ({_SWITCH}=auto)")
        return []
    # optional=True: in auto mode a failed build is reported and skipped, not fatal
    return [CMakeExtension("flexkern._C", optional=(mode == "auto"))]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": BuildCMake})
