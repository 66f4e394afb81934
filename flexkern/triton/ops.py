"""Triton backend of experts_swiglu: buffers, launches, and the two registered functions.

Forward (three launches, no host synchronisation, every buffer sized by shapes only):
    h_NF = silu(x[token] w_gate^T) * (x[token] w_up^T)      grouped_gemm MODE_SWIGLU, gathered x
                                                           (save_activations: also g_NF, u_NF)
    o_ND = h_NF w_down^T                                    grouped_gemm MODE_PLAIN
    y_TD = sum_k weights[t, k] o[row_of_slot[t, k]]         gather_sum (fp32, no atomics)
Backward (six launches):
    h, dg, du, partial d weights                            recompute_kernel (h from saved or recomputed g, u)
    d w_down = (weights dy[token])^T h                      wgrad_kernel
    dx_ND = dg w_gate + du w_up;  dx_TD = sum_k dx rows     grouped_gemm MODE_DUAL + gather_sum
    d weights = sum over F tiles of the partials            slot_sum_kernel
    d w_gate, d w_up = dg^T x[token], du^T x[token]         wgrad_kernel (frozen experts: zeros only)

Given the forward's g_NF, u_NF (save_activations=True) the backward loads them, and fwd+bwd
costs 18 N·D·F FLOPs for 2 N x F activations held between the passes. Without them it recomputes
g and u (two more GEMM passes, 22 N·D·F FLOPs) and holds no activation.

Setting FLEXKERN_TRITON_POISON=1 fills every buffer with NaN before the kernels write it (tests).
What this backend runs is declared by ``supports_experts`` (registered with the op): float32,
float16 and bfloat16 (not bfloat16 in the interpreter, which computes it wrongly), one expert's
weight within 2^31 elements of its start. Anything else the seam sends to another backend; these
functions never call the reference. Weights are read through their strides (views, no copies);
x and the dispatch tensors must be contiguous (the op makes them so).
"""
from __future__ import annotations

import functools

import os
import warnings

import torch
import triton
from triton.runtime.errors import OutOfResources, PTXASError

from ..ops.experts import check_saved_activations
from .configs import SAFE, SAFE_WGRAD, TileConfig, interpreting, max_row_tiles, pick

_POISON_ENV = "FLEXKERN_TRITON_POISON"
# (kernel, config) pairs that did not fit this GPU's shared memory/registers: use SAFE instead.
_DID_NOT_FIT: set[tuple[str, TileConfig]] = set()


def _kernels():
    # Kernels are built by triton.jit when their modules are imported, and triton.jit reads
    # TRITON_INTERPRET at that moment; importing them at first use lets a test process choose.
    from . import combine, grouped_backward, grouped_gemm
    return grouped_gemm, grouped_backward, combine


def _buffer(shape, dtype, device) -> torch.Tensor:
    if os.environ.get(_POISON_ENV) == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _precision(dtype: torch.dtype) -> str:
    # Full fp32 products for fp32 inputs (like torch's default matmul); tensor cores otherwise.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_e(E: int) -> int:
    return max(16, triton.next_power_of_2(E))


def _run(name: str, launch, cfg: TileConfig, safe: TileConfig = SAFE):
    """launch(cfg), or launch(safe) when cfg does not fit the device (remembered per process)."""
    if (name, cfg) in _DID_NOT_FIT:
        return launch(safe)
    try:
        return launch(cfg)
    except (OutOfResources, PTXASError) as exc:
        _DID_NOT_FIT.add((name, cfg))
        warnings.warn(f"flexkern.triton: {name} config {cfg} does not fit this GPU ({exc}); using {safe}")
        return launch(safe)


