"""Grouped GEMM over experts: C[r] = A[r] @ B[expert(r)] for the routed rows r, one kernel, three
epilogues chosen at compile time (MODE):

    MODE_PLAIN   C = A @ B                              (forward down projection: o = h @ w_down^T)
    MODE_SWIGLU  C = silu(A @ B) * (A @ B2)             (forward gate/up: h = silu(x w_gate^T) * (x w_up^T))
    MODE_DUAL    C = A @ B + A2 @ B2                    (backward dx rows: dg @ w_gate + du @ w_up)

Rows are grouped by expert (offsets_E1). With GATHER_A the A rows are read at token_of_row_N[r]
inside the load, so x is never copied into expert order. B[e] and B2[e] are addressed by their own
strides, so the same kernel reads a weight transposed or not, and strided views of weights (a
slice of a fused gate_up tensor) without a copy. Accumulation is float32; C is stored in its dtype.
With SAVE_GU (MODE_SWIGLU only) the two accumulators before the epilogue, g = A @ B and
u = A @ B2, are also stored to G and U (row stride stride_c, C's dtype) for the backward.
"""
import triton
import triton.language as tl

from .lang import sigmoid

from .schedule import expert_tile, swizzle

# constexpr globals: the compiler only lets kernels read globals that are tl.constexpr
MODE_PLAIN, MODE_SWIGLU, MODE_DUAL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def grouped_gemm_kernel(
    a_ptr, a2_ptr, b_ptr, b2_ptr, c_ptr, g_ptr, u_ptr, offsets_ptr, token_ptr,
    K, N_OUT, E, num_m, num_n,
    stride_a, stride_be, stride_bk, stride_bn, stride_b2e, stride_b2k, stride_b2n, stride_c,
    GATHER_A: tl.constexpr, MODE: tl.constexpr, SAVE_GU: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), num_m, num_n, GROUP_M)
    expert, row_start, row_end = expert_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if row_start >= row_end:
        return  # past the last real tile: no work, nothing read

    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    if GATHER_A:
        a_rows = tl.load(token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        a_rows = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_OUT
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_rows[:, None] * stride_a + ks[None, :]
    b_ptrs = b_ptr + (expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk
                      + cols[None, :] * stride_bn)
    if MODE != MODE_PLAIN:
        b2_ptrs = b2_ptr + (expert.to(tl.int64) * stride_b2e + ks[:, None] * stride_b2k
                            + cols[None, :] * stride_b2n)
    if MODE == MODE_DUAL:
        a2_ptrs = a2_ptr + a_rows[:, None] * stride_a + ks[None, :]

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if MODE == MODE_SWIGLU:
        acc2 = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a_mask = row_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & col_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if MODE == MODE_SWIGLU:
            b2 = tl.load(b2_ptrs, mask=b_mask, other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
        if MODE == MODE_DUAL:
            a2 = tl.load(a2_ptrs, mask=a_mask, other=0.0)
            b2 = tl.load(b2_ptrs, mask=b_mask, other=0.0)
            acc = tl.dot(a2, b2, acc, input_precision=PRECISION)
            a2_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
        if MODE != MODE_PLAIN:
            b2_ptrs += BLOCK_K * stride_b2k

    c_off = rows[:, None] * stride_c + cols[None, :]
    c_mask = row_ok[:, None] & col_ok[None, :]
    if MODE == MODE_SWIGLU:
        if SAVE_GU:  # pre-activations for the backward (it then skips two GEMMs)
            tl.store(g_ptr + c_off, acc.to(g_ptr.dtype.element_ty), mask=c_mask)
            tl.store(u_ptr + c_off, acc2.to(u_ptr.dtype.element_ty), mask=c_mask)
        acc = acc * sigmoid(acc) * acc2  # SwiGLU epilogue: silu(gate) * up
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
