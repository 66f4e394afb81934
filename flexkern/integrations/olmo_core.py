"""flexkern's experts inside OLMo-core: ``use_flexkern(module) -> module``.

    from flexkern.integrations.olmo_core import use_flexkern
    model = use_flexkern(model)        # every DroplessMoEMLP / MoEMLP in it, in place

OLMo-core's router, token dispatcher (``ParallelDroplessMLP`` / ``ParallelMLP``), expert
parallelism (``apply_ep``: DTensor-sharded experts) and FSDP2 stay OLMo-core's; only the expert
MLP's computation runs on flexkern (``flexkern/integrations/engines.py``), reading OLMo-core's
flattened weights in place as views (E_l: this rank's experts):

    DroplessMoEMLP  w1, w3, w2 (E*F, D)   gate = w1 (E_l, F, D), up = w3, down = w2^T (E_l, D, F)
                    forward(x (N, D) grouped by expert, batch_size_per_expert (E_l,))
    MoEMLP          w1, w3 (E*D, F), w2 (E*F, D)
                                          gate = w1^T (E_l, F, D), up = w3^T, down = w2^T
                    forward(x (E_l, C, D) padded to the capacity C)

Unlike OLMo-core's dropless fallback (which reads the counts on the host) there is no host
synchronisation, and it runs under torch.compile(fullgraph=True). It runs in the weights' dtype
(OLMo-core's own rule for both classes; with the ``grouped_gemm`` package installed OLMo-core's
dropless path instead rounds everything to bf16). Call it before or after ``apply_ep`` and
FSDP2's ``fully_shard``. Refused with an error naming the module: a subclass with its own forward,
experts sharded along the hidden dimension (``hidden_sharding_degree`` > 1), weights of mixed
dtypes or shapes that do not fit the layout. Needs ``pip install 'flexkern[olmo-core]'``.
"""
from __future__ import annotations

import torch
from torch import nn

from .engines import UnsupportedModuleError, grouped_swiglu, install_all, installed

try:
    from olmo_core.distributed.utils import get_local_tensor
    from olmo_core.nn.moe.mlp import DroplessMoEMLP, MoEMLP, MoEMLPBase
except ImportError as exc:
    raise ImportError("flexkern.integrations.olmo_core needs OLMo-core "
                      "(pip install 'flexkern[olmo-core]')") from exc


def _local(module: MoEMLPBase, name: str, *shape: int):
    """This rank's part of a flattened weight, viewed as (E_local, *shape)."""
    return get_local_tensor(getattr(module, name).view(module.num_experts, *shape))


def dropless_forward(self: DroplessMoEMLP, x, batch_size_per_expert):
    """DroplessMoEMLP.forward on flexkern: x (N, D) grouped by local expert -> (N, D)."""
    F, D = self.hidden_size, self.d_model
    w1, w2, w3 = (_local(self, n, F, D) for n in ("w1", "w2", "w3"))
    return grouped_swiglu(x, w1, w3, w2.transpose(1, 2), get_local_tensor(batch_size_per_expert),
                          self.flexkern_backend)


def capacity_forward(self: MoEMLP, x):
    """MoEMLP.forward on flexkern: x (E_l, C, D) -> (E_l, C, D), every expert's C rows."""
    F, D = self.hidden_size, self.d_model
    w1, w3 = (_local(self, n, D, F).transpose(1, 2) for n in ("w1", "w3"))
    w2 = _local(self, "w2", F, D).transpose(1, 2)
    E_local, C = x.shape[0], x.shape[1]
    counts_E = torch.full((E_local,), C, dtype=torch.int64, device=x.device)  # C is a shape: no host read
    return grouped_swiglu(x.reshape(E_local * C, D), w1, w3, w2, counts_E,
                          self.flexkern_backend).view(E_local, C, D)


_FORWARDS = {DroplessMoEMLP: dropless_forward, MoEMLP: capacity_forward}


def _engine(module: nn.Module):
    """The OLMo-core class whose forward flexkern replaces (None: not one)."""
    return next((c for c in _FORWARDS if isinstance(module, c)), None)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why flexkern cannot run this OLMo-core expert MLP exactly, or None if it can."""
    engine = _engine(module)
    if engine is None:
        return "not an OLMo-core DroplessMoEMLP or MoEMLP"
    if not installed(module) and type(module).forward is not engine.forward:
        return f"it overrides {engine.__name__}.forward"
    if getattr(module, "hidden_sharding_degree", 1) != 1:
        return f"its experts are sharded along the hidden dimension (hidden_sharding_degree={module.hidden_sharding_degree})"
    E, F, D = module.num_experts, module.hidden_size, module.d_model
    shapes = {"w1": (E * F, D), "w2": (E * F, D), "w3": (E * F, D)} if engine is DroplessMoEMLP else \
        {"w1": (E * D, F), "w2": (E * F, D), "w3": (E * D, F)}
    dtypes = set()
    for name, want in shapes.items():
        w = getattr(module, name, None)
        if w is None or tuple(w.shape) != want:
            return f"{name} has shape {None if w is None else tuple(w.shape)}, expected {want}"
        dtypes.add(w.dtype)
    if len(dtypes) > 1:
        return f"its weights have different dtypes {sorted(map(str, dtypes))}"
    return None


def use_flexkern(module: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Run every OLMo-core expert MLP in ``module`` (or ``module`` itself) on flexkern, in place;
    returns ``module``. ``backend``: flexkern's backend preference for the experts op (default:
    automatic). Calling it again changes nothing (but the backend). Raises
    UnsupportedModuleError for an expert MLP it cannot run, naming it, before changing any."""
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, MoEMLPBase)]
    if not targets:
        raise UnsupportedModuleError(
            f"no OLMo-core DroplessMoEMLP or MoEMLP in {type(module).__name__} (OLMo-core's v2 "
            "routed experts are not supported)")
    install_all(targets, lambda m: (_FORWARDS[_engine(m)], _engine(m).forward), unsupported_reason, backend)
    return module


__all__ = ["UnsupportedModuleError", "unsupported_reason", "use_flexkern"]
