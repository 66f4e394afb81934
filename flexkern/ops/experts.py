"""experts_swiglu: grouped SwiGLU expert MLP over dispatched rows, with the weighted combine.

Shapes: T tokens, D d_model, F expert width, E experts, K top-k, N = T*K row capacity.

    for every routed row r of expert e (token t = token_of_row[r]):
        h_r = silu(x_t @ w_gate[e]^T) * (x_t @ w_up[e]^T)          (F,)
        o_r = h_r @ w_down[e]^T                                     (D,)
    y_t = sum over the K slots of t that have a row: weights[t, k] * o_{row_of_slot[t, k]}

The combine is a gather-sum over K (deterministic, no atomics). Experts with no rows (masked, or
simply not chosen) are never read. The backward gives dx, d w_gate/w_up/w_down (zero, and not
computed, for experts marked in ``frozen_E``) and d weights.

Saved activations: with ``save_activations`` the forward also returns the pre-activations
g_NF = x[token] w_gate^T and u_NF = x[token] w_up^T (x's dtype, rows past offsets[E] unspecified),
and the backward given them skips the two GEMMs that would recompute them. Without it they are
(0, F) tensors and the backward recomputes g and u from x.

The reference here works on any device: on the CPU it loops over the experts that have rows; on
CUDA it stays free of host synchronisation by running every expert over all N rows and selecting
(an oracle, E times the work — the Triton backend is the fast path there).

Weights may be strided views (a slice of a fused gate_up tensor, a transposed layout): every
backend reads them as they are, with no per-call copy, and the weight gradients come back
contiguous. x, weights_TK and the dispatch tensors are made contiguous (copies only if they are
not). K = 0 or N = 0 rows gives y = 0 on every backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend as _backend
from .checks import FLOAT_DTYPES, check_shape, check_tensor
from .dispatch import Dispatch, check_dispatch
from .route import compute_dtype


class _Rows:
    """The rows of one expert: an index on the CPU, a row mask over all N rows on CUDA."""

    def __init__(self, index=None, select_N=None):
        self.index, self.select_N = index, select_N

    def take(self, src_N):
        if self.index is not None:
            return src_N[self.index]
        return torch.where(self.select_N[:, None], src_N, 0)

    def put(self, dst_N, val):
        if self.index is not None:
            dst_N[self.index] = val
            return dst_N
        return torch.where(self.select_N[:, None], val, dst_N)

    def zero_outside(self, val):
        return val if self.index is not None else torch.where(self.select_N[:, None], val, 0)


def _sync_free(offsets_E1, sync_free):
    return offsets_E1.device.type != "cpu" if sync_free is None else sync_free


def _expert_rows(offsets_E1, N, sync_free):
    """Yield (e, _Rows) for the experts that can have rows."""
    E = offsets_E1.shape[0] - 1
    if not sync_free:
        offs = offsets_E1.tolist()
        for e in range(E):
            if offs[e + 1] > offs[e]:
                yield e, _Rows(index=torch.arange(offs[e], offs[e + 1]))
    else:
        r_N = torch.arange(N, device=offsets_E1.device)
        for e in range(E):
            yield e, _Rows(select_N=(r_N >= offsets_E1[e]) & (r_N < offsets_E1[e + 1]))


def _gather_x(x_TD, token_of_row_N):
    return x_TD[token_of_row_N.clamp_min(0).long()]


def _combine(o_ND, row_of_slot_TK, weights_TK, out_dtype):
    cd = compute_dtype(out_dtype)
    valid_TK1 = (row_of_slot_TK >= 0)[..., None]
    o_TKD = torch.where(valid_TK1, o_ND[row_of_slot_TK.clamp_min(0).long()].to(cd), 0)
    return (o_TKD * weights_TK.to(cd)[..., None]).sum(1).to(out_dtype)


def experts_fwd_ref(x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, token_of_row_N,
                    slot_of_row_N, row_of_slot_TK, weights_TK, frozen_E, sync_free=None, *,
                    save_activations=False):
    """Reference forward. Returns (y_TD, g_NF, u_NF), all in x's dtype; g_NF, u_NF are the gate
    and up pre-activations of every row when ``save_activations``, else (0, F) tensors.

    ``sync_free`` picks the loop (False) or the select-over-all-rows (True) formulation; by
    default the loop on the CPU and select on CUDA."""
    N, D, Fw = token_of_row_N.shape[0], x_TD.shape[1], w_gate_EFD.shape[1]
    x_ND = _gather_x(x_TD, token_of_row_N)
    o_ND = x_TD.new_zeros((N, D))
    g_NF, u_NF = (x_TD.new_zeros((N if save_activations else 0, Fw)) for _ in range(2))
    for e, rows in _expert_rows(offsets_E1, N, _sync_free(offsets_E1, sync_free)):
        x_rD = rows.take(x_ND)
        g_rF, u_rF = x_rD @ w_gate_EFD[e].t(), x_rD @ w_up_EFD[e].t()
        if save_activations:
            g_NF, u_NF = rows.put(g_NF, g_rF), rows.put(u_NF, u_rF)
        o_ND = rows.put(o_ND, (F.silu(g_rF) * u_rF) @ w_down_EDF[e].t())
    return _combine(o_ND, row_of_slot_TK, weights_TK, x_TD.dtype), g_NF, u_NF


def experts_bwd_ref(dy_TD, x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, token_of_row_N,
                    slot_of_row_N, row_of_slot_TK, weights_TK, frozen_E, sync_free=None, *,
                    g_NF=None, u_NF=None):
    """Returns (dx_TD, d_w_gate, d_w_up, d_w_down, d_weights_TK).

    g_NF, u_NF (N, F), x's dtype: the forward's saved pre-activations, used instead of
    recomputing them (both or neither)."""
    sync_free = _sync_free(offsets_E1, sync_free)
    dt, cd = x_TD.dtype, compute_dtype(x_TD.dtype)
    N, (T, K), D = token_of_row_N.shape[0], row_of_slot_TK.shape, x_TD.shape[1]
    saved = check_saved_activations(g_NF, u_NF, N, w_gate_EFD.shape[1], dt)
    used_N1 = (slot_of_row_N >= 0)[:, None]
    x_ND = _gather_x(x_TD, token_of_row_N)
    # d o_r = weights[slot(r)] * dy[token(r)]
    w_N = weights_TK.reshape(-1)[slot_of_row_N.clamp_min(0).long()].to(cd)
    do_ND = torch.where(used_N1, dy_TD[token_of_row_N.clamp_min(0).long()].to(cd) * w_N[:, None], 0).to(dt)
    o_ND = x_TD.new_zeros((N, D))
    dx_ND = x_TD.new_zeros((N, D))
    # Contiguous gradients whatever the weights' strides (the fake implementation says so too).
    d_gate, d_up, d_down = (w.new_zeros(w.shape) for w in (w_gate_EFD, w_up_EFD, w_down_EDF))
    frozen = frozen_E.tolist() if frozen_E is not None and not sync_free else None
    for e, rows in _expert_rows(offsets_E1, N, sync_free):
        x_rD, do_rD = rows.take(x_ND), rows.take(do_ND)
        if saved:
            g_rF, u_rF = rows.take(g_NF).to(cd), rows.take(u_NF).to(cd)
        else:
            g_rF = (x_rD @ w_gate_EFD[e].t()).to(cd)
            u_rF = (x_rD @ w_up_EFD[e].t()).to(cd)
        sig = torch.sigmoid(g_rF)
        silu_rF = g_rF * sig
        h_rF = rows.zero_outside((silu_rF * u_rF).to(dt))
        o_ND = rows.put(o_ND, h_rF @ w_down_EDF[e].t())
        dh_rF = (do_rD @ w_down_EDF[e]).to(cd)
        dg_rF = rows.zero_outside((dh_rF * u_rF * sig * (1 + g_rF * (1 - sig))).to(dt))
        du_rF = rows.zero_outside((dh_rF * silu_rF).to(dt))
        dx_ND = rows.put(dx_ND, dg_rF @ w_gate_EFD[e] + du_rF @ w_up_EFD[e])
        if frozen is not None and frozen[e]:
            continue  # frozen expert: no weight-gradient work at all
        d_down[e] = (do_rD.t().to(cd) @ h_rF.to(cd)).to(dt)
        d_gate[e] = (dg_rF.t().to(cd) @ x_rD.to(cd)).to(dt)
        d_up[e] = (du_rF.t().to(cd) @ x_rD.to(cd)).to(dt)
    if frozen_E is not None and frozen is None:  # CUDA: select instead of skipping
        keep = ~frozen_E[:, None, None]
        d_gate, d_up, d_down = (torch.where(keep, d, 0) for d in (d_gate, d_up, d_down))
    valid_TK = row_of_slot_TK >= 0
    rows_TK = row_of_slot_TK.clamp_min(0).long()
    dy_T1D = dy_TD.to(cd)[:, None, :]
    d_weights_TK = torch.where(valid_TK, (o_ND[rows_TK].to(cd) * dy_T1D).sum(-1), 0)
    dx_TD = torch.where(valid_TK[..., None], dx_ND[rows_TK].to(cd), 0).sum(1).to(dt)
    return dx_TD, d_gate, d_up, d_down, d_weights_TK.to(weights_TK.dtype)


def check_saved_activations(g_NF, u_NF, N: int, F: int, dtype: torch.dtype) -> bool:
    """True when the backward got the forward's g_NF, u_NF (N, F) in ``dtype``; False for neither."""
    if g_NF is None and u_NF is None:
        return False
    if g_NF is None or u_NF is None:
        raise ValueError("give both g_NF and u_NF, or neither")
    for name, t in (("g_NF", g_NF), ("u_NF", u_NF)):
        if t.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
        if tuple(t.shape) != (N, F):
            raise ValueError(f"{name} must have shape ({N}, {F}), got {tuple(t.shape)}")
    return True


