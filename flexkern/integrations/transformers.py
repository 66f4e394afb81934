"""flexkern as a transformers experts implementation: ``experts_implementation="flexkern"``.

    import flexkern.integrations.transformers          # registers "flexkern" on import
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="flexkern")
    # or, on a model already built:  model.set_experts_implementation("flexkern")

(``flexkern.integrations.transformers.register()`` does the registration again, e.g. under
another name.) Needs transformers >= 5 (``pip install flexkern[hf]``).

transformers' MoE models (FlexOlmo, OLMoE, Mixtral, Qwen2/3-MoE and the other classes decorated
with ``use_experts_implementation``) compute the routing themselves and call the experts with
``(hidden_states (T, D), top_k_index (T, K) int, top_k_weights (T, K) float)``. The function
registered here runs that call on flexkern's ``dispatch`` + ``experts_swiglu``:

    y_t = sum_k top_k_weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t),  e = top_k_index[t, k]

Weights are read in place, as views of the module's parameters (no copy per call):
    gate_up_proj (E, 2F, D), down_proj (E, D, F)      gate = gate_up[:, :F], up = gate_up[:, F:]
    transposed:  (E, D, 2F),           (E, F, D)      the same, as transposed views
Anything else raises ``UnsupportedExpertsError`` naming the class and the reason (no silent
fallback): another activation than SiLU, non-gated experts, biases, interleaved gate/up, a custom
``_apply_gate``, a post-expert norm, expert parallelism, or shapes that do not fit.

``flexmoe_from_hf(block)`` goes further: a FlexMoE layer (flexkern's routing too, and its
balance losses, mask and counts) sharing the weights of a transformers MoE block (Mixtral, OLMoE,
Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, FlexOlmo), with the block's forward (flexkern/integrations/
hf_blocks.py).

Shapes: T tokens, D hidden size, F expert width, E experts, K top-k.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops

NAME = "flexkern"

try:
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import ExpertsInterface, _default_apply_gate
except ImportError as exc:  # transformers missing or older than 5
    raise ImportError("flexkern.integrations.transformers needs transformers>=5 "
                      "(pip install 'flexkern[hf]')") from exc

_SILU = (nn.SiLU, SiLUActivation)


class UnsupportedExpertsError(ValueError):
    """A transformers experts module that flexkern's SwiGLU experts cannot run exactly."""


