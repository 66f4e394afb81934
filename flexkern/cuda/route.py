"""route on CUDA: logits by cuBLAS (torch), then one fused kernel for the scores (softmax or
sigmoid), mask, score bias, group limit, top-k, renormalisation and scaling (csrc/route.cu).
Same signature and results as ``flexkern.ops.route.route_ref``."""
from __future__ import annotations

import torch

from flexkern import _C
from flexkern.ops.route import router_logits_ref

from ._launch import device_and_stream, ptr

_KERNEL_DTYPES = {torch.float32: _C.FLOAT32, torch.float16: _C.FLOAT16, torch.bfloat16: _C.BFLOAT16}
_SCORINGS = {"softmax": 0, "sigmoid": 1}


def supports_route(x_TD, router_ED, k, bias_E=None, mask_E=None, reroute=True, renormalize=False, *,
                   scoring="softmax", score_bias_E=None, n_group=1, topk_group=1, routed_scaling=1.0):
    """None when the fused kernel covers these inputs, else why not (registered with the seam)."""
    if x_TD.dtype == torch.float64:
        return "float64 routing runs on the reference"
    if router_ED.shape[0] > _C.ROUTE_MAX_EXPERTS:
        return f"{router_ED.shape[0]} experts > {_C.ROUTE_MAX_EXPERTS}"
    if k > _C.ROUTE_MAX_TOP_K:
        return f"top_k {k} > {_C.ROUTE_MAX_TOP_K}"
    if n_group > _C.ROUTE_MAX_GROUPS:
        return f"n_group {n_group} > {_C.ROUTE_MAX_GROUPS}"
    return None


def route_topk(logits_TE, k, mask_E=None, reroute=True, renormalize=False, bias_E=None,
               lse_T=None, counts_E=None, *, scoring="softmax", score_bias_E=None, n_group=1,
               topk_group=1, routed_scaling=1.0):
    """Gate of precomputed logits: returns (weights_TK float32, experts_TK int32).

    logits_TE: (T, E) float32/float16/bfloat16 CUDA; bias_E: (E,) added first; mask_E: (E,)
    bool; score_bias_E: (E,) added to the scores for the choice only; lse_T: optional (T,) float32
    output, logsumexp of logits + bias (mask not applied); counts_E: optional (E,) int32 output,
    incremented by the picks of each expert. The other settings as in ``flexkern.route``.
    """
    if logits_TE.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"route_topk takes float32/float16/bfloat16 logits, got {logits_TE.dtype}")
    T, E = logits_TE.shape
    logits_TE = logits_TE.contiguous()
    bias_E = None if bias_E is None else bias_E.to(torch.float32).contiguous()
    score_bias_E = None if score_bias_E is None else score_bias_E.to(torch.float32).contiguous()
    dev = logits_TE.device
    weights_TK = torch.empty(T, k, dtype=torch.float32, device=dev)
    experts_TK = torch.empty(T, k, dtype=torch.int32, device=dev)
    mask_E = None if mask_E is None else mask_E.contiguous()
    guard, stream = device_and_stream(logits_TE)
    with guard:
        _C.route_topk(ptr(logits_TE), _KERNEL_DTYPES[logits_TE.dtype], ptr(bias_E), ptr(mask_E),
                      T, E, k, reroute, renormalize, ptr(weights_TK), ptr(experts_TK), ptr(lse_T),
                      ptr(counts_E), stream, _SCORINGS[scoring], ptr(score_bias_E), n_group,
                      topk_group, float(routed_scaling))
    return weights_TK, experts_TK


def router_logits(x_TD, router_ED, bias_E=None):
    """float32 logits. For bf16/fp16 inputs the GEMM runs on the tensor cores with a float32
    output (same products, float32 accumulation) instead of upcasting x to float32 first, which
    costs a full extra pass over x and a float32 GEMM."""
    if x_TD.dtype in (torch.bfloat16, torch.float16) and router_ED.dtype == x_TD.dtype:
        try:
            logits_TE = torch.mm(x_TD, router_ED.t(), out_dtype=torch.float32)
        except TypeError:  # a torch without mm(..., out_dtype)
            return router_logits_ref(x_TD, router_ED, bias_E)
        return logits_TE if bias_E is None else logits_TE.add_(bias_E.float())
    return router_logits_ref(x_TD, router_ED, bias_E)


def route_cuda(x_TD, router_ED, k, bias_E=None, mask_E=None, reroute=True, renormalize=False, **gate):
    """Drop-in for ``route_ref`` on the inputs ``supports_route`` accepts: returns
    (weights_TK, experts_TK int32, logits_TE)."""
    logits_TE = router_logits(x_TD, router_ED, bias_E)
    weights_TK, experts_TK = route_topk(logits_TE, k, mask_E, reroute, renormalize, **gate)
    return weights_TK, experts_TK, logits_TE