_backend.register("experts_swiglu", "reference", experts_fwd_ref)
_backend.register("experts_swiglu_backward", "reference", experts_bwd_ref)


@torch.library.custom_op("flexkern::experts_swiglu", mutates_args=())
def _experts_op(
    x_TD: torch.Tensor, w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
    offsets_E1: torch.Tensor, token_of_row_N: torch.Tensor, slot_of_row_N: torch.Tensor,
    row_of_slot_TK: torch.Tensor, weights_TK: torch.Tensor, frozen_E: torch.Tensor | None, backend: str,
    save_activations: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y_TD, g_NF, u_NF); g_NF, u_NF are (0, F) unless ``save_activations``."""
    args = (x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, token_of_row_N, slot_of_row_N,
            row_of_slot_TK, weights_TK, frozen_E)
    _, fn = _backend.lookup("experts_swiglu", backend, *args, save_activations=save_activations)
    return fn(*args, save_activations=save_activations)


@_experts_op.register_fake
def _(x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, token_of_row_N, slot_of_row_N,
      row_of_slot_TK, weights_TK, frozen_E, backend, save_activations):
    rows = token_of_row_N.shape[0] if save_activations else 0
    shape_NF = (rows, w_gate_EFD.shape[1])
    return torch.empty_like(x_TD), x_TD.new_empty(shape_NF), x_TD.new_empty(shape_NF)


@torch.library.custom_op("flexkern::experts_swiglu_backward", mutates_args=())
def _experts_bwd_op(
    dy_TD: torch.Tensor, x_TD: torch.Tensor, w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor, offsets_E1: torch.Tensor, token_of_row_N: torch.Tensor,
    slot_of_row_N: torch.Tensor, row_of_slot_TK: torch.Tensor, weights_TK: torch.Tensor,
    frozen_E: torch.Tensor | None, backend: str, g_NF: torch.Tensor | None = None,
    u_NF: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """g_NF, u_NF: the forward's saved pre-activations, or None to recompute them."""
    args = (dy_TD.contiguous(), x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1,
            token_of_row_N, slot_of_row_N, row_of_slot_TK, weights_TK, frozen_E)
    _, fn = _backend.lookup("experts_swiglu_backward", backend, *args, g_NF=g_NF, u_NF=u_NF)
    return fn(*args, g_NF=g_NF, u_NF=u_NF)


