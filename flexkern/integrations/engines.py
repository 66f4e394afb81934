"""What the training-engine integrations share (flexkern/integrations/olmo_core.py, torchtitan.py).

An engine keeps its router, token dispatcher, expert parallelism and FSDP; flexkern runs only its
expert call: rows already grouped by (local) expert, with a per-expert row count, through
``experts_swiglu_grouped`` (grouped GEMMs with SwiGLU fused, forward and backward, frozen-free).

    grouped_swiglu(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, counts_E) -> o_ND

The weights are the engine's own parameters read through views (flattened or transposed
layouts, DTensor local shards): never copied. The call runs in the weights' dtype (x is cast to it
when it differs, the result cast back to x's dtype), so bf16 weights (FSDP2's bf16 parameter
dtype, as the engines train) run in bf16 and float32 weights in float32. No host read.

``install(module, forward, engine_forward)`` makes ``forward`` the module's forward in place: the
module's class becomes a subclass of it (so isinstance, FSDP2's class swap, state dicts and
parameter names are unchanged). A forward already wrapped on the instance (torchtitan's
``parallelize`` does that) is redirected inside its wrapper when the wrapper calls exactly the
engine's forward of this module; any other wrapping is refused, never left on the engine's path.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ..ops import experts_swiglu_grouped, offsets_from_counts

_FLAG = "_flexkern_forward"  # set on the classes install() creates


class UnsupportedModuleError(ValueError):
    """An engine module that flexkern cannot run exactly (the message names it and the reason)."""


def refuse(name: str, module: nn.Module, reason: str):
    where = f" at {name!r}" if name else ""
    raise UnsupportedModuleError(f"flexkern cannot run {type(module).__name__}{where}: {reason}")


def grouped_swiglu(x_ND: torch.Tensor, w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor,
                   w_down_EDF: torch.Tensor, counts_E: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Rows [c_0 + .. + c_{e-1}, .. + c_e) go through expert e (see the module docstring)."""
    dt = w_gate_EFD.dtype
    x = x_ND if x_ND.dtype == dt else x_ND.to(dt)
    if counts_E.device != x.device:  # an engine may keep the counts on the host
        counts_E = counts_E.to(x.device, non_blocking=True)
    offsets_E1 = offsets_from_counts(counts_E)
    # The engine's counts describe its own rows: no validating host read (offsets are clamped
    # on the device, so even wrong counts never read past the rows).
    o_ND = experts_swiglu_grouped(x, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, backend=backend,
                                  validate=False)
    return o_ND if o_ND.dtype == x_ND.dtype else o_ND.to(x_ND.dtype)


def installed(module: nn.Module) -> bool:
    """Whether ``install`` already gave this module flexkern's forward."""
    return bool(getattr(type(module), _FLAG, False))


_SUBCLASSES: dict[tuple[type, object], type] = {}


def install_problem(module: nn.Module, engine_forward) -> str | None:
    """Why ``install`` would refuse this module (an instance-level forward it cannot redirect),
    or None; changes nothing."""
    wrapped = module.__dict__.get("forward")
    if installed(module) or wrapped is None or _redirect(wrapped, module, engine_forward, None, dry_run=True):
        return None
    return ("its forward is wrapped on the instance by something that does not call the engine's "
            "forward directly; apply flexkern before that wrapping")


def install(name: str, module: nn.Module, forward, engine_forward) -> bool:
    """Give ``module`` the forward ``forward`` (see the module docstring). Returns False when it
    already has it. ``engine_forward``: the engine's function it replaces (for the wrapper check)."""
    if installed(module):
        return False
    problem = install_problem(module, engine_forward)
    if problem is not None:
        refuse(name, module, problem)
    cls = type(module)
    key = (cls, forward)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Flexkern{cls.__name__}", (cls,), {
            "forward": forward, _FLAG: True, "__module__": cls.__module__,
            "__doc__": f"{cls.__name__} whose expert computation runs on flexkern."})
    wrapped = module.__dict__.get("forward")
    if wrapped is not None:
        _redirect(wrapped, module, engine_forward, forward)
    module.__class__ = _SUBCLASSES[key]
    return True


def install_all(targets, forwards, unsupported_reason, backend) -> None:
    """An engine's ``use_flexkern``: every (name, module) in ``targets`` gets flexkern's forward,
    or, if any cannot, none does (the first refusal is raised before anything changes).
    ``forwards(module)`` -> (flexkern's forward, the engine's forward it replaces);
    ``unsupported_reason(module)`` -> why the engine module cannot run on flexkern, or None."""
    for name, m in targets:
        reason = unsupported_reason(m) or install_problem(m, forwards(m)[1])
        if reason is not None:
            refuse(name, m, reason)
    for name, m in targets:
        m.flexkern_backend = backend
        install(name, m, *forwards(m))


def _redirect(wrapped, module: nn.Module, engine_forward, forward, depth: int = 0,
              dry_run: bool = False) -> bool:
    """Point every reference to ``module``'s bound engine forward inside the instance-level
    wrapper ``wrapped`` (closures, a few levels deep) at flexkern's forward; True if any.
    ``dry_run``: only say whether there is one."""
    new = None if dry_run else types.MethodType(forward, module)
    if _is_engine_call(wrapped, module, engine_forward):
        if not dry_run:
            del module.forward  # a plain rebinding, not a wrapper: the class's forward takes over
        return True
    found = False
    for cell in getattr(wrapped, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if _is_engine_call(value, module, engine_forward):
            if not dry_run:
                cell.cell_contents = new
            found = True
        elif isinstance(value, types.FunctionType) and depth < 3:
            found |= _redirect(value, module, engine_forward, forward, depth + 1, dry_run)
    return found


def _is_engine_call(value, module: nn.Module, engine_forward) -> bool:
    return (isinstance(value, types.MethodType) and value.__self__ is module
            and value.__func__ is engine_forward)
