// Fused router gate: softmax over the active experts -> top-k -> (renormalise), one warp per token.
//
// Lane l holds experts l, l+32, l+64, ... (VPT = ceil(E/32) values, coalesced loads). The top-k is
// K rounds of a warp argmax. The order is total (NaN first, as torch.sort(descending) puts it,
// then larger probability, then lower expert id), so every lane agrees on each winner and the
// result matches the reference's stable descending sort, ties included.
#include <cmath>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "flexkern.h"
#include "warp.cuh"

namespace flexkern {
namespace {

constexpr int kTokensPerBlock = 8;  // one warp per token
constexpr int kNoExpert = 1 << 30;  // "no candidate yet"; ranks after every real expert

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib) {
  if (ia == kNoExpert) return false;
  if (ib == kNoExpert) return true;
  const bool a_nan = isnan(a), b_nan = isnan(b);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a != b) return a > b;
  return ia < ib;
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kTokensPerBlock* kWarp)
    route_topk_kernel(const T* __restrict__ logits_TE, const float* __restrict__ bias_E,
                      const uint8_t* __restrict__ mask_E, int64_t num_tokens, int E, int K,
                      bool reroute, bool renormalize, float* __restrict__ weights_TK,
                      int32_t* __restrict__ experts_TK, float* __restrict__ lse_T,
                      int32_t* __restrict__ counts_E) {
  const int lane = lane_id();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + warp_id();
  if (t >= num_tokens) return;  // the whole warp leaves together
  const T* row = logits_TE + t * E;
  const bool apply_mask = reroute && mask_E != nullptr;

  float raw[VPT];  // logit + bias, mask not applied (for the log-sum-exp)
  float p[VPT];    // softmax input, then the probability
  float local_max = -INFINITY;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane + j * kWarp;
    raw[j] = -INFINITY;
    p[j] = -INFINITY;
    if (e < E) {
      raw[j] = to_float(row[e]);
      if (bias_E != nullptr) raw[j] += bias_E[e];
      p[j] = (apply_mask && !mask_E[e]) ? -INFINITY : raw[j];
      local_max = fmaxf(local_max, p[j]);
    }
  }
  // As in torch.softmax: a NaN or +inf logit, or a row of -inf, makes every probability NaN
  // (through the sum), and such rows then pick experts 0..K-1 in order (masked ones set to 0 below).
  const float m = warp_max(local_max);
  float local_sum = 0.f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    if (lane + j * kWarp < E) {
      p[j] = expf(p[j] - m);
      local_sum += p[j];
    }
  }
  const float sum = warp_sum(local_sum);
#pragma unroll
  for (int j = 0; j < VPT; ++j) p[j] = p[j] / sum;
  if (apply_mask) {
    // A masked expert's probability is exactly 0, also when every expert is masked (the 0/0
    // above is NaN): fewer active experts than K give weight-0 slots, never NaN.
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = lane + j * kWarp;
      if (e < E && !mask_E[e]) p[j] = 0.f;
    }
  }

  if (lse_T != nullptr) {
    float raw_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < VPT; ++j) raw_max = fmaxf(raw_max, raw[j]);
    raw_max = warp_max(raw_max);
    const float shift = isinf(raw_max) ? 0.f : raw_max;  // torch.logsumexp's rule
    float raw_sum = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (lane + j * kWarp < E) raw_sum += expf(raw[j] - shift);
    }
    raw_sum = warp_sum(raw_sum);
    if (lane == 0) lse_T[t] = logf(raw_sum) + shift;
  }

  // K rounds of warp argmax; lane k keeps the k-th pick.
  unsigned taken = 0u;  // bit j: this lane's expert lane + 32j is already picked
  float my_weight = 0.f;
  int my_expert = 0;
  for (int k = 0; k < K; ++k) {
    float best = 0.f;
    int best_e = kNoExpert;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = lane + j * kWarp;
      if (e < E && !((taken >> j) & 1u) && ranks_before(p[j], e, best, best_e)) {
        best = p[j];
        best_e = e;
      }
    }
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float other = __shfl_xor_sync(kFullMask, best, o);
      const int other_e = __shfl_xor_sync(kFullMask, best_e, o);
      if (ranks_before(other, other_e, best, best_e)) {
        best = other;
        best_e = other_e;
      }
    }
    // K <= E, so an unpicked expert always exists and best_e < E on every lane.
    if (lane == best_e % kWarp) taken |= 1u << (best_e / kWarp);
    if (lane == k) {
      my_weight = best;
      my_expert = best_e;
    }
  }

  if (renormalize) {
    float total = warp_sum(lane < K ? my_weight : 0.f);
    total = total < 1e-20f ? 1e-20f : total;  // clamp_min that keeps NaN, like torch.clamp_min
    my_weight = my_weight / total;
  }
  if (lane < K) {
    weights_TK[t * K + lane] = my_weight;
    experts_TK[t * K + lane] = my_expert;
    if (counts_E != nullptr) atomicAdd(&counts_E[my_expert], 1);
  }
}

template <typename T>
cudaError_t launch_route(const void* logits_TE, const float* bias_E, const uint8_t* mask_E,
                         int64_t T_, int E, int K, bool reroute, bool renormalize,
                         float* weights_TK, int32_t* experts_TK, float* lse_T, int32_t* counts_E,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(T_, kTokensPerBlock)));
  const dim3 block(kTokensPerBlock * kWarp);
  const T* logits = static_cast<const T*>(logits_TE);
#define FLEXKERN_ROUTE_LAUNCH(VPT)                                                          \
  route_topk_kernel<T, VPT><<<grid, block, 0, stream>>>(logits, bias_E, mask_E, T_, E, K,   \
                                                        reroute, renormalize, weights_TK,  \
                                                        experts_TK, lse_T, counts_E)
  if (E <= 32) {
    FLEXKERN_ROUTE_LAUNCH(1);
  } else if (E <= 64) {
    FLEXKERN_ROUTE_LAUNCH(2);
  } else if (E <= 128) {
    FLEXKERN_ROUTE_LAUNCH(4);
  } else {
    FLEXKERN_ROUTE_LAUNCH(8);
  }
#undef FLEXKERN_ROUTE_LAUNCH
  return cudaGetLastError();
}

}  // namespace

cudaError_t route_topk(const void* logits_TE, FloatType dtype, const float* bias_E,
                       const uint8_t* mask_E, int64_t T, int E, int K, bool reroute,
                       bool renormalize, float* weights_TK, int32_t* experts_TK, float* lse_T,
                       int32_t* counts_E, cudaStream_t stream) {
  if (T < 0 || E < 1 || E > kRouteMaxExperts || K < 1 || K > E || K > kRouteMaxTopK) {
    return cudaErrorInvalidValue;
  }
  if (ceil_div(T, kTokensPerBlock) > 0x7fffffff) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  if (logits_TE == nullptr || weights_TK == nullptr || experts_TK == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case FloatType::kFloat32:
      return launch_route<float>(logits_TE, bias_E, mask_E, T, E, K, reroute, renormalize,
                                 weights_TK, experts_TK, lse_T, counts_E, stream);
    case FloatType::kFloat16:
      return launch_route<__half>(logits_TE, bias_E, mask_E, T, E, K, reroute, renormalize,
                                  weights_TK, experts_TK, lse_T, counts_E, stream);
    case FloatType::kBFloat16:
      return launch_route<__nv_bfloat16>(logits_TE, bias_E, mask_E, T, E, K, reroute,
                                         renormalize, weights_TK, experts_TK, lse_T, counts_E,
                                         stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace flexkern
