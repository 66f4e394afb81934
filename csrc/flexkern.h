// flexkern CUDA core: routing and permutation kernels on raw device pointers.
//
// Torch-free on purpose: every function takes device pointers, sizes and a cudaStream_t, launches
// asynchronously on that stream (no host synchronisation, no allocation: safe to capture in a CUDA
// graph) and returns the launch error, if any. Shapes: T tokens, E experts, K top-k, N = T*K slots.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace flexkern {

enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kRouteMaxExperts = 256;
constexpr int kRouteMaxTopK = 16;
constexpr int kDispatchMaxExperts = 1024;

enum class Scoring : int { kSoftmax = 0, kSigmoid = 1 };
constexpr int kRouteMaxGroups = 32;

// The gate's settings (the rules are flexkern/ops/route.py's module docstring).
//   scoring        softmax over the (active) experts, or a sigmoid per expert
//   reroute        with a mask: masked experts score 0 and are chosen only after every active one;
//                  otherwise the mask is ignored here (dispatch drops those slots later)
//   renormalize    the K weights are divided by their sum
//   score_bias_E   (E,) float32 or null: added to the scores for the choice only, not the weights
//   n_group > 1    group-limited choice: n_group equal groups of consecutive experts, each scored
//                  by the sum of its two best choices; only the topk_group best groups are eligible
//   routed_scaling the weights are multiplied by it last
struct RouteGate {
  Scoring scoring = Scoring::kSoftmax;
  bool reroute = true;
  bool renormalize = false;
  const float* score_bias_E = nullptr;
  int n_group = 1;
  int topk_group = 1;
  float routed_scaling = 1.f;
};

// Fused gate: scores, choice, top-k, renormalisation and scaling, per-expert pick counts and the
// per-token log-sum-exp, in one launch.
//   logits_TE  (T, E) in `dtype`, row-major         bias_E  (E,) float32 or null (added to logits)
//   mask_E     (E,) bool bytes or null (see RouteGate::reroute)
//   weights_TK (T, K) float32    experts_TK (T, K) int32, descending choice, ties to the lower id;
//              a slot whose expert is not eligible (masked, or outside the chosen groups) weighs 0
//   lse_T      (T,) float32 or null: logsumexp of logits + bias, mask not applied (router z-loss)
//   counts_E   (E,) int32 or null: incremented by how many slots picked each expert (zero it first)
// Requires 1 <= E <= kRouteMaxExperts, 1 <= K <= min(E, kRouteMaxTopK), and with n_group > 1:
// n_group <= kRouteMaxGroups dividing E into groups of >= 2, topk_group <= n_group and
// K <= topk_group * E / n_group.
cudaError_t route_topk(const void* logits_TE, FloatType dtype, const float* bias_E,
                       const uint8_t* mask_E, int64_t T, int E, int K, const RouteGate& gate,
                       float* weights_TK, int32_t* experts_TK, float* lse_T, int32_t* counts_E,
                       cudaStream_t stream);

// Bytes of scratch device memory `dispatch` needs for these sizes (0 for small inputs).
size_t dispatch_workspace_bytes(int64_t T, int K, int E);

// Stable counting sort of the N = T*K slots by expert id (see flexkern/ops/dispatch.py):
//   experts_TK     (T, K) int32 (or int64 when ids_int64), ids outside [0, E) are dropped
//   mask_E         (E,) bool bytes or null: slots of a masked expert are dropped
//   offsets_E1     (E+1,) int64     token_of_row_N, slot_of_row_N (N,) int32, -1 past routed rows
//   row_of_slot_TK (T, K) int32, -1 for dropped slots
// Requires 1 <= E <= kDispatchMaxExperts, N < 2^31 and workspace_bytes >= dispatch_workspace_bytes.
cudaError_t dispatch(const void* experts_TK, bool ids_int64, const uint8_t* mask_E, int64_t T,
                     int K, int E, void* workspace, size_t workspace_bytes, int64_t* offsets_E1,
                     int32_t* token_of_row_N, int32_t* slot_of_row_N, int32_t* row_of_slot_TK,
                     cudaStream_t stream);

}  // namespace flexkern
