"""route: router logits -> top-k experts and gate weights (FlexOlmo gating).

Shapes: T tokens, D d_model, E experts, K top-k.

    logits_TE  = x_TD @ router_ED^T + bias_E                 (float32; float64 for float64 input)
    reroute:     masked experts get -inf before the softmax  (identical to deleting their rows)
    drop:        routing ignores the mask; dispatch later drops slots that picked a masked expert
    probs_TE   = softmax(logits_TE)
    weights_TK, experts_TK = top-k of probs_TE, ties broken toward the lower expert id
    renormalize: weights_TK /= weights_TK.sum(-1)            (Mixtral style; FlexOlmo default off)

The returned logits are the unmasked ones; the router z-loss is computed from them by the caller.

Fewer active experts than k (reroute): masked experts have probability exactly 0, so the slots
past the active experts get weight 0 and a masked expert's id (the lowest ids first); dispatch
with the same mask drops them (row -1). With every expert masked all K weights are 0 (never NaN)
and the ids are 0..K-1. The result is the same in eager, compiled and graph-captured code.
"""
from __future__ import annotations

import torch

from . import backend as _backend
from .checks import FLOAT_DTYPES, check_shape, check_tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routing math runs in float32 (float64 for float64 inputs, so gradcheck is exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def router_logits_ref(x_TD, router_ED, bias_E=None):
    cd = compute_dtype(x_TD.dtype)
    logits_TE = x_TD.to(cd) @ router_ED.to(cd).t()
    if bias_E is not None:
        logits_TE = logits_TE + bias_E.to(cd)
    return logits_TE


def _gate_probs(logits_TE, mask_E, reroute: bool):
    if not (reroute and mask_E is not None):
        return torch.softmax(logits_TE, dim=-1)
    probs_TE = torch.softmax(logits_TE.masked_fill(~mask_E, float("-inf")), dim=-1)
    # Masked experts get exactly 0, also when every expert is masked (softmax of -inf is NaN).
    return torch.where(mask_E, probs_TE, 0)


def route_ref(x_TD, router_ED, k, bias_E=None, mask_E=None, reroute=True, renormalize=False):
    """Plain-PyTorch routing. Returns (weights_TK, experts_TK int32, logits_TE)."""
    logits_TE = router_logits_ref(x_TD, router_ED, bias_E)
    probs_TE = _gate_probs(logits_TE, mask_E, reroute)
    # A stable descending sort puts the lower expert id first among equal probabilities.
    probs_sorted, order = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    weights_TK, experts_TK = probs_sorted[:, :k], order[:, :k]
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (x_TD, router_ED, k, bias_E, mask_E, reroute, renormalize)
    _, fn = _backend.lookup("route", backend, *args)
    return fn(*args)


@_route_op.register_fake
def _(x_TD, router_ED, k, bias_E, mask_E, reroute, renormalize, backend):
    T, E = x_TD.shape[0], router_ED.shape[0]
    cd = compute_dtype(x_TD.dtype)
    return (
        x_TD.new_empty((T, k), dtype=cd),
        x_TD.new_empty((T, k), dtype=torch.int32),
        x_TD.new_empty((T, E), dtype=cd),
    )


def _setup_context(ctx, inputs, output):
    x_TD, router_ED, k, bias_E, mask_E, reroute, renormalize, _ = inputs
    weights_TK, experts_TK, logits_TE = output
    # The forward's logits (T x E) are kept so the backward needs no second router matmul.
    ctx.save_for_backward(x_TD, router_ED, bias_E, mask_E, weights_TK, experts_TK, logits_TE)
    ctx.reroute, ctx.renormalize = reroute, renormalize
    ctx.has_bias = bias_E is not None


def _backward(ctx, d_weights_TK, d_experts_TK, d_logits_TE):
    x_TD, router_ED, bias_E, mask_E, weights_TK, experts_TK, logits_TE = ctx.saved_tensors
    probs_TE = _gate_probs(logits_TE, mask_E, ctx.reroute)
    cd = probs_TE.dtype
    d_sel_TK = d_weights_TK.to(cd)
    if ctx.renormalize:
        # weights = s / S with s the selected probabilities: ds = (dw - <dw, w>) / S
        sel_TK = probs_TE.gather(1, experts_TK.long())
        total_T1 = sel_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        d_sel_TK = (d_sel_TK - (d_sel_TK * weights_TK).sum(-1, keepdim=True)) / total_T1
    d_probs_TE = torch.zeros_like(probs_TE).scatter_add_(1, experts_TK.long(), d_sel_TK)
    d_logits = probs_TE * (d_probs_TE - (d_probs_TE * probs_TE).sum(-1, keepdim=True))
    if d_logits_TE is not None:
        d_logits = d_logits + d_logits_TE.to(cd)
    d_x = (d_logits @ router_ED.to(cd)).to(x_TD.dtype)
    d_router = (d_logits.t() @ x_TD.to(cd)).to(router_ED.dtype)
    d_bias = d_logits.sum(0).to(bias_E.dtype) if ctx.has_bias else None
    return d_x, d_router, None, d_bias, None, None, None, None


_route_op.register_autograd(_backward, setup_context=_setup_context)


def _route_arguments(x_TD, router_ED, k, bias_E=None, expert_mask_E=None, mask_mode="reroute",
                     renormalize=False):
    """Check the public arguments; returns the backend functions' (args, kwargs)."""
    check_tensor("x", x_TD, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("router weight", router_ED, ndim=2, dtypes=FLOAT_DTYPES, device=x_TD.device)
    T, D = x_TD.shape
    E = router_ED.shape[0]
    if router_ED.shape[1] != D:
        raise ValueError(f"router weight has width {router_ED.shape[1]} but x has width {D}")
    if not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"top_k must be an int in [1, {E}] (the number of experts), got {k!r}")
    if mask_mode not in ("reroute", "drop"):
        raise ValueError(f"mask_mode must be 'reroute' or 'drop', got {mask_mode!r}")
    if bias_E is not None:
        check_tensor("bias", bias_E, ndim=1, dtypes=FLOAT_DTYPES, device=x_TD.device)
        check_shape("bias", bias_E, (E,))
    if expert_mask_E is not None:
        check_tensor("expert_mask", expert_mask_E, ndim=1, dtypes=(torch.bool,), device=x_TD.device)
        check_shape("expert_mask", expert_mask_E, (E,))
    args = (x_TD.contiguous(), router_ED.contiguous(), k, bias_E, expert_mask_E,
            mask_mode == "reroute", renormalize)
    return args, {}


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
):
    """Top-k routing with an optional expert mask and per-expert logit bias.

    Returns ``weights_TK`` (float32, float64 for float64 input), ``experts_TK`` (int32) and
    ``logits_TE`` (float32/float64, bias added, mask not applied). Differentiable in x, router, bias.
    Fewer active experts than k: see the module docstring (weight 0, never NaN).
    """
    args, _ = _route_arguments(x_TD, router_ED, k, bias_E, expert_mask_E, mask_mode, renormalize)
    return _route_op(*args, _backend.requested(backend))
