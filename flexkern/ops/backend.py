"""Backend selection: the one place that decides which implementation runs an op.

Backends: "reference" (plain PyTorch, any device: the CPU path and the test oracle), "triton"
(flexkern/triton: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) and "cuda" (flexkern._C:
CUDA tensors). Each backend registers, per op, its function and what it supports::

    register(op, backend, fn, *, supports=None)

``supports(*args, **kwargs)`` receives exactly the arguments ``fn`` would receive and returns
None when it can run them, else a short reason. No ``supports`` means it runs anything on the
devices its kind allows (reference: any; triton: CUDA, or the CPU under TRITON_INTERPRET=1;
cuda: CUDA). Backends never call another backend (or the reference) themselves.

Which backend runs (``lookup(op, preferred, *args, **kwargs) -> (name, fn)``):

1. ``preferred``: the op's ``backend=`` argument, else the FLEXKERN_BACKEND environment variable,
   else "auto". A named backend is a preference: it runs when it implements the op, its kind
   allows the device and its ``supports`` accepts the inputs. (So ``backend="triton"`` means
   "triton for every op triton implements"; route and dispatch then take the next step.)
2. The automatic order, on CUDA tensors only: route and dispatch try cuda then triton; every
   other op triton then cuda. On the CPU there is no automatic fast backend: the interpreter runs
   only when triton is asked for.
3. reference, always last (it supports everything).

A named backend that implements the op but declines these inputs warns once per reason
(``explain`` and the DEBUG log of the ``flexkern.backend`` logger say why for every call).
``flexkern.explain(op, *args, backend=None, **kwargs)`` takes the public op's arguments (for
route, dispatch and experts_swiglu) and returns the decision with every skipped backend's reason.

The old form ``lookup(op, backend, device)`` (a torch.device as the only argument) still works:
it decides on the device alone, without asking ``supports``.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("reference", "triton", "cuda")
_ENV = "FLEXKERN_BACKEND"
log = logging.getLogger("flexkern.backend")

# op name -> backend name -> implementation / supports predicate. Filled at import time.
_REGISTRY: dict[str, dict[str, Callable]] = {}
_SUPPORTS: dict[str, dict[str, Callable | None]] = {}
# op name -> function turning the public op's arguments into the backends' (args, kwargs).
_ARGUMENTS: dict[str, Callable] = {}
# The automatic order on CUDA tensors, before the reference.
_AUTO_ORDER = {"route": ("cuda", "triton"), "dispatch": ("cuda", "triton")}
_DEFAULT_AUTO_ORDER = ("triton", "cuda")


def register(op: str, backend: str, fn: Callable, *, supports: Callable | None = None) -> Callable:
    """Register ``fn`` as ``backend``'s implementation of ``op`` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if supports is not None and not callable(supports):
        raise TypeError("supports must be callable (returning None or a reason string)")
    _REGISTRY.setdefault(op, {})[backend] = fn
    _SUPPORTS.setdefault(op, {})[backend] = supports
    return fn


def register_arguments(op: str, prepare: Callable) -> None:
    """How ``explain`` maps the public op's arguments to the backends': ``prepare(*a, **kw)``
    checks them like the op does and returns (args, kwargs) as the backend functions get them."""
    _ARGUMENTS[op] = prepare


def available(op: str) -> tuple[str, ...]:
    """Backends registered for ``op`` (reference is always among them)."""
    return tuple(_REGISTRY.get(op, {}))


def requested(backend: str | None) -> str:
    """The backend name the caller asked for: the argument, else the environment, else "auto"."""
    name = backend or os.environ.get(_ENV) or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return name


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (TRITON_INTERPRET=1, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_interpreting = interpreting  # old private name


def _device_of(args, kwargs) -> torch.device:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, torch.device):
            return a
    return torch.device("cpu")


def _kind_allows(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device`` at all, else why not."""
    if backend == "reference" or device.type == "cuda":
        return None
    if backend == "triton":
        return None if device.type == "cpu" and interpreting() else (
            f"triton needs CUDA tensors (got {device.type}); on the CPU set TRITON_INTERPRET=1")
    return f"{backend} needs CUDA tensors (got {device.type})"


@dataclass(frozen=True)
class Decision:
    """What ``explain`` returns: the backend that runs and why each one before it did not."""

    op: str
    backend: str
    preferred: str
    skipped: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        why = "".join(f"; {b} skipped: {r}" for b, r in self.skipped)
        return f"{self.op}: {self.backend} (asked for {self.preferred}){why}"


def _candidates(op: str, preferred: str, device: torch.device) -> list[str]:
    order = [preferred] if preferred != "auto" else []
    if device.type == "cuda":
        order += _AUTO_ORDER.get(op, _DEFAULT_AUTO_ORDER)
    order.append("reference")
    seen: list[str] = []
    for b in order:
        if b not in seen:
            seen.append(b)
    return seen


def _decide(op: str, preferred: str | None, args: tuple, kwargs: dict, check_inputs: bool):
    impls = _REGISTRY.get(op)
    if not impls:
        raise ValueError(f"unknown op {op!r}; registered: {sorted(_REGISTRY)}")
    preferred = requested(preferred)
    device = _device_of(args, kwargs)
    skipped: list[tuple[str, str]] = []
    for name in _candidates(op, preferred, device):
        if name not in impls:
            if name == preferred:  # auto-order entries that lack the op are not worth a line
                skipped.append((name, f"{name} does not implement {op}"))
            continue
        reason = _kind_allows(name, device)
        if reason is None and check_inputs:
            pred = _SUPPORTS[op].get(name)
            reason = pred(*args, **kwargs) if pred is not None else None
        if reason is None:
            return name, impls[name], tuple(skipped), preferred
        skipped.append((name, reason))
    raise RuntimeError(f"no backend runs {op} on these inputs: {skipped}")  # reference missing


def lookup(op: str, preferred: str | None, *args, **kwargs) -> tuple[str, Callable]:
    """(name, function) of the backend that runs ``op`` on these arguments (the order is in the
    module docstring). ``args``/``kwargs`` are what the backend function will receive."""
    old_style = len(args) == 1 and not kwargs and isinstance(args[0], torch.device)
    name, fn, skipped, preferred = _decide(op, preferred, args, kwargs, check_inputs=not old_style)
    if skipped and skipped[0][0] == preferred and preferred in _REGISTRY[op]:
        # An implementation that was asked for and declined: say so once per reason.
        warnings.warn(f"flexkern: {op} runs on {name}, not the requested {preferred}: "
                      f"{skipped[0][1]}", stacklevel=2)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s", Decision(op, name, preferred, skipped))
    return name, fn


def explain(op: str, *args, backend: str | None = None, **kwargs) -> Decision:
    """Which backend would run ``op`` on these arguments and why (see the module docstring).

    For route, dispatch and experts_swiglu the arguments are the public function's (checked like
    the function checks them); for other ops, the arguments the backend functions receive.
    ``str(decision)`` is one line; ``decision.backend`` the name."""
    if op in _ARGUMENTS:
        args, kwargs = _ARGUMENTS[op](*args, **kwargs)
    name, _, skipped, preferred = _decide(op, backend, tuple(args), dict(kwargs), check_inputs=True)
    return Decision(op, name, preferred, skipped)
