// pybind11 module flexkern._C: the csrc/ launchers, called with integer device pointers, sizes and
// a CUDA stream handle (Python passes tensor.data_ptr() and torch.cuda.current_stream().cuda_stream;
// 0 stands for a null pointer / the default stream). Launches are asynchronous.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <pybind11/pybind11.h>

#include "flexkern.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

void check_launch(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flexkern._C.") + what + ": " + cudaGetErrorString(err));
  }
}

void route_topk(std::uintptr_t logits_TE, int dtype, std::uintptr_t bias_E, std::uintptr_t mask_E,
                int64_t T, int E, int K, bool reroute, bool renormalize, std::uintptr_t weights_TK,
                std::uintptr_t experts_TK, std::uintptr_t lse_T, std::uintptr_t counts_E,
                std::uintptr_t stream, int scoring, std::uintptr_t score_bias_E, int n_group,
                int topk_group, float routed_scaling) {
  require(dtype >= 0 && dtype <= 2, "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  require(T >= 0, "T must be >= 0");
  require(E >= 1 && E <= flexkern::kRouteMaxExperts,
          "route_topk supports 1 <= E <= " + std::to_string(flexkern::kRouteMaxExperts) +
              ", got E=" + std::to_string(E));
  require(K >= 1 && K <= E && K <= flexkern::kRouteMaxTopK,
          "route_topk supports 1 <= K <= min(E, " + std::to_string(flexkern::kRouteMaxTopK) +
              "), got K=" + std::to_string(K));
  require(scoring == 0 || scoring == 1, "scoring must be 0 (softmax) or 1 (sigmoid)");
  require(routed_scaling > 0.f && std::isfinite(routed_scaling),
          "routed_scaling must be finite and > 0");
  if (n_group == 1) {
    require(topk_group == 1, "topk_group must be 1 without groups (n_group == 1)");
  } else {
    require(n_group > 1 && n_group <= flexkern::kRouteMaxGroups && E % n_group == 0 &&
                E / n_group >= 2,
            "n_group must be in [2, " + std::to_string(flexkern::kRouteMaxGroups) +
                "] and split E into equal groups of at least 2");
    require(topk_group >= 1 && topk_group <= n_group && K <= topk_group * (E / n_group),
            "need 1 <= topk_group <= n_group and K <= topk_group * E / n_group");
  }
  require(T == 0 || (logits_TE != 0 && weights_TK != 0 && experts_TK != 0),
          "logits, weights and experts pointers must be non-null");
  flexkern::RouteGate gate;
  gate.scoring = static_cast<flexkern::Scoring>(scoring);
  gate.reroute = reroute;
  gate.renormalize = renormalize;
  gate.score_bias_E = as_ptr<const float>(score_bias_E);
  gate.n_group = n_group;
  gate.topk_group = topk_group;
  gate.routed_scaling = routed_scaling;
  py::gil_scoped_release release;
  check_launch(flexkern::route_topk(as_ptr<const void>(logits_TE),
                                    static_cast<flexkern::FloatType>(dtype),
                                    as_ptr<const float>(bias_E), as_ptr<const uint8_t>(mask_E), T,
                                    E, K, gate, as_ptr<float>(weights_TK),
                                    as_ptr<int32_t>(experts_TK), as_ptr<float>(lse_T),
                                    as_ptr<int32_t>(counts_E), as_stream(stream)),
               "route_topk");
}

void dispatch(std::uintptr_t experts_TK, bool ids_int64, std::uintptr_t mask_E, int64_t T, int K,
              int E, std::uintptr_t workspace, std::size_t workspace_bytes,
              std::uintptr_t offsets_E1, std::uintptr_t token_of_row_N,
              std::uintptr_t slot_of_row_N, std::uintptr_t row_of_slot_TK, std::uintptr_t stream) {
  require(T >= 0 && K >= 1, "need T >= 0 and K >= 1");
  require(T <= INT32_MAX / K, "T*K must fit in int32");
  require(E >= 1 && E <= flexkern::kDispatchMaxExperts,
          "dispatch supports 1 <= E <= " + std::to_string(flexkern::kDispatchMaxExperts) +
              ", got E=" + std::to_string(E));
  require(workspace_bytes >= flexkern::dispatch_workspace_bytes(T, K, E),
          "workspace is smaller than dispatch_workspace_bytes(T, K, E)");
  require(offsets_E1 != 0, "offsets pointer must be non-null");
  py::gil_scoped_release release;
  check_launch(flexkern::dispatch(as_ptr<const void>(experts_TK), ids_int64,
                                  as_ptr<const uint8_t>(mask_E), T, K, E, as_ptr<void>(workspace),
                                  workspace_bytes, as_ptr<int64_t>(offsets_E1),
                                  as_ptr<int32_t>(token_of_row_N), as_ptr<int32_t>(slot_of_row_N),
                                  as_ptr<int32_t>(row_of_slot_TK), as_stream(stream)),
               "dispatch");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flexkern CUDA kernels (routing, dispatch) on raw device pointers";
  m.attr("ROUTE_MAX_EXPERTS") = flexkern::kRouteMaxExperts;
  m.attr("ROUTE_MAX_TOP_K") = flexkern::kRouteMaxTopK;
  m.attr("ROUTE_MAX_GROUPS") = flexkern::kRouteMaxGroups;
  m.attr("DISPATCH_MAX_EXPERTS") = flexkern::kDispatchMaxExperts;
  m.attr("FLOAT32") = static_cast<int>(flexkern::FloatType::kFloat32);
  m.attr("FLOAT16") = static_cast<int>(flexkern::FloatType::kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(flexkern::FloatType::kBFloat16);

  m.def("route_topk", &route_topk, py::arg("logits_TE"), py::arg("dtype"), py::arg("bias_E"),
        py::arg("mask_E"), py::arg("T"), py::arg("E"), py::arg("K"), py::arg("reroute"),
        py::arg("renormalize"), py::arg("weights_TK"), py::arg("experts_TK"), py::arg("lse_T"),
        py::arg("counts_E"), py::arg("stream"), py::arg("scoring") = 0, py::arg("score_bias_E") = 0,
        py::arg("n_group") = 1, py::arg("topk_group") = 1, py::arg("routed_scaling") = 1.0f,
        "Gate scores (softmax over active experts, or sigmoid) -> choice (score bias, group "
        "limit) -> top-k ids (int32) and weights (float32), optional renormalisation and "
        "scaling, per-token logsumexp (lse_T) and per-expert pick counts (counts_E); pointers may "
        "be 0 for the optional bias_E, mask_E, lse_T, counts_E, score_bias_E.");
  m.def("dispatch_workspace_bytes", &flexkern::dispatch_workspace_bytes, py::arg("T"),
        py::arg("K"), py::arg("E"), "Scratch bytes dispatch needs for these sizes.");
  m.def("dispatch", &dispatch, py::arg("experts_TK"), py::arg("ids_int64"), py::arg("mask_E"),
        py::arg("T"), py::arg("K"), py::arg("E"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("offsets_E1"), py::arg("token_of_row_N"), py::arg("slot_of_row_N"),
        py::arg("row_of_slot_TK"), py::arg("stream"),
        "Stable counting sort of the T*K slots by expert (layout of flexkern.ops.dispatch).");
}
