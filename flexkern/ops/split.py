"""The experts op split in three: permute -> experts_swiglu_grouped -> unpermute.

Shapes: T tokens, D d_model, F expert width, E experts, K top-k, N routed-row capacity.

    permute(x_TD, dispatch)                      x_ND[r] = x[token_of_row[r]]    (rows in expert order)
    experts_swiglu_grouped(x_ND, w..., offsets)  o_ND[r] = down_e(silu(gate_e x_r) * up_e x_r)
                                                 for the rows r of expert e; rows past offsets[E]: 0
    unpermute(o_ND, dispatch, weights_TK)        y_t = sum_k weights[t, k] * o[row_of_slot[t, k]]

Chained on one dispatch they equal the fused ``experts_swiglu`` (which stays the single-device
default: it never materialises x_ND or o_ND). The split exists for expert parallelism, where rows
travel between ranks between the three steps (``flexkern.distributed``).

Backward: permute's is a gather-sum of the row gradients over the K slots of each token, and
unpermute's gives d o (router weight times dy of the row's token) and d weights (<o_row, dy_t>);
both deterministic gathers, no atomics, no host synchronisation. ``experts_swiglu_grouped`` is
``experts_swiglu`` on the identity dispatch of rows already in expert order (row r is "token" r,
one slot, weight 1): it runs whichever ``experts_swiglu`` backend is selected (reference, Triton)
forward and backward unchanged, frozen experts included (no dW work for them).
"""
from __future__ import annotations

import torch

from . import backend as _backend
from .checks import FLOAT_DTYPES, can_read_values, check_shape, check_tensor
from .dispatch import Dispatch, _offsets_problem, check_dispatch
from .experts import _combine, _experts_bwd_op, _experts_op
from .route import compute_dtype


# ---- references --------------------------------------------------------------------------------
def permute_ref(x_TD, token_of_row_N, row_of_slot_TK):
    """x_ND: row r holds x[token_of_row[r]]; rows past the routed ones (token -1) are zero."""
    used_N1 = (token_of_row_N >= 0)[:, None]
    return torch.where(used_N1, x_TD[token_of_row_N.clamp_min(0).long()], 0)


def permute_bwd_ref(dx_ND, token_of_row_N, row_of_slot_TK):
    """dx_TD[t] = sum over the slots of t that have a row of dx_ND[row] (a gather-sum)."""
    ones_TK = torch.ones(row_of_slot_TK.shape, dtype=compute_dtype(dx_ND.dtype), device=dx_ND.device)
    return _combine(dx_ND, row_of_slot_TK, ones_TK, dx_ND.dtype)


def unpermute_ref(o_ND, slot_of_row_N, row_of_slot_TK, weights_TK):
    """y_TD = router-weighted gather-sum of o's rows over the K slots of each token."""
    return _combine(o_ND, row_of_slot_TK, weights_TK, o_ND.dtype)


def unpermute_bwd_ref(dy_TD, o_ND, token_of_row_N, slot_of_row_N, row_of_slot_TK, weights_TK):
    """Returns (d o_ND, d weights_TK): d o_r = weights[slot(r)] dy[token(r)], d w_tk = <o_row, dy_t>."""
    cd = compute_dtype(o_ND.dtype)
    used_N1 = (slot_of_row_N >= 0)[:, None]
    w_N = weights_TK.reshape(-1)[slot_of_row_N.clamp_min(0).long()].to(cd)
    dy_ND = dy_TD[token_of_row_N.clamp_min(0).long()].to(cd)
    do_ND = torch.where(used_N1, dy_ND * w_N[:, None], 0).to(o_ND.dtype)
    valid_TK = row_of_slot_TK >= 0
    o_TKD = o_ND[row_of_slot_TK.clamp_min(0).long()].to(cd)
    d_w_TK = torch.where(valid_TK, (o_TKD * dy_TD.to(cd)[:, None, :]).sum(-1), 0)
    return do_ND, d_w_TK.to(weights_TK.dtype)


_backend.register("permute", "reference", permute_ref)
_backend.register("permute_backward", "reference", permute_bwd_ref)
_backend.register("unpermute", "reference", unpermute_ref)
_backend.register("unpermute_backward", "reference", unpermute_bwd_ref)