def _grouped_gemm(a, a2, b, b2, c, offsets_E1, token_of_row_N, *, k, n_out, b_strides, b2_strides=None,
                  gather_a, mode, cfg, g=None, u=None):
    """c[rows of e] = epilogue(a[rows] @ B[e]); B[e][kk, n] at b + e*se + kk*sk + n*sn for
    b_strides = (se, sk, sn), B2 likewise with b2_strides.
    g, u (MODE_SWIGLU, laid out like c): also store the two products before the epilogue."""
    b2_strides = b_strides if b2_strides is None else b2_strides
    gg, _, _ = _kernels()
    N, E = c.shape[0], offsets_E1.shape[0] - 1

    def launch(cf):
        num_m, num_n = max_row_tiles(N, E, cf.block_m), triton.cdiv(n_out, cf.block_n)
        gg.grouped_gemm_kernel[(num_m * num_n,)](
            a, a if a2 is None else a2, b, b if b2 is None else b2, c, c if g is None else g,
            c if u is None else u, offsets_E1, token_of_row_N,
            k, n_out, E, num_m, num_n, a.stride(0), *b_strides, *b2_strides, c.stride(0),
            GATHER_A=gather_a, MODE=mode.value, SAVE_GU=g is not None, PRECISION=_precision(a.dtype),
            BLOCK_M=cf.block_m, BLOCK_N=cf.block_n, BLOCK_K=cf.block_k, BLOCK_E=_block_e(E),
            GROUP_M=cf.group_m, num_warps=cf.num_warps, num_stages=cf.num_stages)

    _run(f"grouped_gemm{mode}{'_save' if g is not None else ''}", launch, cfg)


def _gather_sum(src_ND, row_of_slot_TK, scale_TK, out_TD, cfg):
    _, _, cb = _kernels()
    (T, K), D = row_of_slot_TK.shape, out_TD.shape[1]
    grid = (triton.cdiv(T, cfg.block_m), triton.cdiv(D, cfg.block_n))
    cb.gather_sum_kernel[grid](
        src_ND, row_of_slot_TK, src_ND if scale_TK is None else scale_TK, out_TD, T, D, K,
        HAS_SCALE=scale_TK is not None, BLOCK_T=cfg.block_m, BLOCK_D=cfg.block_n,
        num_warps=cfg.num_warps)


def _wgrad(a, a2, b, out, out2, offsets_E1, token_of_row_N, slot_of_row_N, weights_TK, frozen_E,
           *, a_by_token, b_by_token, cfg):
    """out[e] = a[rows(e)]^T b[rows(e)] (and out2 with a2), zeros for frozen or empty experts."""
    _, gb, _ = _kernels()
    E, P, Q = out.shape
    frozen = frozen_E.view(torch.uint8) if frozen_E is not None else offsets_E1

    def launch(cf):
        num_p, num_q = triton.cdiv(P, cf.block_m), triton.cdiv(Q, cf.block_n)
        gb.wgrad_kernel[(num_p * num_q, E)](
            a, a if a2 is None else a2, b, out, out if out2 is None else out2,
            offsets_E1, token_of_row_N, slot_of_row_N, weights_TK, frozen, P, Q, num_p, num_q,
            A_BY_TOKEN=a_by_token, B_BY_TOKEN=b_by_token, TWO=a2 is not None,
            HAS_FROZEN=frozen_E is not None, PRECISION=_precision(a.dtype),
            BLOCK_P=cf.block_m, BLOCK_Q=cf.block_n, BLOCK_R=cf.block_k, GROUP_M=cf.group_m,
            num_warps=cf.num_warps, num_stages=cf.num_stages)

    _run(f"wgrad{int(a2 is not None)}", launch, cfg, SAFE_WGRAD)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SPAN_LIMIT = 2**31  # offsets inside one expert's weight are 32-bit; rows, tokens, experts 64-bit


def _span(w: torch.Tensor) -> int:
    """Elements from the start of one expert's matrix to its last element, plus one."""
    return 1 + sum((n - 1) * st for n, st in zip(w.shape[1:], w.stride()[1:]))


@functools.lru_cache(maxsize=None)
def _interpreter_numpy_problem() -> str | None:
    """The Triton interpreter (CPU) needs numpy < 2.3; flexkern itself does not pin numpy, so an
    engine's newer numpy survives its install (``pip install 'flexkern[test]'`` pins it)."""
    import numpy

    major, minor = (int(p) for p in numpy.__version__.split(".")[:2])
    if (major, minor) >= (2, 3):
        return (f"the Triton interpreter needs numpy < 2.3, found {numpy.__version__} "
                "(pip install 'numpy<2.3', or run on a GPU)")
    return None


