"""Backward kernels of the grouped SwiGLU experts (the dx GEMM itself is grouped_gemm MODE_DUAL).

recompute_kernel   per row tile of one expert and one F tile, one loop over D with three dots:
                       g = x w_gate^T, u = x w_up^T (x rows gathered by token),
                       s = dy w_down (dy rows gathered by token, not yet scaled),
                   or, with LOAD_GU, one dot (s) and g, u read from the forward's saved G, U;
                   then the fused SwiGLU backward with dh = weight(slot) * s:
                       h = silu(g) u,  dg = dh u sig (1 + g (1 - sig)),  du = dh silu(g)
                   and the partial d weights sum_f h * s of this F tile (o . dy without forming o).
wgrad_kernel       out[e] = A[rows(e)]^T @ B[rows(e)] per expert, reduced over that expert's rows
                   read from offsets_E1 on the device; frozen experts and experts without rows run
                   no loop iterations (nothing read) and store zeros. GROUP_M: grouped (L2-aware)
                   order of the (P, Q) tiles; 1 is plain row-major (Q tiles fastest).

h is never saved: it is formed here from g and u. Loading g and u (saved by the forward) costs
2 N x F activation memory between forward and backward; recomputing them shares the loop over D
with the dh GEMM and costs two extra dots per tile instead. Rows past offsets[E] are never read.
"""
import triton
import triton.language as tl

from .lang import sigmoid, vsum

from .schedule import expert_tile, swizzle


