// Fused router gate, one warp per token: scores (softmax over the active experts, or sigmoids) ->
// choice (score bias, mask, group limit) -> top-k -> (renormalise) -> scale.
//
// Lane l holds experts l, l+32, l+64, ... (VPT = ceil(E/32) values, coalesced loads). Group scores
// are butterfly-merged top-2 pairs (lane g keeps group g's), the chosen groups and the top-k are
// rounds of a warp argmax. The order is total (NaN first, as torch.sort(descending) puts it, then
// larger, then lower id), so every lane agrees on each winner and the result matches the
// reference's stable descending sorts, ties included.
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

// torch.topk's value order: NaN above everything.
__device__ __forceinline__ bool above(float a, float b) {
  return (isnan(a) && !isnan(b)) || a > b;
}

// (best, second) of a multiset after adding v.
__device__ __forceinline__ void insert_top2(float v, float& best, float& second) {
  if (above(v, best)) {
    second = best;
    best = v;
  } else if (above(v, second)) {
    second = v;
  }
}

// One round of a warp argmax: the candidate that ranks first over all lanes, on every lane.
// `extra` travels with the winner (the expert's score).
__device__ __forceinline__ void warp_argmax(float& best, int& best_id, float& extra) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(kFullMask, best, o);
    const int other_id = __shfl_xor_sync(kFullMask, best_id, o);
    const float other_extra = __shfl_xor_sync(kFullMask, extra, o);
    if (ranks_before(other, other_id, best, best_id)) {
      best = other;
      best_id = other_id;
      extra = other_extra;
    }
  }
}

// Bit g set: group g is one of the topk_group best (group score = its two best choices summed,
// the best alone when only one is eligible).
template <int VPT>
__device__ unsigned chosen_groups(const float (&c)[VPT], int E, const RouteGate& gate) {
  const int lane = lane_id();
  const int per_group = E / gate.n_group;
  float my_score = 0.f;  // lane g: the score of group g
  for (int g = 0; g < gate.n_group; ++g) {
    float best = -INFINITY, second = -INFINITY;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = lane + j * kWarp;
      if (e < E && e / per_group == g) insert_top2(c[j], best, second);
    }
    for (int o = kWarp / 2; o > 0; o >>= 1) {  // the top-2 of a multiset: the same on every lane
      const float other_best = __shfl_xor_sync(kFullMask, best, o);
      const float other_second = __shfl_xor_sync(kFullMask, second, o);
      insert_top2(other_best, best, second);
      insert_top2(other_second, best, second);
    }
    if (lane == g) my_score = second == -INFINITY ? best : best + second;
  }
  unsigned chosen = 0u;
  for (int r = 0; r < gate.topk_group; ++r) {
    const bool candidate = lane < gate.n_group && !((chosen >> lane) & 1u);
    float best = my_score, unused = 0.f;
    int best_g = candidate ? lane : kNoExpert;
    warp_argmax(best, best_g, unused);
    if (best_g < kRouteMaxGroups) chosen |= 1u << best_g;  // topk_group <= n_group: always true
  }
  return chosen;
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kTokensPerBlock* kWarp)
    route_topk_kernel(const T* __restrict__ logits_TE, const float* __restrict__ bias_E,
                      const uint8_t* __restrict__ mask_E, int64_t num_tokens, int E, int K,
                      RouteGate gate, float* __restrict__ weights_TK,
                      int32_t* __restrict__ experts_TK, float* __restrict__ lse_T,
                      int32_t* __restrict__ counts_E) {
  const int lane = lane_id();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + warp_id();
  if (t >= num_tokens) return;  // the whole warp leaves together
  const T* row = logits_TE + t * E;
  const bool apply_mask = gate.reroute && mask_E != nullptr;

  float raw[VPT];  // logit + bias, mask not applied (for the log-sum-exp)
  float s[VPT];    // the score: softmax input, then the probability; or the sigmoid
  bool masked[VPT];
  float local_max = -INFINITY;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane + j * kWarp;
    raw[j] = -INFINITY;
    s[j] = -INFINITY;
    masked[j] = true;
    if (e < E) {
      raw[j] = to_float(row[e]);
      if (bias_E != nullptr) raw[j] += bias_E[e];
      masked[j] = apply_mask && !mask_E[e];
      s[j] = masked[j] ? -INFINITY : raw[j];
      local_max = fmaxf(local_max, s[j]);
    }
  }
  if (gate.scoring == Scoring::kSoftmax) {
    // As in torch.softmax: a NaN or +inf logit, or a row of -inf, makes every probability NaN
    // (through the sum).
    const float m = warp_max(local_max);
    float local_sum = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (lane + j * kWarp < E) {
        s[j] = expf(s[j] - m);
        local_sum += s[j];
      }
    }
    const float sum = warp_sum(local_sum);
