"""Expert packages: exactly what one data owner contributes, and nothing of its data.

A package is a folder ``NAME.flexpert/`` with
    expert.safetensors   per layer i (F ffn width, D d_model):
                             layers.{i}.gate_proj (F, D)   layers.{i}.up_proj (F, D)
                             layers.{i}.down_proj (D, F)   layers.{i}.router_row (D,)
                             layers.{i}.router_bias ()     (applied as min(b, 0))
    manifest.json        format, format_version, name, source, tokens_seen, steps, config (the
                         anchor's dense ModelConfig), anchor_fingerprint, public_row_sha256 (the
                         frozen public router row the owner trained against), embed_method,
                         tensors: {name: {sha256, shape, dtype}}
The folder is written atomically and every tensor is checked against its sha256 on load.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import atomic_dir, atomic_path, read_json, write_json
from .model import ModelConfig, tensor_sha256

FORMAT, FORMAT_VERSION = "flexkern-expert", 1
SUFFIX = ".flexpert"
TENSOR_FILE, MANIFEST_FILE = "expert.safetensors", "manifest.json"
PARTS = ("gate_proj", "up_proj", "down_proj", "router_row", "router_bias")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PackageError(ValueError):
    """An expert package is missing, corrupt, or does not fit."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == "public":
        raise PackageError(f"invalid expert name {name!r}: use letters, digits, '_', '-', '.' "
                           "(at most 64 characters, not 'public')")
    return name


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    D, Fw = config.d_model, config.d_ff
    shapes = {"gate_proj": (Fw, D), "up_proj": (Fw, D), "down_proj": (D, Fw), "router_row": (D,), "router_bias": ()}
    return {f"layers.{i}.{p}": shapes[p] for i in range(config.n_layers) for p in PARTS}


def _check_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, where: str) -> None:
    want = expected_shapes(config)
    if set(tensors) != set(want):
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        raise PackageError(f"{where}: tensors do not match the model config "
                           f"(missing {missing[:4]}, unexpected {extra[:4]})")
    for k, t in tensors.items():
        if tuple(t.shape) != want[k]:
            raise PackageError(f"{where}: tensor {k!r} has shape {tuple(t.shape)}, expected {want[k]}")


def save_package(path, tensors: dict[str, torch.Tensor], manifest: dict) -> Path:
    """Write a package folder atomically. ``manifest`` needs name and config (a dict); the tensor
    table and format fields are filled in here. Returns the package path."""
    path = Path(path)
    manifest = copy.deepcopy(manifest)
    for key in ("name", "config", "anchor_fingerprint"):
        if key not in manifest:
            raise PackageError(f"package manifest needs {key!r}")
    check_name(manifest["name"])
    config = ModelConfig.from_dict(manifest["config"])
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _check_tensors(cpu, config, str(path))
    manifest.update(format=FORMAT, format_version=FORMAT_VERSION, tensors={
        k: {"sha256": tensor_sha256(t), "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for k, t in sorted(cpu.items())
    })
    with atomic_dir(path) as tmp:
        with atomic_path(tmp / TENSOR_FILE) as f:
            save_file(cpu, str(f))
        write_json(tmp / MANIFEST_FILE, manifest)
    return path


def load_package(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a package: (tensors, manifest). Raises PackageError on any mismatch."""
    path = Path(path)
    if not path.is_dir():
        raise PackageError(f"expert package {path} does not exist (expected a folder NAME{SUFFIX})")
    try:
        manifest = read_json(path / MANIFEST_FILE)
    except ValueError as exc:
        raise PackageError(str(exc)) from None
    if manifest.get("format") != FORMAT:
        raise PackageError(f"{path}: not an expert package (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{path}: package format version {manifest.get('format_version')!r} is not "
                           f"supported (this flexkern reads version {FORMAT_VERSION})")
    try:
        check_name(manifest.get("name"))
        config = ModelConfig.from_dict(manifest.get("config") or {})
    except (TypeError, ValueError) as exc:
        raise PackageError(f"{path}: bad manifest: {exc}") from None
    if not (path / TENSOR_FILE).is_file():
        raise PackageError(f"{path}: missing {TENSOR_FILE}")
    try:
        with safe_open(str(path / TENSOR_FILE), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise PackageError(f"{path}: cannot read {TENSOR_FILE}: {exc}") from None
    _check_tensors(tensors, config, str(path))
    table = manifest.get("tensors") or {}
    if set(table) != set(tensors):
        raise PackageError(f"{path}: manifest lists other tensors than {TENSOR_FILE} holds")
    for k, t in tensors.items():
        if tensor_sha256(t) != table[k].get("sha256"):
            raise PackageError(f"{path}: tensor {k!r} does not match its sha256 in the manifest "
                               "(the package was modified or corrupted)")
    return tensors, manifest


def package_path(out_path, name: str) -> Path:
    """``out_path`` itself when it ends in .flexpert, else ``out_path/NAME.flexpert``."""
    out_path = Path(out_path)
    return out_path if out_path.name.endswith(SUFFIX) else out_path / f"{name}{SUFFIX}"