@_experts_bwd_op.register_fake
def _(dy_TD, x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, token_of_row_N, slot_of_row_N,
      row_of_slot_TK, weights_TK, frozen_E, backend, g_NF=None, u_NF=None):
    return (torch.empty_like(x_TD), w_gate_EFD.new_empty(w_gate_EFD.shape),
            w_up_EFD.new_empty(w_up_EFD.shape), w_down_EDF.new_empty(w_down_EDF.shape),
            torch.empty_like(weights_TK))


def _setup_context(ctx, inputs, output):
    (x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, token_of_row_N, slot_of_row_N,
     row_of_slot_TK, weights_TK, frozen_E, backend, save_activations) = inputs
    _, g_NF, u_NF = output
    ctx.mark_non_differentiable(g_NF, u_NF)  # saved for the backward, not an output of the layer
    ctx.save_for_backward(x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, token_of_row_N,
                          slot_of_row_N, row_of_slot_TK, weights_TK, frozen_E, g_NF, u_NF)
    ctx.backend, ctx.saved_activations = backend, save_activations


def _backward(ctx, dy_TD, _dg_NF, _du_NF):
    (x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, token_of_row_N, slot_of_row_N,
     row_of_slot_TK, weights_TK, frozen_E, g_NF, u_NF) = ctx.saved_tensors
    if not ctx.saved_activations:
        g_NF = u_NF = None
    dx, d_gate, d_up, d_down, d_weights = _experts_bwd_op(
        dy_TD, x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, token_of_row_N, slot_of_row_N,
        row_of_slot_TK, weights_TK, frozen_E, ctx.backend, g_NF, u_NF)
    # One gradient per op input: x, w_gate, w_up, w_down, the 4 dispatch tensors, weights,
    # frozen, backend, save_activations.
    return dx, d_gate, d_up, d_down, None, None, None, None, d_weights, None, None, None