#pragma unroll
    for (int j = 0; j < VPT; ++j) s[j] = s[j] / sum;
  } else {
#pragma unroll
    for (int j = 0; j < VPT; ++j) s[j] = 1.f / (1.f + expf(-raw[j]));
  }
  // A masked expert's score is exactly 0, also when every expert is masked (the softmax's 0/0
  // is NaN): fewer active experts than K give weight-0 slots, never NaN.
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    if (masked[j] && apply_mask) s[j] = 0.f;
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

  float c[VPT];  // the choice: score + score bias, -inf where not eligible
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane + j * kWarp;
    c[j] = s[j];
    if (e < E && gate.score_bias_E != nullptr) c[j] += gate.score_bias_E[e];
    if (apply_mask && masked[j]) c[j] = -INFINITY;
  }
  if (gate.n_group > 1) {
    const unsigned groups = chosen_groups<VPT>(c, E, gate);
    const int per_group = E / gate.n_group;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = lane + j * kWarp;
      if (e < E && !((groups >> (e / per_group)) & 1u)) c[j] = -INFINITY;
    }
  }

  // K rounds of warp argmax; lane k keeps the k-th pick.
  unsigned taken = 0u;  // bit j: this lane's expert lane + 32j is already picked
  float my_weight = 0.f;
  int my_expert = 0;
  for (int k = 0; k < K; ++k) {
    float best = 0.f, best_score = 0.f;
    int best_e = kNoExpert;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = lane + j * kWarp;
      if (e < E && !((taken >> j) & 1u) && ranks_before(c[j], e, best, best_e)) {
        best = c[j];
        best_e = e;
        best_score = s[j];
      }
    }
    warp_argmax(best, best_e, best_score);
    // K <= E, so an unpicked expert always exists and best_e < E on every lane.
    if (lane == best_e % kWarp) taken |= 1u << (best_e / kWarp);
    if (lane == k) {
      my_weight = best == -INFINITY ? 0.f : best_score;  // not eligible: weight 0
      my_expert = best_e;
    }
  }

  if (gate.renormalize) {
    float total = warp_sum(lane < K ? my_weight : 0.f);
    total = total < 1e-20f ? 1e-20f : total;  // clamp_min that keeps NaN, like torch.clamp_min
    my_weight = my_weight / total;
  }
  my_weight *= gate.routed_scaling;
  if (lane < K) {
    weights_TK[t * K + lane] = my_weight;
    experts_TK[t * K + lane] = my_expert;
    if (counts_E != nullptr) atomicAdd(&counts_E[my_expert], 1);
  }
}

template <typename T>
cudaError_t launch_route(const void* logits_TE, const float* bias_E, const uint8_t* mask_E,
                         int64_t T_, int E, int K, const RouteGate& gate, float* weights_TK,
                         int32_t* experts_TK, float* lse_T, int32_t* counts_E,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(T_, kTokensPerBlock)));
  const dim3 block(kTokensPerBlock * kWarp);
  const T* logits = static_cast<const T*>(logits_TE);
#define FLEXKERN_ROUTE_LAUNCH(VPT)                                                              \
  route_topk_kernel<T, VPT><<<grid, block, 0, stream>>>(logits, bias_E, mask_E, T_, E, K, gate, \
                                                        weights_TK, experts_TK, lse_T, counts_E)
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

bool valid_gate(const RouteGate& gate, int E, int K) {
  if (gate.scoring != Scoring::kSoftmax && gate.scoring != Scoring::kSigmoid) return false;
  if (!(gate.routed_scaling > 0.f) || isinf(gate.routed_scaling)) return false;
  if (gate.n_group == 1) return gate.topk_group == 1;
  return gate.n_group > 1 && gate.n_group <= kRouteMaxGroups && E % gate.n_group == 0 &&
         E / gate.n_group >= 2 && gate.topk_group >= 1 && gate.topk_group <= gate.n_group &&
         K <= gate.topk_group * (E / gate.n_group);
}

}  // namespace

cudaError_t route_topk(const void* logits_TE, FloatType dtype, const float* bias_E,
                       const uint8_t* mask_E, int64_t T, int E, int K, const RouteGate& gate,
                       float* weights_TK, int32_t* experts_TK, float* lse_T, int32_t* counts_E,
                       cudaStream_t stream) {
  if (T < 0 || E < 1 || E > kRouteMaxExperts || K < 1 || K > E || K > kRouteMaxTopK ||
      !valid_gate(gate, E, K)) {
    return cudaErrorInvalidValue;
  }
  if (ceil_div(T, kTokensPerBlock) > 0x7fffffff) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  if (logits_TE == nullptr || weights_TK == nullptr || experts_TK == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case FloatType::kFloat32:
      return launch_route<float>(logits_TE, bias_E, mask_E, T, E, K, gate, weights_TK,
                                 experts_TK, lse_T, counts_E, stream);
    case FloatType::kFloat16:
      return launch_route<__half>(logits_TE, bias_E, mask_E, T, E, K, gate, weights_TK,
                                  experts_TK, lse_T, counts_E, stream);
    case FloatType::kBFloat16:
      return launch_route<__nv_bfloat16>(logits_TE, bias_E, mask_E, T, E, K, gate, weights_TK,
                                         experts_TK, lse_T, counts_E, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace flexkern
