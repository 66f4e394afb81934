"""On-device tile schedule for grouped GEMMs over experts with variable rows per expert.

A grouped GEMM launches a fixed upper bound of row tiles (``configs.max_row_tiles``, which
depends only on shapes, so nothing is read back to the host and CUDA graphs can capture it). Each
program maps its row-tile index to (expert, first row, end row) from offsets_E1 with a small prefix sum over the
experts' tile counts. Experts with no rows own no tiles, so their weights are never read; programs
past the last real tile get an empty row range and return at once.
"""
import triton
import triton.language as tl

from .lang import vcumsum, vsum


@triton.jit
def expert_tile(tile, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row tile ``tile`` -> (expert, row_start, row_end), rows as int64.

    The tile covers rows [row_start, min(row_start + BLOCK_M, row_end)) of ``expert``. When the
    tile index is past the last real tile, row_start >= row_end (an empty range).
    """
    e_idx = tl.arange(0, BLOCK_E)
    e_ok = e_idx < E
    lo_E = tl.load(offsets_ptr + e_idx, mask=e_ok, other=0)
    hi_E = tl.load(offsets_ptr + e_idx + 1, mask=e_ok, other=0)
    tiles_E = ((hi_E - lo_E + BLOCK_M - 1) // BLOCK_M).to(tl.int32)
    ends_E = vcumsum(tiles_E, 0)
    # The expert owning this tile is the first whose cumulative tile count exceeds it.
    expert = vsum((ends_E <= tile).to(tl.int32), 0)
    own = e_idx == expert
    first_tile = vsum(tl.where(own, ends_E - tiles_E, 0), 0)
    row_lo = vsum(tl.where(own, lo_E, 0), 0)
    row_end = vsum(tl.where(own, hi_E, 0), 0)
    row_start = row_lo + (tile - first_tile).to(tl.int64) * BLOCK_M
    return expert, row_start, row_end


@triton.jit
def swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row tiles share each weight tile while it sits in L2.
    GROUP_M = 1 is plain row-major order, (pid // num_n, pid % num_n), with no extra index math."""
    if GROUP_M == 1:
        return pid // num_n, pid % num_n
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n
