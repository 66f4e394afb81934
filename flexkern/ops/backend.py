"""Backend selection: which implementation runs an op.

Backends: "reference" (plain PyTorch, any device: the CPU path and the test oracle), "triton"
(flexkern/triton, CUDA tensors, or the CPU through TRITON_INTERPRET=1) and "cuda" (flexkern._C).
Choice order: the op's ``backend=`` argument, then the FLEXKERN_BACKEND environment variable,
then "auto" (the fastest registered backend that supports the device).

Backends register their functions with ``register(op, backend, fn)`` when their module is
imported; an op asks ``lookup(op, backend, device)`` for the function to call.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

BACKENDS = ("reference", "triton", "cuda")
_ENV = "FLEXKERN_BACKEND"

# op name -> backend name -> implementation. Filled once at import time by each backend module.
_REGISTRY: dict[str, dict[str, Callable]] = {}
# Which backend "auto" tries first, per op, on CUDA tensors.
_AUTO_ORDER = {"route": ("cuda", "triton"), "dispatch": ("cuda", "triton")}
_DEFAULT_AUTO_ORDER = ("triton", "cuda")


def register(op: str, backend: str, fn: Callable) -> Callable:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = fn
    return fn


def available(op: str) -> tuple[str, ...]:
    """Backends registered for ``op`` (reference is always among them)."""
    return tuple(_REGISTRY.get(op, {}))


def requested(backend: str | None) -> str:
    """The backend name the caller asked for: the argument, else the environment, else "auto"."""
    name = backend or os.environ.get(_ENV) or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return name


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def lookup(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    """Resolve ``backend`` ("auto" or a name) for ``op`` on ``device`` to (name, function)."""
    impls = _REGISTRY.get(op, {})
    if backend == "auto":
        if device.type == "cuda":
            for name in _AUTO_ORDER.get(op, _DEFAULT_AUTO_ORDER):
                if name in impls:
                    return name, impls[name]
        return "reference", impls["reference"]
    if backend not in impls:
        raise RuntimeError(
            f"backend {backend!r} is not available for {op}; available: {sorted(impls)}"
            + (" (the CUDA extension flexkern._C is not built)" if backend == "cuda" else "")
        )
    if backend != "reference" and device.type != "cuda":
        if not (backend == "triton" and _interpreting()):
            raise RuntimeError(
                f"backend {backend!r} needs CUDA tensors (got {device.type}); "
                "on the CPU use 'reference', or 'triton' with TRITON_INTERPRET=1"
            )
    return backend, impls[backend]
