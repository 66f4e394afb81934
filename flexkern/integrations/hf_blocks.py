"""FlexMoE layers from transformers' sparse-MoE blocks: ``flexmoe_from_hf(block) -> FlexMoE``.

    from flexkern.integrations.transformers import flexmoe_from_hf
    layer.mlp = flexmoe_from_hf(layer.mlp)       # same forward, flexkern's routing and experts

The FlexMoE shares the block's tensors (no copies): its router weight is the block's gate
weight, its experts are views of the fused ``gate_up_proj`` / ``down_proj``, its shared expert
holds the block's shared-MLP weights and its score bias is DeepSeek-V3's
``e_score_correction_bias`` buffer. Training either trains both; ``update_score_bias`` moves the
block's buffer. Each router is mapped to flexkern's gating exactly:

    block                    scoring  top-k weights                      shared expert
    MixtralSparseMoeBlock    softmax  renormalised                       -
    OlmoeSparseMoeBlock      softmax  renormalised iff norm_topk_prob    -
    FlexOlmoSparseMoeBlock   softmax  renormalised iff norm_topk_prob    -
    Qwen3MoeSparseMoeBlock   softmax  renormalised iff norm_topk_prob    -
    Qwen2MoeSparseMoeBlock   softmax  renormalised iff norm_topk_prob    sigmoid-gated shared_expert
    DeepseekV3MoE            sigmoid  + e_score_correction_bias for the  shared_experts
                                      choice, n_group / topk_group,
                                      renormalised iff norm_topk_prob,
                                      x routed_scaling_factor

Anything else raises ``UnsupportedExpertsError`` naming the class and the reason: another router
or block class (its semantics are not known to match), Mixtral's router jitter (it perturbs the
input in training), experts that flexkern's SwiGLU cannot run (see ``unsupported_reason``), a
shared MLP with biases or another activation. Equality is tested in float32 against the blocks
themselves; in bf16 transformers rounds some router logits to the model dtype first (flexkern
computes them in float32), so near-tied choices may differ.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.moe import FlexMoE, SharedExpert
from . import transformers as _hf

# router class -> how flexkern gates it (renormalize=None: the router's norm_topk_prob)
_ROUTERS = {
    "MixtralTopKRouter": dict(scoring="softmax", renormalize=True),
    "OlmoeTopKRouter": dict(scoring="softmax", renormalize=None),
    "FlexOlmoTopKRouter": dict(scoring="softmax", renormalize=None),
    "Qwen2MoeTopKRouter": dict(scoring="softmax", renormalize=None),
    "Qwen3MoeTopKRouter": dict(scoring="softmax", renormalize=None),
    "DeepseekV3TopkRouter": dict(scoring="sigmoid", renormalize=None, deepseek=True),
}
# block class -> (shared MLP attribute, its sigmoid gate attribute), None for neither
_BLOCKS = {
    "MixtralSparseMoeBlock": (None, None),
    "OlmoeSparseMoeBlock": (None, None),
    "FlexOlmoSparseMoeBlock": (None, None),
    "Qwen3MoeSparseMoeBlock": (None, None),
    "Qwen2MoeSparseMoeBlock": ("shared_expert", "shared_expert_gate"),
    "DeepseekV3MoE": ("shared_experts", None),
}


class HFExpertsView(nn.Module):
    """A transformers experts module seen as flexkern's ``Experts``: ``gate_proj`` / ``up_proj``
    (E, F, D) and ``down_proj`` (E, D, F) are views of its fused parameters, which stay the
    module's (registered here as ``source``): no copy, and gradients reach them."""

    def __init__(self, source: nn.Module):
        super().__init__()
        _hf.expert_weights(source)  # refuses what flexkern's experts cannot run
        self.source = source

    @property
    def gate_proj(self) -> torch.Tensor:
        return _hf.weight_views(self.source)[0]

    @property
    def up_proj(self) -> torch.Tensor:
        return _hf.weight_views(self.source)[1]

    @property
    def down_proj(self) -> torch.Tensor:
        return _hf.weight_views(self.source)[2]


def _refuse(block: nn.Module, reason: str):
    raise _hf.UnsupportedExpertsError(f"flexmoe_from_hf cannot run {type(block).__name__}: {reason}")


