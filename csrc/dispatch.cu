// Dispatch: stable counting sort of the (token, slot) pairs by expert. (The grouped GEMMs derive
// their tile schedule from the offsets themselves: flexkern/triton/schedule.py.)
//
// The slots are cut into contiguous ranges, one per warp. A warp walks its range in order, 32
// slots at a time; __match_any_sync groups the lanes that hold the same expert, and a lane's rank
// in its group plus the warp's running counter for that expert gives its row. Ranges are
// ordered, so rows are stable in slot (token) order within each expert and the result is
// deterministic: the same rows as the reference's stable sort, with no atomics deciding order.
//   small N:  one block does it all (per-warp histograms in shared memory -> scan -> scatter).
//   large N:  count (per-warp histograms to global) -> per-expert scan over the warps -> scatter,
//             the scatter blocks each re-deriving the expert offsets from the per-expert totals.
#include "flexkern.h"
#include "warp.cuh"

namespace flexkern {
namespace {

constexpr int64_t kSmallMaxSlots = 4096;  // one block sorts inputs up to this many slots
constexpr int kSmallSharedBudget = 40 * 1024;
constexpr int kBlockWarps = 4;            // warps per block in the multi-block path
constexpr int64_t kUnitMinSlots = 128;    // slots per warp in the multi-block path (at least)
constexpr int64_t kMaxUnits = 4096;       // bounds the per-expert scan length
constexpr int kScanThreads = 256;

struct Plan {
  bool small;
  int small_warps;  // small path: warps in the single block
  int64_t unit;     // multi-block path: slots per warp
  int64_t units;    // multi-block path: number of warps (ranges)
  size_t workspace_bytes;
};

Plan make_plan(int64_t N, int E) {
  Plan plan{};
  if (N <= kSmallMaxSlots) {
    const int64_t fit = (kSmallSharedBudget - (E + 1) * 8) / (4 * static_cast<int64_t>(E));
    plan.small = true;
    plan.small_warps = static_cast<int>(fit < 1 ? 1 : (fit > 32 ? 32 : fit));
    return plan;
  }
  plan.unit = ceil_div(ceil_div(N, kMaxUnits), kWarp) * kWarp;
  if (plan.unit < kUnitMinSlots) plan.unit = kUnitMinSlots;
  plan.units = ceil_div(N, plan.unit);
  // counts_EU (E x units, int32) then totals_E (E, int32)
  plan.workspace_bytes = static_cast<size_t>((plan.units + 1) * E) * sizeof(int);
  return plan;
}

// Expert of slot i, or -1 when the slot is dropped (masked expert or an id outside [0, E)).
template <typename IdT>
__device__ __forceinline__ int slot_expert(const IdT* __restrict__ ids, const uint8_t* __restrict__ mask,
                                           int E, int64_t i) {
  const IdT e = ids[i];
  if (e < 0 || e >= static_cast<IdT>(E)) return -1;
  const int ei = static_cast<int>(e);
  return (mask != nullptr && !mask[ei]) ? -1 : ei;
}

// hist[e] += number of kept slots of expert e in [begin, end). Called by one whole warp.
template <typename IdT>
__device__ void warp_count(const IdT* __restrict__ ids, const uint8_t* __restrict__ mask, int E,
                           int64_t begin, int64_t end, int* hist) {
#pragma unroll 4
  for (int64_t i = begin + lane_id(); i < end; i += kWarp) {
    const int e = slot_expert(ids, mask, E, i);
    if (e >= 0) atomicAdd(&hist[e], 1);
  }
}

// Writes the rows of the slots in [begin, end), in order. next_row[e] (this warp's private
// counter) holds the row of the warp's next slot of expert e and is advanced. One whole warp.
template <typename IdT>
__device__ void warp_scatter(const IdT* __restrict__ ids, const uint8_t* __restrict__ mask, int E,
                             int K, int64_t begin, int64_t end, int* next_row,
                             int32_t* __restrict__ token_of_row, int32_t* __restrict__ slot_of_row,
                             int32_t* __restrict__ row_of_slot) {
  const int lane = lane_id();
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += kWarp) {
    const int64_t i = base + lane;
    const int e = i < end ? slot_expert(ids, mask, E, i) : -1;
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0) {
      const int row = next_row[e] + __popc(peers & lower_lanes);
      token_of_row[row] = static_cast<int32_t>(i / K);
      slot_of_row[row] = static_cast<int32_t>(i);
      row_of_slot[i] = row;
    } else if (i < end) {
      row_of_slot[i] = -1;
    }
    __syncwarp();  // every peer has read next_row[e] before its last lane advances it
    if (e >= 0 && (peers >> lane) == 1u) next_row[e] += __popc(peers);
    __syncwarp();
  }
}

