"""route: router logits -> top-k experts and gate weights (FlexOlmo gating and the routers of
today's MoE models).

Shapes: T tokens, D d_model, E experts, K top-k, G groups.

    logits_TE  = x_TD @ router_ED^T + bias_E                 (float32; float64 when x and router are)
    scores_TE  = softmax(logits_TE)      scoring="softmax"   (FlexOlmo, Mixtral, OLMoE, Qwen)
               = sigmoid(logits_TE)      scoring="sigmoid"   (DeepSeek-V3)
    choice_TE  = scores_TE + score_bias_E                    (selection only: aux-loss-free balancing)
    groups:      with n_group > 1 the E experts form n_group equal groups of consecutive ids; a
                 group's score is the sum of its two best choices; only the experts of the
                 topk_group best groups can be chosen (DeepSeek-V3's group-limited routing)
    experts_TK = top-k of choice_TE, ties broken toward the lower id (and the lower group id)
    weights_TK = scores_TE at experts_TK                     (not the choice: the bias only selects)
    renormalize: weights_TK /= weights_TK.sum(-1)            (Mixtral style; FlexOlmo default off)
    weights_TK *= routed_scaling

The returned logits are the unmasked ones; the router z-loss is computed from them by the caller.

Expert mask, for every scoring:
    reroute: a masked expert's score is exactly 0 and it is chosen only after every active one
             (softmax: its logit is -inf before the softmax, identical to deleting its row;
             sigmoid: the other experts' scores are unchanged, also identical to deleting it).
             With groups, a group's score is taken over its active experts (the best one alone
             when only one is active; a group with none is chosen last).
    drop:    routing ignores the mask; dispatch later drops slots that picked a masked expert.

A slot that could only be filled with an expert that is not eligible (masked, or outside the
chosen groups) gets weight 0, never NaN: with fewer active experts than k the slots past them
get weight 0 and a masked expert's id (lowest ids first), which dispatch with the same mask
drops (row -1). With every expert masked all K weights are 0 and the ids are 0..K-1. The result
is the same in eager, compiled and graph-captured code.
"""
from __future__ import annotations

import math

import torch

from . import backend as _backend
from .checks import FLOAT_DTYPES, check_shape, check_tensor