_experts_op.register_autograd(_backward, setup_context=_setup_context)


def _experts_arguments(x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, dispatch, weights_TK,
                       frozen_E=None, recompute_activations=False):
    """Check the public arguments (a hand-built Dispatch also by value, see ``Dispatch``);
    returns the backend functions' (args, kwargs). Weights are passed as they are (no copy)."""
    check_tensor("x", x_TD, ndim=2, dtypes=FLOAT_DTYPES)
    dev, dt = x_TD.device, x_TD.dtype
    T, D = x_TD.shape
    for name, w in (("w_gate", w_gate_EFD), ("w_up", w_up_EFD), ("w_down", w_down_EDF)):
        check_tensor(name, w, ndim=3, dtypes=(dt,), device=dev)
    E, Fw, Dw = w_gate_EFD.shape
    if Dw != D:
        raise ValueError(f"w_gate has width {Dw} but x has width {D}")
    check_shape("w_up", w_up_EFD, (E, Fw, D))
    check_shape("w_down", w_down_EDF, (E, D, Fw))
    if not isinstance(dispatch, Dispatch):
        raise TypeError(f"dispatch must be a flexkern.Dispatch, got {type(dispatch).__name__}")
    check_tensor("weights", weights_TK, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    K = weights_TK.shape[1]
    check_shape("weights", weights_TK, (T, K))
    disp = check_dispatch(dispatch, T, K, E, dev)
    if frozen_E is not None:
        check_tensor("frozen", frozen_E, ndim=1, dtypes=(torch.bool,), device=dev)
        check_shape("frozen", frozen_E, (E,))
    # Keep g and u for the backward only when there will be one.
    save = not recompute_activations and torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, weights_TK))
    args = (x_TD.contiguous(), w_gate_EFD, w_up_EFD, w_down_EDF, *disp, weights_TK.contiguous(),
            frozen_E)
    return args, {"save_activations": save}


_backend.register_arguments("experts_swiglu", _experts_arguments)


def experts_swiglu(
    x_TD: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    dispatch: Dispatch,
    weights_TK: torch.Tensor,
    frozen_E: torch.Tensor | None = None,
    backend: str | None = None,
    recompute_activations: bool = False,
) -> torch.Tensor:
    """Grouped SwiGLU experts with the router-weighted combine. Returns y_TD in x's dtype.

    ``frozen_E`` (bool, E) marks experts whose weight gradients are not wanted: the backward
    returns zeros for them without computing anything.
    When a gradient will be taken (grad mode on and an input requires grad), the forward keeps
    the pre-activations g, u (two N x F tensors in x's dtype, N = T*K) so the backward does not
    recompute them. ``recompute_activations=True`` keeps nothing and recomputes them instead:
    less activation memory (2·N·F elements) for two more grouped GEMMs in the backward.
    The weights may be strided views (no copy is made); ``dispatch`` comes from
    ``flexkern.dispatch`` or ``Dispatch.from_offsets`` (a hand-built one is checked first).
    """
    args, kwargs = _experts_arguments(x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, dispatch, weights_TK,
                                      frozen_E, recompute_activations)
    y_TD, _, _ = _experts_op(*args, _backend.requested(backend), kwargs["save_activations"])
    return y_TD