def _refuse(module: nn.Module, reason: str):
    raise UnsupportedExpertsError(f"experts_implementation={NAME!r} cannot run {type(module).__name__}: {reason}")


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` (a transformers experts module) cannot run on flexkern, or None if it can.

    Checks only the module's structure (flags set by ``use_experts_implementation``, the
    activation, parameter shapes), no tensor values: cheap, and constant under torch.compile."""
    if getattr(module, "has_gate", None) is None:
        return "not an experts module of transformers (no use_experts_implementation flags)"
    if not module.has_gate:
        return "its experts are not gated (act(up x) instead of SwiGLU)"
    if module.has_bias:
        return "its experts have biases (flexkern's experts are bias-free)"
    if getattr(module, "has_post_expert_norm", False):
        return "it applies a norm after each expert"
    if not getattr(module, "is_concatenated", True):
        return "its gate_up_proj interleaves gate and up rows (flexkern reads the concatenated [gate; up] layout)"
    if type(module)._apply_gate is not _default_apply_gate:
        return "it has a custom gating function (_apply_gate), not silu(gate) * up"
    act = getattr(module, "act_fn", None)
    if not isinstance(act, _SILU):
        return f"its activation is {type(act).__name__}, flexkern's experts use SiLU (SwiGLU)"
    if getattr(module, "_is_expert_parallel", False):
        return "it is expert-parallel (the routing holds sentinel ids of remote experts)"
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return "it has no gate_up_proj / down_proj tensors"
    if gate_up.dim() != 3 or down.dim() != 3 or not gate_up.is_floating_point():
        return f"gate_up_proj {tuple(gate_up.shape)} {gate_up.dtype} is not a 3-d float tensor"
    if gate_up.dtype != down.dtype:
        return f"gate_up_proj is {gate_up.dtype} but down_proj is {down.dtype}"
    E, a, b = gate_up.shape
    twoF, D = (b, a) if module.is_transposed else (a, b)
    want_down = (E, twoF // 2, D) if module.is_transposed else (E, D, twoF // 2)
    if twoF % 2 or tuple(down.shape) != want_down:
        layout = "(E, D, 2F) and (E, F, D)" if module.is_transposed else "(E, 2F, D) and (E, D, F)"
        return (f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not "
                f"the layout {layout}")
    n = getattr(module, "num_experts", E)
    if n != E:
        return f"num_experts={n} but gate_up_proj holds {E} experts"
    return None


def expert_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_gate_EFD, w_up_EFD, w_down_EDF): views of the module's fused weights, no copies."""
    reason = unsupported_reason(module)
    if reason is not None:
        _refuse(module, reason)
    return weight_views(module)


def weight_views(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``expert_weights`` without the checks, for a module already accepted once."""
    gate_up, down = module.gate_up_proj, module.down_proj
    if module.is_transposed:  # (E, D, 2F), (E, F, D)
        Fw = gate_up.shape[2] // 2
        return (gate_up[:, :, :Fw].transpose(1, 2), gate_up[:, :, Fw:].transpose(1, 2),
                down.transpose(1, 2))
    Fw = gate_up.shape[1] // 2  # (E, 2F, D), (E, D, F)
    return gate_up[:, :Fw], gate_up[:, Fw:], down


def flexkern_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts call of transformers on flexkern (see the module docstring).

    hidden_states (..., D) in any float dtype (cast to the weights' dtype for the GEMMs, e.g.
    under autocast, and the result cast back); top_k_index (T, K) int32/int64 from the router;
    top_k_weights (T, K) in the model dtype or float32 (Mixtral) — the combine runs in float32
    either way. Returns (..., D) in hidden_states' dtype. Differentiable in hidden_states,
    top_k_weights and both weight tensors."""
    w_gate_EFD, w_up_EFD, w_down_EDF = expert_weights(self)
    E, _, D = w_gate_EFD.shape
    if hidden_states.shape[-1] != D:
        _refuse(self, f"hidden_states has width {hidden_states.shape[-1]}, the experts expect {D}")
    x_TD = hidden_states.reshape(-1, D)
    if top_k_index.dim() != 2 or top_k_index.shape[0] != x_TD.shape[0]:
        _refuse(self, f"top_k_index has shape {tuple(top_k_index.shape)}, expected ({x_TD.shape[0]}, K)")
    if x_TD.dtype != w_gate_EFD.dtype:
        x_TD = x_TD.to(w_gate_EFD.dtype)
    # Router ids come from topk over E experts: in range, so no host-synchronising id check.
    disp = ops.dispatch(top_k_index, E, validate=False)
    y_TD = ops.experts_swiglu(x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, disp, top_k_weights)
    return y_TD.to(hidden_states.dtype).view(hidden_states.shape)


def register(name: str = NAME) -> str:
    """Register ``flexkern_experts_forward`` in transformers' ExpertsInterface as ``name``
    (idempotent; done on import under "flexkern"). Returns the name."""
    ExpertsInterface.register(name, flexkern_experts_forward)
    return name


def unsupported_experts(model: nn.Module) -> dict[str, str]:
    """{module name: reason} for every experts module of ``model`` that flexkern cannot run
    (empty when ``experts_implementation="flexkern"`` covers the whole model)."""
    return {name: r for name, m in model.named_modules()
            if getattr(m, "has_gate", None) is not None and (r := unsupported_reason(m)) is not None}


register()

# FlexMoE layers from transformers' MoE blocks (defined beside, exported here).
from .hf_blocks import flexmoe_from_hf  # noqa: E402

__all__ = ["NAME", "UnsupportedExpertsError", "expert_weights", "flexkern_experts_forward",
           "flexmoe_from_hf", "register", "unsupported_experts", "unsupported_reason", "weight_views"]