// Rows past the routed ones hold -1.
__device__ __forceinline__ void fill_unused_rows(int64_t routed, int64_t N, int64_t first,
                                                 int64_t stride, int32_t* token_of_row,
                                                 int32_t* slot_of_row) {
  for (int64_t r = routed + first; r < N; r += stride) {
    token_of_row[r] = -1;
    slot_of_row[r] = -1;
  }
}

template <typename IdT>
__global__ void __launch_bounds__(1024, 1)
    dispatch_small_kernel(const IdT* __restrict__ ids, const uint8_t* __restrict__ mask,
                          int64_t N, int K, int E, int64_t* __restrict__ offsets_E1,
                          int32_t* __restrict__ token_of_row, int32_t* __restrict__ slot_of_row,
                          int32_t* __restrict__ row_of_slot) {
  extern __shared__ long long smem[];
  long long* offs = smem;                                // E + 1
  int* hist = reinterpret_cast<int*>(smem + E + 1);      // warps x E
  const int warps = static_cast<int>(blockDim.x) / kWarp;
  const int warp = warp_id();
  const int lane = lane_id();
  const int64_t per = ceil_div(ceil_div(N, warps), kWarp) * kWarp;
  const int64_t begin = min(N, warp * per);
  const int64_t end = min(N, begin + per);
  int* mine = hist + warp * E;

  for (int i = threadIdx.x; i < warps * E; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  warp_count(ids, mask, E, begin, end, mine);
  __syncthreads();
  // hist[w][e] -> rows of expert e owned by warps before w; offs[e] -> total of expert e.
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = 0;
    for (int w = 0; w < warps; ++w) {
      const int c = hist[w * E + e];
      hist[w * E + e] = run;
      run += c;
    }
    offs[e] = run;
  }
  __syncthreads();
  if (warp == 0) warp_exclusive_scan(offs, E);
  __syncthreads();
  for (int e = threadIdx.x; e <= E; e += blockDim.x) offsets_E1[e] = offs[e];
  for (int e = lane; e < E; e += kWarp) mine[e] += static_cast<int>(offs[e]);
  __syncwarp();
  warp_scatter(ids, mask, E, K, begin, end, mine, token_of_row, slot_of_row, row_of_slot);
  fill_unused_rows(offs[E], N, threadIdx.x, blockDim.x, token_of_row, slot_of_row);
}

template <typename IdT>
__global__ void __launch_bounds__(kBlockWarps* kWarp)
    dispatch_count_kernel(const IdT* __restrict__ ids, const uint8_t* __restrict__ mask,
                          int64_t N, int E, int64_t unit, int64_t units,
                          int* __restrict__ counts_EU) {
  extern __shared__ int hist_s[];  // kBlockWarps x E
  const int lane = lane_id();
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kBlockWarps + warp_id();
  if (u >= units) return;  // no block-wide barrier in this kernel
  int* mine = hist_s + warp_id() * E;
  for (int e = lane; e < E; e += kWarp) mine[e] = 0;
  __syncwarp();
  const int64_t begin = u * unit;
  warp_count(ids, mask, E, begin, min(N, begin + unit), mine);
  __syncwarp();
  for (int e = lane; e < E; e += kWarp) counts_EU[e * units + u] = mine[e];
}

// Block e: exclusive scan of counts_EU[e, :] in place (rows of expert e before each warp range),
// totals_E[e] = the sum.
__global__ void __launch_bounds__(kScanThreads)
    dispatch_scan_kernel(int* __restrict__ counts_EU, int64_t units, int* __restrict__ totals_E) {
  __shared__ int warp_sums[kScanThreads / kWarp];
  __shared__ int tile_total;
  constexpr int kWarps = kScanThreads / kWarp;
  const int lane = lane_id();
  const int warp = warp_id();
  int* row = counts_EU + static_cast<int64_t>(blockIdx.x) * units;
  int carry = 0;
  for (int64_t base = 0; base < units; base += kScanThreads) {
    const int64_t i = base + threadIdx.x;
    const int v = i < units ? row[i] : 0;
    int incl = v;
    for (int o = 1; o < kWarp; o <<= 1) {
      const int n = __shfl_up_sync(kFullMask, incl, o);
      if (lane >= o) incl += n;
    }
    if (lane == kWarp - 1) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const int s = lane < kWarps ? warp_sums[lane] : 0;
      int s_incl = s;
      for (int o = 1; o < kWarp; o <<= 1) {
        const int n = __shfl_up_sync(kFullMask, s_incl, o);
        if (lane >= o) s_incl += n;
      }
      if (lane < kWarps) warp_sums[lane] = s_incl - s;
      if (lane == kWarp - 1) tile_total = s_incl;
    }
    __syncthreads();
    if (i < units) row[i] = carry + warp_sums[warp] + incl - v;
    carry += tile_total;
    __syncthreads();  // warp_sums and tile_total are rewritten by the next tile
  }
  if (threadIdx.x == 0) totals_E[blockIdx.x] = carry;
}