def identity_rows(offsets_E1: torch.Tensor, N: int):
    """The dispatch of N rows already in expert order (row r is token r, one slot, weight 1):
    (offsets_E1, token_of_row_N, slot_of_row_N, row_of_slot_N1, weights_N1), -1 past offsets[E].
    The offsets are clamped on the device into a valid layout (``Dispatch.from_offsets`` without
    a host read), so no offsets can make a kernel read past the N rows."""
    # Dispatch.from_offsets(validate=False) does the same, but N may be symbolic in a traced backward.
    offsets_E1 = torch.cummax(offsets_E1.clamp(0, N), 0).values
    offsets_E1 = torch.cat([offsets_E1.new_zeros(1), offsets_E1[1:]])
    r_N = torch.arange(N, device=offsets_E1.device)
    rows_N = torch.where(r_N < offsets_E1[-1], r_N, -1).to(torch.int32)
    weights_N1 = torch.ones((N, 1), dtype=torch.float32, device=offsets_E1.device)
    return offsets_E1, rows_N, rows_N, rows_N.view(N, 1), weights_N1


# ---- permute -----------------------------------------------------------------------------------
@torch.library.custom_op("flexkern::permute", mutates_args=())
def _permute_op(x_TD: torch.Tensor, token_of_row_N: torch.Tensor, row_of_slot_TK: torch.Tensor,
                backend: str) -> torch.Tensor:
    _, fn = _backend.lookup("permute", backend, x_TD.device)
    return fn(x_TD, token_of_row_N, row_of_slot_TK)


@_permute_op.register_fake
def _(x_TD, token_of_row_N, row_of_slot_TK, backend):
    return x_TD.new_empty((token_of_row_N.shape[0], x_TD.shape[1]))


@torch.library.custom_op("flexkern::permute_backward", mutates_args=())
def _permute_bwd_op(dx_ND: torch.Tensor, token_of_row_N: torch.Tensor, row_of_slot_TK: torch.Tensor,
                    backend: str) -> torch.Tensor:
    _, fn = _backend.lookup("permute_backward", backend, dx_ND.device)
    return fn(dx_ND.contiguous(), token_of_row_N, row_of_slot_TK)


@_permute_bwd_op.register_fake
def _(dx_ND, token_of_row_N, row_of_slot_TK, backend):
    return dx_ND.new_empty((row_of_slot_TK.shape[0], dx_ND.shape[1]))


def _permute_setup(ctx, inputs, output):
    _, token_of_row_N, row_of_slot_TK, backend = inputs
    ctx.save_for_backward(token_of_row_N, row_of_slot_TK)
    ctx.backend = backend


def _permute_backward(ctx, dx_ND):
    token_of_row_N, row_of_slot_TK = ctx.saved_tensors
    return _permute_bwd_op(dx_ND, token_of_row_N, row_of_slot_TK, ctx.backend), None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


# ---- unpermute ---------------------------------------------------------------------------------
@torch.library.custom_op("flexkern::unpermute", mutates_args=())
def _unpermute_op(o_ND: torch.Tensor, token_of_row_N: torch.Tensor, slot_of_row_N: torch.Tensor,
                  row_of_slot_TK: torch.Tensor, weights_TK: torch.Tensor, backend: str) -> torch.Tensor:
    _, fn = _backend.lookup("unpermute", backend, o_ND.device)
    return fn(o_ND, slot_of_row_N, row_of_slot_TK, weights_TK)


@_unpermute_op.register_fake
def _(o_ND, token_of_row_N, slot_of_row_N, row_of_slot_TK, weights_TK, backend):
    return o_ND.new_empty((row_of_slot_TK.shape[0], o_ND.shape[1]))