def _shared_mlp(block: nn.Module, mlp: nn.Module) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """(gate, up, down) weights of a bias-free SiLU SwiGLU MLP made of nn.Linear layers."""
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in parts):
        _refuse(block, f"its shared MLP {type(mlp).__name__} is not gate_proj/up_proj/down_proj Linears")
    if any(p.bias is not None for p in parts):
        _refuse(block, "its shared MLP has biases")
    if not isinstance(getattr(mlp, "act_fn", None), _hf._SILU):
        _refuse(block, f"its shared MLP's activation is {type(getattr(mlp, 'act_fn', None)).__name__}, not SiLU")
    return tuple(p.weight for p in parts)


def _gating(block: nn.Module, router: nn.Module) -> dict:
    recipe = _ROUTERS.get(type(router).__name__)
    if recipe is None:
        _refuse(block, f"its router {type(router).__name__} is not one flexkern maps exactly "
                       f"(known: {', '.join(sorted(_ROUTERS))})")
    renormalize = recipe["renormalize"]
    gating = dict(scoring=recipe["scoring"],
                  renormalize=bool(router.norm_topk_prob) if renormalize is None else renormalize)
    if recipe.get("deepseek"):
        gating.update(n_group=int(router.num_group), topk_group=int(router.topk_group),
                      routed_scaling=float(router.routed_scaling_factor), score_bias=True)
        if gating["n_group"] == 1:
            gating["topk_group"] = 1  # one group: the group limit chooses nothing
    return gating


def flexmoe_from_hf(block: nn.Module, *, backend: str | None = None) -> FlexMoE:
    """A FlexMoE whose forward equals ``block``'s, sharing its tensors (see the module docstring).

    ``block``: a transformers sparse-MoE block (``model.model.layers[i].mlp``). Returns the layer
    on the block's device and dtype (the router keeps its own dtype: DeepSeek-V3's is float32).
    Raises UnsupportedExpertsError for what it cannot express exactly."""
    shared_name, gate_name = _BLOCKS.get(type(block).__name__, (False, False))
    if shared_name is False:
        _refuse(block, f"not a transformers MoE block flexkern maps (known: {', '.join(sorted(_BLOCKS))})")
    router, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if router is None or experts is None:
        _refuse(block, "it has no gate (router) or experts")
    if float(getattr(block, "jitter_noise", 0.0) or 0.0) > 0:
        _refuse(block, f"router_jitter_noise={block.jitter_noise} perturbs its input in training "
                       "(flexkern's layer has no jitter)")
    view = HFExpertsView(experts)  # refuses unsupported experts
    w_gate = view.gate_proj
    E, Fw, D = w_gate.shape
    router_w = router.weight
    if tuple(router_w.shape) != (E, D):
        _refuse(block, f"its router weight {tuple(router_w.shape)} does not match {E} experts of width {D}")
    gating = _gating(block, router)
    shared = _shared_mlp(block, getattr(block, shared_name)) if shared_name else None
    gate_w = getattr(block, gate_name).weight if gate_name else None
    if gate_w is not None and tuple(gate_w.shape) != (1, D):
        _refuse(block, f"its shared-expert gate has shape {tuple(gate_w.shape)}, expected (1, {D})")

    moe = FlexMoE(D, Fw, E, int(router.top_k), router_bias=False, backend=backend, device="meta",
                  dtype=w_gate.dtype, shared_d_ff=0 if shared is None else shared[0].shape[0],
                  shared_gate=gate_w is not None, **gating)
    device = router_w.device
    moe.router.weight = router_w
    moe.experts = view
    if shared is not None:
        new = SharedExpert(D, shared[0].shape[0], gate_w is not None, device="meta")
        new.gate_proj, new.up_proj, new.down_proj = shared
        if gate_w is not None:
            new.output_gate = gate_w
        moe.shared_expert = new
    moe.expert_mask = torch.ones(E, dtype=torch.bool, device=device)
    moe.expert_frozen = torch.zeros(E, dtype=torch.bool, device=device)
    if moe.score_bias is not None:
        moe.score_bias = router.e_score_correction_bias  # the same tensor: updates reach the block
        moe.expert_load = torch.zeros(E, dtype=torch.int64, device=device)
    left = [n for n, t in (*moe.named_parameters(), *moe.named_buffers()) if t.is_meta]
    assert not left, f"flexmoe_from_hf left {left} unset"
    return moe