def supports_experts(x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, token_of_row_N,
                     slot_of_row_N, row_of_slot_TK, weights_TK, frozen_E, sync_free=None, *,
                     save_activations=False, **_):
    """None when these kernels run the inputs, else why not (registered with the seam)."""
    dt = x_TD.dtype
    if dt not in _KERNEL_DTYPES:
        return f"{str(dt).replace('torch.', '')} is not supported (tl.dot has no float64 path)"
    if x_TD.device.type == "cpu" and interpreting():
        if dt == torch.bfloat16:
            return "bfloat16 is computed wrongly by the Triton interpreter (use float32/float16 or a GPU)"
        too_new = _interpreter_numpy_problem()
        if too_new:
            return too_new
    for name, w in (("w_gate", w_gate_EFD), ("w_up", w_up_EFD), ("w_down", w_down_EDF)):
        if _span(w) > _SPAN_LIMIT:
            return f"one expert's {name} spans {_span(w)} >= 2^31 elements"
    return None


def supports_experts_backward(dy_TD, x_TD, *args, g_NF=None, u_NF=None, **kwargs):
    return supports_experts(x_TD, *args, **kwargs)


def _b_strides(w, kk: int, n: int) -> tuple[int, int, int]:
    """(expert, reduction, output-column) strides of weight ``w`` read as B[kk dim, n dim]."""
    st = w.stride()
    return st[0], st[kk], st[n]


def experts_fwd_triton(x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, token_of_row_N,
                       slot_of_row_N, row_of_slot_TK, weights_TK, frozen_E, sync_free=None, *,
                       save_activations=False):
    """Same contract as flexkern.ops.experts_fwd_ref: returns (y_TD, g_NF, u_NF) in x's dtype,
    g_NF, u_NF (N, F) when ``save_activations`` (rows past offsets[E] unwritten), else (0, F).

    ``sync_free`` is accepted for signature parity: this path never synchronises."""
    gg, _, _ = _kernels()
    dev, dt = x_TD.device, x_TD.dtype
    (T, D), (E, F, _), N = x_TD.shape, w_gate_EFD.shape, token_of_row_N.shape[0]
    g_NF, u_NF = (_buffer((N if save_activations else 0, F), dt, dev) for _ in range(2))
    if N == 0:  # no rows (K = 0 or T = 0): nothing to combine
        return torch.zeros((T, D), dtype=dt, device=dev), g_NF, u_NF
    y_TD = _buffer((T, D), dt, dev)
    cfg = pick(dev, dt, N, E)
    # Only the small inputs are made contiguous (no-ops from the op); weights go by their strides.
    x_TD, weights_TK, offsets_E1, token_of_row_N, row_of_slot_TK = (
        t.contiguous() for t in (x_TD, weights_TK, offsets_E1, token_of_row_N, row_of_slot_TK))
    h_NF = _buffer((N, F), dt, dev)
    # w_gate[e] (F, D) read as B[kk over D, n over F]
    _grouped_gemm(x_TD, None, w_gate_EFD, w_up_EFD, h_NF, offsets_E1, token_of_row_N, k=D, n_out=F,
                  b_strides=_b_strides(w_gate_EFD, 2, 1), b2_strides=_b_strides(w_up_EFD, 2, 1),
                  gather_a=True, mode=gg.MODE_SWIGLU, cfg=cfg.gate_up,
                  g=g_NF if save_activations else None, u=u_NF if save_activations else None)
    o_ND = _buffer((N, D), dt, dev)
    # w_down[e] (D, F) read as B[kk over F, n over D]
    _grouped_gemm(h_NF, None, w_down_EDF, None, o_ND, offsets_E1, token_of_row_N, k=F, n_out=D,
                  b_strides=_b_strides(w_down_EDF, 2, 1), gather_a=False, mode=gg.MODE_PLAIN,
                  cfg=cfg.down)
    del h_NF
    _gather_sum(o_ND, row_of_slot_TK, weights_TK, y_TD, cfg.combine)
    return y_TD, g_NF, u_NF