SCORINGS = ("softmax", "sigmoid")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routing math runs in float32 (float64 for float64 inputs, so gradcheck is exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def routing_dtype(x_dtype: torch.dtype, router_dtype: torch.dtype) -> torch.dtype:
    """float64 when x and the router both are (gradcheck), else float32: a float32 router beside
    float64 activations routes in float32, as DeepSeek-V3's float32 router does."""
    return torch.float64 if x_dtype == router_dtype == torch.float64 else torch.float32


def router_logits_ref(x_TD, router_ED, bias_E=None):
    cd = routing_dtype(x_TD.dtype, router_ED.dtype)
    logits_TE = x_TD.to(cd) @ router_ED.to(cd).t()
    if bias_E is not None:
        logits_TE = logits_TE + bias_E.to(cd)
    return logits_TE


def gate_scores(logits_TE, mask_E=None, reroute=True, scoring="softmax"):
    """scores_TE: softmax probabilities or sigmoids of the logits; with a reroute mask the masked
    experts leave the softmax and score exactly 0 (also when every expert is masked)."""
    masked = reroute and mask_E is not None
    if scoring == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
    elif masked:
        scores_TE = torch.softmax(logits_TE.masked_fill(~mask_E, float("-inf")), dim=-1)
    else:
        return torch.softmax(logits_TE, dim=-1)
    # softmax of an all -inf row is NaN: the where gives the masked experts exactly 0.
    return torch.where(mask_E, scores_TE, 0) if masked else scores_TE


def _group_scores(choice_TE, n_group):
    """(T, G): the sum of each group's two best choices over its eligible experts (-inf = not
    eligible); the best alone when only one is eligible, -inf when none is."""
    T, E = choice_TE.shape
    top2 = choice_TE.view(T, n_group, E // n_group).topk(2, dim=-1).values
    best, second = top2[..., 0], top2[..., 1]
    return torch.where(second == float("-inf"), best, best + second)


def choice_scores(scores_TE, mask_E=None, reroute=True, score_bias_E=None, n_group=1, topk_group=1):
    """choice_TE: what the top-k ranks: scores + score bias, -inf for experts that may not be
    chosen (masked under reroute, or outside the topk_group best groups)."""
    choice_TE = scores_TE if score_bias_E is None else scores_TE + score_bias_E.to(scores_TE.dtype)
    if reroute and mask_E is not None:
        choice_TE = choice_TE.masked_fill(~mask_E, float("-inf"))
    if n_group > 1:
        T, E = choice_TE.shape
        group_TG = _group_scores(choice_TE, n_group)
        # A stable descending sort puts the lower group id first among equal group scores.
        chosen_TG = torch.sort(group_TG, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, chosen_TG, True)
        choice_TE = choice_TE.masked_fill(~keep_TG.repeat_interleave(E // n_group, dim=1), float("-inf"))
    return choice_TE


def _select(choice_TE, k):
    """(picked choices, experts): top-k in descending order, ties toward the lower id (a stable
    descending sort; NaN first, as torch.sort orders it)."""
    sorted_TE, order_TE = torch.sort(choice_TE, dim=-1, descending=True, stable=True)
    return sorted_TE[:, :k], order_TE[:, :k]


def _finish_weights(sel_TK, renormalize, routed_scaling):
    if renormalize:
        sel_TK = sel_TK / sel_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return sel_TK * routed_scaling if routed_scaling != 1.0 else sel_TK


def gate_ref(logits_TE, k, mask_E=None, reroute=True, renormalize=False, *, scoring="softmax",
             score_bias_E=None, n_group=1, topk_group=1, routed_scaling=1.0):
    """The gate on given logits: (weights_TK, experts_TK int64). route_ref's second half, and the
    oracle for the CUDA kernel, which takes precomputed logits."""
    scores_TE = gate_scores(logits_TE, mask_E, reroute, scoring)
    choice_TE = choice_scores(scores_TE, mask_E, reroute, score_bias_E, n_group, topk_group)
    picked_TK, experts_TK = _select(choice_TE, k)
    # A slot filled with an expert that may not be chosen (choice -inf) gets weight 0.
    sel_TK = torch.where(picked_TK == float("-inf"), 0, scores_TE.gather(1, experts_TK))
    return _finish_weights(sel_TK, renormalize, routed_scaling), experts_TK


def route_ref(x_TD, router_ED, k, bias_E=None, mask_E=None, reroute=True, renormalize=False, **gate):
    """Plain-PyTorch routing. Returns (weights_TK, experts_TK int32, logits_TE). ``gate``: the
    keyword settings of ``route`` (scoring, score_bias_E, n_group, topk_group, routed_scaling)."""
    logits_TE = router_logits_ref(x_TD, router_ED, bias_E)
    weights_TK, experts_TK = gate_ref(logits_TE, k, mask_E, reroute, renormalize, **gate)
    return weights_TK.contiguous(), experts_TK.to(torch.int32).contiguous(), logits_TE


_backend.register("route", "reference", route_ref)


@torch.library.custom_op("flexkern::route", mutates_args=())
def _route_op(
    x_TD: torch.Tensor,
    router_ED: torch.Tensor,
    k: int,
    bias_E: torch.Tensor | None,
    mask_E: torch.Tensor | None,
    reroute: bool,
    renormalize: bool,
    backend: str,
    scoring: str = "softmax",
    score_bias_E: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (x_TD, router_ED, k, bias_E, mask_E, reroute, renormalize)
    gate = dict(scoring=scoring, score_bias_E=score_bias_E, n_group=n_group, topk_group=topk_group,
                routed_scaling=routed_scaling)
    _, fn = _backend.lookup("route", backend, *args, **gate)
    return fn(*args, **gate)


@_route_op.register_fake
def _(x_TD, router_ED, k, bias_E, mask_E, reroute, renormalize, backend, scoring="softmax",
      score_bias_E=None, n_group=1, topk_group=1, routed_scaling=1.0):
    T, E = x_TD.shape[0], router_ED.shape[0]
    cd = routing_dtype(x_TD.dtype, router_ED.dtype)
    return (
        x_TD.new_empty((T, k), dtype=cd),
        x_TD.new_empty((T, k), dtype=torch.int32),
        x_TD.new_empty((T, E), dtype=cd),
    )


def _setup_context(ctx, inputs, output):
    (x_TD, router_ED, k, bias_E, mask_E, reroute, renormalize, _, scoring, _, _, _,
     routed_scaling) = inputs
    weights_TK, experts_TK, logits_TE = output
    # The forward's logits (T x E) are kept so the backward needs no second router matmul.
    ctx.save_for_backward(x_TD, router_ED, bias_E, mask_E, weights_TK, experts_TK, logits_TE)
    ctx.reroute, ctx.renormalize, ctx.scoring = reroute, renormalize, scoring
    ctx.routed_scaling = routed_scaling
    ctx.has_bias = bias_E is not None


def _backward(ctx, d_weights_TK, d_experts_TK, d_logits_TE):
    x_TD, router_ED, bias_E, mask_E, weights_TK, experts_TK, logits_TE = ctx.saved_tensors
    scores_TE = gate_scores(logits_TE, mask_E, ctx.reroute, ctx.scoring)
    cd = scores_TE.dtype
    # Slots of weight 0 add nothing: either not eligible (no gradient by definition) or a score of
    # exactly 0, whose softmax/sigmoid derivative is 0 as well. routed_scaling > 0 (checked).
    live_TK = weights_TK != 0
    d_sel_TK = torch.where(live_TK, d_weights_TK.to(cd) * ctx.routed_scaling, 0)
    if ctx.renormalize:
        # w = s / S with s the live selected scores: ds = (dw - <dw, w>) / S
        sel_TK = torch.where(live_TK, scores_TE.gather(1, experts_TK.long()), 0)
        total_T1 = sel_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        d_sel_TK = (d_sel_TK - (d_sel_TK * sel_TK / total_T1).sum(-1, keepdim=True)) / total_T1
        d_sel_TK = torch.where(live_TK, d_sel_TK, 0)
    d_scores_TE = torch.zeros_like(scores_TE).scatter_add_(1, experts_TK.long(), d_sel_TK)
    if ctx.scoring == "sigmoid":  # masked experts' scores are 0, so their derivative is too
        d_logits = d_scores_TE * scores_TE * (1 - scores_TE)
    else:
        d_logits = scores_TE * (d_scores_TE - (d_scores_TE * scores_TE).sum(-1, keepdim=True))
    if d_logits_TE is not None:
        d_logits = d_logits + d_logits_TE.to(cd)
    d_x = (d_logits @ router_ED.to(cd)).to(x_TD.dtype)
    d_router = (d_logits.t() @ x_TD.to(cd)).to(router_ED.dtype)
    d_bias = d_logits.sum(0).to(bias_E.dtype) if ctx.has_bias else None
    return d_x, d_router, None, d_bias, None, None, None, None, None, None, None, None, None


_route_op.register_autograd(_backward, setup_context=_setup_context)


def check_gating(num_experts: int, k: int, scoring: str = "softmax", n_group: int = 1,
                 topk_group: int = 1, routed_scaling: float = 1.0) -> None:
    """The gating settings' rules (shared by route and the FlexMoE constructor)."""
    E = num_experts
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= E:
        raise ValueError(f"top_k must be an int in [1, {E}] (the number of experts), got {k!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    for name, v in (("n_group", n_group), ("topk_group", topk_group)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if n_group > 1:
        if E % n_group or E // n_group < 2:
            raise ValueError(f"n_group={n_group} must split the {E} experts into equal groups of at "
                             f"least 2 (a group's score is the sum of its two best experts)")
        if topk_group > n_group:
            raise ValueError(f"topk_group={topk_group} must be at most n_group={n_group}")
        if k > topk_group * (E // n_group):
            raise ValueError(f"top_k={k} exceeds the {topk_group * (E // n_group)} experts of the "
                             f"topk_group={topk_group} chosen groups")
    elif topk_group != 1:
        raise ValueError(f"topk_group={topk_group} needs n_group > 1 (group-limited routing)")
    if not isinstance(routed_scaling, (int, float)) or isinstance(routed_scaling, bool) or not (
            math.isfinite(routed_scaling) and routed_scaling > 0):
        raise ValueError(f"routed_scaling must be a finite number > 0, got {routed_scaling!r}")


def _route_arguments(x_TD, router_ED, k, bias_E=None, expert_mask_E=None, mask_mode="reroute",
                     renormalize=False, *, scoring="softmax", score_bias_E=None, n_group=1,
                     topk_group=1, routed_scaling=1.0):
    """Check the public arguments; returns the backend functions' (args, kwargs)."""
    check_tensor("x", x_TD, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("router weight", router_ED, ndim=2, dtypes=FLOAT_DTYPES, device=x_TD.device)
    T, D = x_TD.shape
    E = router_ED.shape[0]
    if router_ED.shape[1] != D:
        raise ValueError(f"router weight has width {router_ED.shape[1]} but x has width {D}")
    check_gating(E, k, scoring, n_group, topk_group, routed_scaling)
    if mask_mode not in ("reroute", "drop"):
        raise ValueError(f"mask_mode must be 'reroute' or 'drop', got {mask_mode!r}")
    for name, v in (("bias", bias_E), ("score_bias", score_bias_E)):
        if v is not None:
            check_tensor(name, v, ndim=1, dtypes=FLOAT_DTYPES, device=x_TD.device)
            check_shape(name, v, (E,))
    if expert_mask_E is not None:
        check_tensor("expert_mask", expert_mask_E, ndim=1, dtypes=(torch.bool,), device=x_TD.device)
        check_shape("expert_mask", expert_mask_E, (E,))
    args = (x_TD.contiguous(), router_ED.contiguous(), k, bias_E, expert_mask_E,
            mask_mode == "reroute", bool(renormalize))
    gate = dict(scoring=scoring, score_bias_E=score_bias_E, n_group=n_group, topk_group=topk_group,
                routed_scaling=float(routed_scaling))
    return args, gate


_backend.register_arguments("route", _route_arguments)


def route(
    x_TD: torch.Tensor,
    router_ED: torch.Tensor,
    k: int,
    bias_E: torch.Tensor | None = None,
    expert_mask_E: torch.Tensor | None = None,
    mask_mode: str = "reroute",
    renormalize: bool = False,
    backend: str | None = None,
    *,
    scoring: str = "softmax",
    score_bias_E: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling: float = 1.0,
):
    """Top-k routing with an optional expert mask, logit bias and selection-only score bias.

    Returns ``weights_TK`` (float32; float64 when x and router are), ``experts_TK`` (int32) and
    ``logits_TE`` (float32/float64, bias added, mask not applied). Differentiable in x, router and
    bias (``score_bias_E`` only selects and gets no gradient). ``scoring``, ``n_group``,
    ``topk_group``, ``routed_scaling`` and the mask rules: see the module docstring.
    """
    args, gate = _route_arguments(x_TD, router_ED, k, bias_E, expert_mask_E, mask_mode, renormalize,
                                  scoring=scoring, score_bias_E=score_bias_E, n_group=n_group,
                                  topk_group=topk_group, routed_scaling=routed_scaling)
    return _route_op(*args, _backend.requested(backend), **gate)