template <typename IdT>
__global__ void __launch_bounds__(kBlockWarps* kWarp)
    dispatch_scatter_kernel(const IdT* __restrict__ ids, const uint8_t* __restrict__ mask,
                            int64_t N, int K, int E, int64_t unit, int64_t units,
                            const int* __restrict__ counts_EU, const int* __restrict__ totals_E,
                            int64_t* __restrict__ offsets_E1, int32_t* __restrict__ token_of_row,
                            int32_t* __restrict__ slot_of_row, int32_t* __restrict__ row_of_slot) {
  extern __shared__ long long smem[];
  long long* offs = smem;                                // E + 1
  int* next_row = reinterpret_cast<int*>(smem + E + 1);  // kBlockWarps x E
  const int lane = lane_id();
  for (int e = threadIdx.x; e < E; e += blockDim.x) offs[e] = totals_E[e];
  __syncthreads();
  if (warp_id() == 0) warp_exclusive_scan(offs, E);
  __syncthreads();
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e <= E; e += blockDim.x) offsets_E1[e] = offs[e];
  }
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kBlockWarps + warp_id();
  if (u < units) {
    int* mine = next_row + warp_id() * E;
    for (int e = lane; e < E; e += kWarp) {
      mine[e] = static_cast<int>(offs[e]) + counts_EU[e * units + u];
    }
    __syncwarp();
    const int64_t begin = u * unit;
    warp_scatter(ids, mask, E, K, begin, min(N, begin + unit), mine, token_of_row, slot_of_row,
                 row_of_slot);
  }
  fill_unused_rows(offs[E], N, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                   static_cast<int64_t>(gridDim.x) * blockDim.x, token_of_row, slot_of_row);
}

template <typename IdT>
cudaError_t launch_dispatch(const Plan& plan, const IdT* ids, const uint8_t* mask, int64_t N,
                            int K, int E, void* workspace, int64_t* offsets_E1,
                            int32_t* token_of_row, int32_t* slot_of_row, int32_t* row_of_slot,
                            cudaStream_t stream) {
  if (plan.small) {
    const size_t smem = (E + 1) * sizeof(long long) + plan.small_warps * E * sizeof(int);
    dispatch_small_kernel<IdT><<<1, plan.small_warps * kWarp, smem, stream>>>(
        ids, mask, N, K, E, offsets_E1, token_of_row, slot_of_row, row_of_slot);
    return cudaGetLastError();
  }
  int* counts_EU = static_cast<int*>(workspace);
  int* totals_E = counts_EU + plan.units * E;
  const unsigned blocks = static_cast<unsigned>(ceil_div(plan.units, kBlockWarps));
  const size_t hist_smem = kBlockWarps * E * sizeof(int);
  dispatch_count_kernel<IdT><<<blocks, kBlockWarps * kWarp, hist_smem, stream>>>(
      ids, mask, N, E, plan.unit, plan.units, counts_EU);
  dispatch_scan_kernel<<<E, kScanThreads, 0, stream>>>(counts_EU, plan.units, totals_E);
  dispatch_scatter_kernel<IdT><<<blocks, kBlockWarps * kWarp, hist_smem + (E + 1) * sizeof(long long), stream>>>(
      ids, mask, N, K, E, plan.unit, plan.units, counts_EU, totals_E, offsets_E1, token_of_row,
      slot_of_row, row_of_slot);
  return cudaGetLastError();
}

}  // namespace

size_t dispatch_workspace_bytes(int64_t T, int K, int E) {
  if (T < 0 || K < 1 || E < 1) return 0;
  return make_plan(T * K, E).workspace_bytes;
}

cudaError_t dispatch(const void* experts_TK, bool ids_int64, const uint8_t* mask_E, int64_t T,
                     int K, int E, void* workspace, size_t workspace_bytes, int64_t* offsets_E1,
                     int32_t* token_of_row_N, int32_t* slot_of_row_N, int32_t* row_of_slot_TK,
                     cudaStream_t stream) {
  if (T < 0 || K < 1 || E < 1 || E > kDispatchMaxExperts || offsets_E1 == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (T > 0x7fffffff / K) return cudaErrorInvalidValue;  // rows and slots are int32
  const int64_t N = T * K;
  const Plan plan = make_plan(N, E);
  if (workspace_bytes < plan.workspace_bytes || (plan.workspace_bytes > 0 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (N > 0 && (experts_TK == nullptr || token_of_row_N == nullptr || slot_of_row_N == nullptr ||
                row_of_slot_TK == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (ids_int64) {
    return launch_dispatch(plan, static_cast<const int64_t*>(experts_TK), mask_E, N, K, E,
                           workspace, offsets_E1, token_of_row_N, slot_of_row_N, row_of_slot_TK,
                           stream);
  }
  return launch_dispatch(plan, static_cast<const int32_t*>(experts_TK), mask_E, N, K, E, workspace,
                         offsets_E1, token_of_row_N, slot_of_row_N, row_of_slot_TK, stream);
}

}  // namespace flexkern