def experts_bwd_triton(dy_TD, x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E1, token_of_row_N,
                       slot_of_row_N, row_of_slot_TK, weights_TK, frozen_E, sync_free=None, *,
                       g_NF=None, u_NF=None):
    """Same contract as flexkern.ops.experts_bwd_ref:
    returns (dx_TD, d_w_gate_EFD, d_w_up_EFD, d_w_down_EDF, d_weights_TK).
    g_NF, u_NF: the forward's saved pre-activations (both or neither); None recomputes them."""
    gg, gb, cb = _kernels()
    dev, dt = x_TD.device, x_TD.dtype
    (T, D), (E, F, _), N = x_TD.shape, w_gate_EFD.shape, token_of_row_N.shape[0]
    K = row_of_slot_TK.shape[1]
    saved = check_saved_activations(g_NF, u_NF, N, F, dt)
    if N == 0:  # no rows: every gradient is zero
        zeros = [w.new_zeros(w.shape) for w in (w_gate_EFD, w_up_EFD, w_down_EDF)]
        return (torch.zeros((T, D), dtype=dt, device=dev), *zeros,
                torch.zeros((T, K), dtype=weights_TK.dtype, device=dev))
    cfg = pick(dev, dt, N, E)
    dy_TD = dy_TD.to(dt).contiguous()
    x_TD, weights_TK, offsets_E1, token_of_row_N, slot_of_row_N, row_of_slot_TK = (
        t.contiguous() for t in (x_TD, weights_TK, offsets_E1, token_of_row_N, slot_of_row_N,
                                 row_of_slot_TK))
    if saved:
        g_NF, u_NF = g_NF.contiguous(), u_NF.contiguous()
    h_NF, dg_NF, du_NF = (_buffer((N, F), dt, dev) for _ in range(3))
    d_down = _buffer(w_down_EDF.shape, dt, dev)  # gradients are contiguous whatever w's strides

    def recompute(cf):
        num_m, num_n = max_row_tiles(N, E, cf.block_m), triton.cdiv(F, cf.block_n)
        part_PN = _buffer((num_n, N), torch.float32, dev)
        gb.recompute_kernel[(num_m * num_n,)](
            x_TD, dy_TD, w_gate_EFD, w_up_EFD, w_down_EDF, weights_TK, h_NF, dg_NF, du_NF, part_PN,
            g_NF if saved else h_NF, u_NF if saved else h_NF,
            offsets_E1, token_of_row_N, slot_of_row_N, D, F, E, N, num_m, num_n,
            *w_gate_EFD.stride(), *w_up_EFD.stride(), *w_down_EDF.stride(),
            LOAD_GU=saved, PRECISION=_precision(dt), BLOCK_M=cf.block_m, BLOCK_N=cf.block_n, BLOCK_K=cf.block_k,
            BLOCK_E=_block_e(E), GROUP_M=cf.group_m, num_warps=cf.num_warps, num_stages=cf.num_stages)
        return part_PN

    part_PN = _run("recompute_saved" if saved else "recompute", recompute, cfg.recompute)
    # d w_down[e] = sum_r (weights[slot] dy[token])_r^T h_r
    _wgrad(dy_TD, None, h_NF, d_down, None, offsets_E1, token_of_row_N, slot_of_row_N, weights_TK,
           frozen_E, a_by_token=True, b_by_token=False, cfg=cfg.wgrad)
    del h_NF
    d_weights_TK = _buffer((T, K), weights_TK.dtype, dev)
    cb.slot_sum_kernel[(triton.cdiv(T * K, 256),)](
        part_PN, row_of_slot_TK, d_weights_TK, T * K, N, part_PN.shape[0], BLOCK=256)
    del part_PN
    dx_ND = _buffer((N, D), dt, dev)
    # w_gate[e] (F, D) read as B[kk over F, n over D]
    _grouped_gemm(dg_NF, du_NF, w_gate_EFD, w_up_EFD, dx_ND, offsets_E1, token_of_row_N, k=F,
                  n_out=D, b_strides=_b_strides(w_gate_EFD, 1, 2),
                  b2_strides=_b_strides(w_up_EFD, 1, 2), gather_a=False, mode=gg.MODE_DUAL,
                  cfg=cfg.dx)
    dx_TD = _buffer((T, D), dt, dev)
    _gather_sum(dx_ND, row_of_slot_TK, None, dx_TD, cfg.combine)
    del dx_ND
    d_gate, d_up = _buffer(w_gate_EFD.shape, dt, dev), _buffer(w_up_EFD.shape, dt, dev)
    _wgrad(dg_NF, du_NF, x_TD, d_gate, d_up, offsets_E1, token_of_row_N, slot_of_row_N, weights_TK,
           frozen_E, a_by_token=False, b_by_token=True, cfg=cfg.wgrad)
    return dx_TD, d_gate, d_up, d_down, d_weights_TK
