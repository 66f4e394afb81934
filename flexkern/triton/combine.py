"""The combine over the K slots of each token: deterministic gather-sums, float32, no atomics.

gather_sum_kernel   out[t] = sum_k scale[t, k] * src[row_of_slot[t, k]]   (slots with row -1 skipped)
                    forward: y from o rows with the router weights; backward: dx from dx rows (no scale)
slot_sum_kernel     out[t, k] = sum_j part[j, row_of_slot[t, k]]           (0 for dropped slots)
                    backward: d weights from the per-F-tile partial dot products
"""
import triton
import triton.language as tl


@triton.jit
def gather_sum_kernel(
    src_ptr, row_of_slot_ptr, scale_ptr, out_ptr, T, D, K,
    HAS_SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    ts = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = ts < T
    d_ok = ds < D
    acc = tl.full((BLOCK_T, BLOCK_D), 0.0, tl.float32)
    for k in range(K):
        row = tl.load(row_of_slot_ptr + ts * K + k, mask=t_ok, other=-1)
        ok = row >= 0
        v = tl.load(src_ptr + row.to(tl.int64)[:, None] * D + ds[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if HAS_SCALE:
            v = v * tl.load(scale_ptr + ts * K + k, mask=ok, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptr + ts[:, None] * D + ds[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def slot_sum_kernel(part_ptr, row_of_slot_ptr, out_ptr, TK, N, num_parts, BLOCK: tl.constexpr):
    slots = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    s_ok = slots < TK
    row = tl.load(row_of_slot_ptr + slots, mask=s_ok, other=-1).to(tl.int64)
    ok = row >= 0
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    ptrs = part_ptr + row
    for _ in range(num_parts):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += N  # pointer steps stay 64-bit even when num_parts * N exceeds 2^31
    tl.store(out_ptr + slots, acc.to(out_ptr.dtype.element_ty), mask=s_ok)
