"""flexkern's experts inside torchtitan: ``use_flexkern(module) -> module``.

    from flexkern.integrations.torchtitan import use_flexkern
    model = use_flexkern(model)        # every GroupedExperts in it, in place

torchtitan's router (``TokenChoiceTopKRouter``), token dispatchers (local, all-to-all EP),
``parallelize`` (EP / TP state sharding, local_map regions) and FSDP2 stay torchtitan's; only
``GroupedExperts.forward(x_RD, num_tokens_per_expert_E)`` runs on flexkern
(``flexkern/integrations/engines.py``), on the module's own parameters (their local shards under
EP / TP), as they are:

    gate = w1_EFD (E, F, D), up = w3_EFD (E, F, D), down = w2_EDF (E, D, F)

torchtitan's own path casts the input and every weight to bf16 on each call (``torch._grouped_mm``
needs bf16); flexkern runs in the weights' dtype without copying them: bf16 weights (FSDP2 with
bf16 parameters, as torchtitan trains) give the same computation, float32 weights a float32 one.
Call it before or after ``model.parallelize(...)``: afterwards the instance-level forward that
parallelize installs is redirected to flexkern (refused if it has another shape). Refused with
an error naming the module: a subclass with its own forward or a replaced ``_grouped_mm`` (the
Float8 / MXFP8 converters: their low-precision grouped GEMMs are not flexkern's), weights of mixed
dtypes or shapes that do not fit. Needs ``pip install 'flexkern[torchtitan]'``.
"""
from __future__ import annotations

from torch import nn

from .engines import UnsupportedModuleError, grouped_swiglu, install_all, installed

try:
    from torch.distributed.tensor import DTensor
    from torchtitan.models.common.moe import GroupedExperts
except ImportError as exc:
    raise ImportError("flexkern.integrations.torchtitan needs torchtitan "
                      "(pip install 'flexkern[torchtitan]')") from exc


def _local(w):
    return w.to_local() if isinstance(w, DTensor) else w


def grouped_experts_forward(self: GroupedExperts, x_RD, num_tokens_per_expert_E):
    """GroupedExperts.forward on flexkern: x_RD (R, D) grouped by (local) expert -> (R, D)."""
    w1_EFD, w2_EDF, w3_EFD = _local(self.w1_EFD), _local(self.w2_EDF), _local(self.w3_EFD)
    return grouped_swiglu(x_RD, w1_EFD, w3_EFD, w2_EDF, num_tokens_per_expert_E,
                          self.flexkern_backend)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why flexkern cannot run this torchtitan GroupedExperts exactly, or None if it can."""
    if not isinstance(module, GroupedExperts):
        return "not a torchtitan GroupedExperts"
    cls = type(module)
    if cls._grouped_mm is not GroupedExperts._grouped_mm or "_grouped_mm" in module.__dict__:
        return ("its _grouped_mm is replaced (a Float8 / MXFP8 converter?): those low-precision "
                "grouped GEMMs are not flexkern's")
    if not installed(module) and cls.forward is not GroupedExperts.forward:
        return "it overrides GroupedExperts.forward"
    tensors = [getattr(module, n, None) for n in ("w1_EFD", "w2_EDF", "w3_EFD")]
    if any(t is None for t in tensors):
        return "it lacks w1_EFD / w2_EDF / w3_EFD (a fused-SwiGLU override?)"
    w1, w2, w3 = (_local(t) for t in tensors)
    E, F, D = w1.shape
    if tuple(w3.shape) != (E, F, D) or tuple(w2.shape) != (E, D, F):
        return f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}, w3 {tuple(w3.shape)} are not (E, F, D), (E, D, F), (E, F, D)"
    if len({w1.dtype, w2.dtype, w3.dtype}) > 1:
        return f"its weights have different dtypes ({w1.dtype}, {w2.dtype}, {w3.dtype})"
    return None


def use_flexkern(module: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Run every torchtitan GroupedExperts in ``module`` (or ``module`` itself) on flexkern, in
    place; returns ``module``. ``backend``: flexkern's backend preference for the experts op.
    Calling it again changes nothing (but the backend). Raises UnsupportedModuleError for a
    module it cannot run, naming it, before changing any."""
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, GroupedExperts)]
    if not targets:
        raise UnsupportedModuleError(f"no torchtitan GroupedExperts in {type(module).__name__}")
    install_all(targets, lambda m: (grouped_experts_forward, GroupedExperts.forward), unsupported_reason, backend)
    return module


__all__ = ["UnsupportedModuleError", "unsupported_reason", "use_flexkern"]
