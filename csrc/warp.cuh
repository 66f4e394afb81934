// Warp-level helpers shared by the routing and dispatch kernels.
#pragma once

#include <cstdint>

namespace flexkern {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) % kWarp; }
__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x) / kWarp; }

// Butterfly reductions: every lane ends with the same, bitwise identical result.
__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Exclusive prefix sum of vals[0, n) in place and the total in vals[n]; run by one whole warp.
// Each lane sums a contiguous run, so the work is n/32 sequential adds plus one shuffle scan.
__device__ inline void warp_exclusive_scan(long long* vals, int n) {
  const int lane = lane_id();
  const int per = static_cast<int>(ceil_div(n, kWarp));
  const int lo = min(n, lane * per);
  const int hi = min(n, lo + per);
  long long run = 0;
  for (int i = lo; i < hi; ++i) run += vals[i];
  long long incl = run;
  for (int o = 1; o < kWarp; o <<= 1) {
    const long long v = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += v;
  }
  long long acc = incl - run;
  for (int i = lo; i < hi; ++i) {
    const long long v = vals[i];
    vals[i] = acc;
    acc += v;
  }
  if (lane == kWarp - 1) vals[n] = incl;
}

}  // namespace flexkern