@triton.jit
def recompute_kernel(
    x_ptr, dy_ptr, wg_ptr, wu_ptr, wd_ptr, weights_ptr,
    h_ptr, dg_ptr, du_ptr, pdw_ptr, g_ptr, u_ptr,
    offsets_ptr, token_ptr, slot_ptr,
    D, F, E, N, num_m, num_n,
    s_ge, s_gf, s_gd, s_ue, s_uf, s_ud, s_de, s_dd, s_df,
    LOAD_GU: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), num_m, num_n, GROUP_M)
    expert, row_start, row_end = expert_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if row_start >= row_end:
        return

    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    tok = tl.load(token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    slot = tl.load(slot_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    w_row = tl.load(weights_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
    fs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    f_ok = fs < F
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tok[:, None] * D + ks[None, :]
    dy_ptrs = dy_ptr + tok[:, None] * D + ks[None, :]
    e64 = expert.to(tl.int64)  # weights by their strides (s_g*: w_gate (E, F, D), s_d*: w_down (E, D, F))
    wg_ptrs = wg_ptr + e64 * s_ge + fs[None, :] * s_gf + ks[:, None] * s_gd  # w_gate[e]^T tile (k over D, f)
    wu_ptrs = wu_ptr + e64 * s_ue + fs[None, :] * s_uf + ks[:, None] * s_ud
    wd_ptrs = wd_ptr + e64 * s_de + ks[:, None] * s_dd + fs[None, :] * s_df  # w_down[e] tile (k over D, f)

    s = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if not LOAD_GU:
        g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + ks) < D
        a_mask = row_ok[:, None] & k_ok[None, :]
        w_mask = k_ok[:, None] & f_ok[None, :]
        if not LOAD_GU:
            x = tl.load(x_ptrs, mask=a_mask, other=0.0)
            g = tl.dot(x, tl.load(wg_ptrs, mask=w_mask, other=0.0), g, input_precision=PRECISION)
            u = tl.dot(x, tl.load(wu_ptrs, mask=w_mask, other=0.0), u, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K * s_gd
            wu_ptrs += BLOCK_K * s_ud
        dy = tl.load(dy_ptrs, mask=a_mask, other=0.0)
        s = tl.dot(dy, tl.load(wd_ptrs, mask=w_mask, other=0.0), s, input_precision=PRECISION)
        dy_ptrs += BLOCK_K
        wd_ptrs += BLOCK_K * s_dd

    out_mask = row_ok[:, None] & f_ok[None, :]
    out_off = rows[:, None] * F + fs[None, :]
    if LOAD_GU:  # the forward's g, u (rows of this expert only, all < offsets[E])
        g = tl.load(g_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
    sig = sigmoid(g)
    silu = g * sig
    h = (silu * u).to(h_ptr.dtype.element_ty)
    dh = s * w_row[:, None]
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    du = dh * silu
    tl.store(h_ptr + out_off, h, mask=out_mask)
    tl.store(dg_ptr + out_off, dg.to(dg_ptr.dtype.element_ty), mask=out_mask)
    tl.store(du_ptr + out_off, du.to(du_ptr.dtype.element_ty), mask=out_mask)
    # d weight(slot) = o_r . dy_t = sum_f h_rf s_rf; this F tile's share, summed later over tiles.
    part = vsum(h.to(tl.float32) * s, 1)
    tl.store(pdw_ptr + pid_n.to(tl.int64) * N + rows, part, mask=row_ok)


@triton.jit
def wgrad_kernel(
    a_ptr, a2_ptr, b_ptr, out_ptr, out2_ptr,
    offsets_ptr, token_ptr, slot_ptr, weights_ptr, frozen_ptr,
    P, Q, num_p, num_q,
    A_BY_TOKEN: tl.constexpr, B_BY_TOKEN: tl.constexpr, TWO: tl.constexpr, HAS_FROZEN: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[e, p, q] = sum over rows r of expert e of A[r, p] * B[r, q] (and out2 with A2).

    A_BY_TOKEN: A rows are read at token_of_row[r] and scaled by weights[slot_of_row[r]] (the
    weighted dy of the combine); B_BY_TOKEN: B rows are read at token_of_row[r] (x).
    A, A2 have row stride P; B has row stride Q; out is (E, P, Q) contiguous.
    Program order within an expert (``swizzle``): GROUP_M = 1 runs the Q tiles fastest (the
    row-major order of tile (pid // num_q, pid % num_q)); GROUP_M > 1 runs GROUP_M P tiles per Q
    tile, so consecutive programs share B[rows, Q tile] while it sits in L2.
    """
    pid_p, pid_q = swizzle(tl.program_id(0), num_p, num_q, GROUP_M)
    expert = tl.program_id(1).to(tl.int64)
    ps = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = ps < P
    q_ok = qs < Q
    row_lo = tl.load(offsets_ptr + expert)
    row_hi = tl.load(offsets_ptr + expert + 1)
    if HAS_FROZEN:
        # A frozen expert runs no iterations: its rows and weights are never read.
        row_hi = tl.where(tl.load(frozen_ptr + expert) != 0, row_lo, row_hi)

    acc = tl.full((BLOCK_P, BLOCK_Q), 0.0, tl.float32)
    if TWO:
        acc2 = tl.full((BLOCK_P, BLOCK_Q), 0.0, tl.float32)
    rs = tl.arange(0, BLOCK_R)
    for r0 in range(row_lo, row_hi, BLOCK_R):
        rows = r0 + rs
        r_ok = rows < row_hi
        a_rows = rows
        b_rows = rows
        if A_BY_TOKEN or B_BY_TOKEN:
            tok = tl.load(token_ptr + rows, mask=r_ok, other=0).to(tl.int64)
            if A_BY_TOKEN:
                a_rows = tok
            if B_BY_TOKEN:
                b_rows = tok
        a_mask = p_ok[:, None] & r_ok[None, :]
        a = tl.load(a_ptr + a_rows[None, :] * P + ps[:, None], mask=a_mask, other=0.0)  # A^T tile
        if A_BY_TOKEN:
            slot = tl.load(slot_ptr + rows, mask=r_ok, other=0).to(tl.int64)
            w = tl.load(weights_ptr + slot, mask=r_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * w[None, :]).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + b_rows[:, None] * Q + qs[None, :], mask=r_ok[:, None] & q_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if TWO:
            a2 = tl.load(a2_ptr + a_rows[None, :] * P + ps[:, None], mask=a_mask, other=0.0)
            acc2 = tl.dot(a2, b, acc2, input_precision=PRECISION)

    out_off = expert * P * Q + ps[:, None] * Q + qs[None, :]
    out_mask = p_ok[:, None] & q_ok[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    if TWO:
        tl.store(out2_ptr + out_off, acc2.to(out2_ptr.dtype.element_ty), mask=out_mask)
