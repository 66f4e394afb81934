"""flexkern: Mixture-of-Experts kernels for PyTorch and the FlexOlmo method on top.

The public names load on first access (PEP 562), so ``import flexkern`` alone imports no torch
and the ``flexkern`` command's ``--help`` stays instant. Importing ``flexkern.ops`` (which the
layer and every op do) loads the optional fast backends.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "FlexMoE": "flexkern.nn",
    "Dispatch": "flexkern.ops",
    "dispatch": "flexkern.ops",
    "experts_swiglu": "flexkern.ops",
    "route": "flexkern.ops",
    "explain": "flexkern.ops.backend",
    "Z_LOSS_WEIGHT": "flexkern.nn",
}
_SUBMODULES = ("ops", "nn")

__all__ = ["FlexMoE", "Dispatch", "dispatch", "experts_swiglu", "explain", "route", "ops",
           "Z_LOSS_WEIGHT", "__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later accesses skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