@torch.library.custom_op("flexkern::unpermute_backward", mutates_args=())
def _unpermute_bwd_op(dy_TD: torch.Tensor, o_ND: torch.Tensor, token_of_row_N: torch.Tensor,
                      slot_of_row_N: torch.Tensor, row_of_slot_TK: torch.Tensor,
                      weights_TK: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, fn = _backend.lookup("unpermute_backward", backend, o_ND.device)
    return fn(dy_TD.contiguous(), o_ND, token_of_row_N, slot_of_row_N, row_of_slot_TK, weights_TK)


@_unpermute_bwd_op.register_fake
def _(dy_TD, o_ND, token_of_row_N, slot_of_row_N, row_of_slot_TK, weights_TK, backend):
    return torch.empty_like(o_ND), torch.empty_like(weights_TK)


def _unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.backend = inputs[5]


def _unpermute_backward(ctx, dy_TD):
    do_ND, d_w_TK = _unpermute_bwd_op(dy_TD, *ctx.saved_tensors, ctx.backend)
    return do_ND, None, None, None, d_w_TK, None


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# ---- grouped experts ---------------------------------------------------------------------------
@torch.library.custom_op("flexkern::experts_swiglu_grouped", mutates_args=())
def _grouped_op(x_ND: torch.Tensor, w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor,
                w_down_EDF: torch.Tensor, offsets_E1: torch.Tensor, frozen_E: torch.Tensor | None,
                backend: str, save_activations: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (o_ND, g_NF, u_NF): the fused op on the identity dispatch (see the module docstring)."""
    rows = identity_rows(offsets_E1, x_ND.shape[0])
    return _experts_op(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, *rows, frozen_E, backend, save_activations)


@_grouped_op.register_fake
def _(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, frozen_E, backend, save_activations):
    shape_NF = (x_ND.shape[0] if save_activations else 0, w_gate_EFD.shape[1])
    return torch.empty_like(x_ND), x_ND.new_empty(shape_NF), x_ND.new_empty(shape_NF)


def _grouped_setup(ctx, inputs, output):
    _, g_NF, u_NF = output
    ctx.mark_non_differentiable(g_NF, u_NF)
    ctx.save_for_backward(*inputs[:6], g_NF, u_NF)
    ctx.backend, ctx.saved_activations = inputs[6], inputs[7]


def _grouped_backward(ctx, do_ND, _dg, _du):
    x_ND, w_gate, w_up, w_down, offsets_E1, frozen_E, g_NF, u_NF = ctx.saved_tensors
    if not ctx.saved_activations:
        g_NF = u_NF = None
    rows = identity_rows(offsets_E1, x_ND.shape[0])
    dx, d_gate, d_up, d_down, _ = _experts_bwd_op(
        do_ND, x_ND, w_gate, w_up, w_down, *rows, frozen_E, ctx.backend, g_NF, u_NF)
    return dx, d_gate, d_up, d_down, None, None, None, None


_grouped_op.register_autograd(_grouped_backward, setup_context=_grouped_setup)


# ---- public functions --------------------------------------------------------------------------
def _check_dispatch(dispatch, T: int, K: int | None, device) -> tuple[torch.Tensor, ...]:
    """The dispatch's tensors, checked like experts_swiglu checks them (a hand-built Dispatch by
    value too, one host read; a library-built one is trusted)."""
    if not isinstance(dispatch, Dispatch):
        raise TypeError(f"dispatch must be a flexkern.Dispatch, got {type(dispatch).__name__}")
    rows = dispatch.row_of_slot_TK
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        raise ValueError("dispatch.row_of_slot_TK must be a (T, K) tensor")
    Td, Kd = rows.shape
    if Td != T or (K is not None and Kd != K):
        raise ValueError(f"dispatch is for {Td} tokens x {Kd} slots, got {T} tokens"
                         + ("" if K is None else f" x {K} slots"))
    return check_dispatch(dispatch, Td, Kd, dispatch.num_experts, device)


def permute(x_TD: torch.Tensor, dispatch: Dispatch, backend: str | None = None) -> torch.Tensor:
    """Rows of x in the dispatch's expert order: x_ND (N = T*K, x's dtype); rows past the routed
    ones are zero. Differentiable in x."""
    check_tensor("x", x_TD, ndim=2, dtypes=FLOAT_DTYPES)
    _, token_of_row_N, _, row_of_slot_TK = _check_dispatch(dispatch, x_TD.shape[0], None, x_TD.device)
    return _permute_op(x_TD.contiguous(), token_of_row_N, row_of_slot_TK, _backend.requested(backend))


def unpermute(o_ND: torch.Tensor, dispatch: Dispatch, weights_TK: torch.Tensor,
              backend: str | None = None) -> torch.Tensor:
    """y_TD (o's dtype) = sum over the K slots of each token of weights[t, k] * o[row_of_slot[t, k]];
    dropped slots add nothing. The sum runs in float32 (float64 for float64). Differentiable in
    o and the router weights."""
    check_tensor("o", o_ND, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weights", weights_TK, ndim=2, dtypes=FLOAT_DTYPES, device=o_ND.device)
    T, K = weights_TK.shape
    tensors = _check_dispatch(dispatch, T, K, o_ND.device)
    check_shape("o", o_ND, (T * K, o_ND.shape[1]))
    return _unpermute_op(o_ND.contiguous(), *tensors[1:], weights_TK.contiguous(), _backend.requested(backend))


def offsets_from_counts(counts_E: torch.Tensor) -> torch.Tensor:
    """int64 (E+1,) offsets [0, c0, c0+c1, ...] of per-expert row counts (any integer dtype, the
    engines' int32 too), on the counts' device, without a host read."""
    check_tensor("counts", counts_E, ndim=1, dtypes=_INDEX_DTYPES)
    return torch.cat([counts_E.new_zeros(1, dtype=torch.int64), counts_E.cumsum(0, dtype=torch.int64)])


_INDEX_DTYPES = (torch.int64, torch.int32)


def experts_swiglu_grouped(
    x_ND: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    offsets_E1: torch.Tensor,
    frozen_E: torch.Tensor | None = None,
    backend: str | None = None,
    recompute_activations: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """SwiGLU experts on rows already grouped by expert: rows [offsets[e], offsets[e+1]) go
    through expert e. Returns o_ND (x's dtype), one row per input row, zero past offsets[E].

    offsets_E1: int64 or int32 (E+1,), non-decreasing from 0 to at most N (``offsets_from_counts``
    builds them from per-expert counts). ``validate`` checks that (one device-to-host read, a
    ValueError otherwise; skipped while compiling or capturing a CUDA graph); without it, offsets
    are clamped on the device into a valid layout, never read past the N rows. The weights are
    read through their strides, as views (an engine's flattened or transposed layout): no copy
    is made. ``frozen_E`` and ``recompute_activations`` as in ``experts_swiglu``."""
    check_tensor("x", x_ND, ndim=2, dtypes=FLOAT_DTYPES)
    dev, dt = x_ND.device, x_ND.dtype
    for name, w in (("w_gate", w_gate_EFD), ("w_up", w_up_EFD), ("w_down", w_down_EDF)):
        check_tensor(name, w, ndim=3, dtypes=(dt,), device=dev)
    E, Fw, D = w_gate_EFD.shape
    if D != x_ND.shape[1]:
        raise ValueError(f"w_gate has width {D} but x has width {x_ND.shape[1]}")
    check_shape("w_up", w_up_EFD, (E, Fw, D))
    check_shape("w_down", w_down_EDF, (E, D, Fw))
    check_tensor("offsets", offsets_E1, ndim=1, dtypes=_INDEX_DTYPES, device=dev)
    check_shape("offsets", offsets_E1, (E + 1,))
    offsets_E1 = offsets_E1.to(torch.int64)  # E+1 values; a no-op for int64
    if frozen_E is not None:
        check_tensor("frozen", frozen_E, ndim=1, dtypes=(torch.bool,), device=dev)
        check_shape("frozen", frozen_E, (E,))
    if validate and can_read_values(offsets_E1):
        bad = _offsets_problem(offsets_E1, x_ND.shape[0])
        if bad:
            raise ValueError(f"offsets {bad}")
    save = not recompute_activations and torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_ND, w_gate_EFD, w_up_EFD, w_down_EDF))
    o_ND, _, _ = _grouped_op(x_ND.contiguous(), w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1,
                             frozen_E, _backend.requested(backend), save)
    return o_ND
