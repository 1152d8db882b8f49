// The routing stage on the GPU (moe/stages.h): the generic path through the policy's route_token,
// one thread per token, for any policy (a user's included); or the caller's precomputed ids and
// weights passed through. The device layer's warp-level fast paths are in router.cuh.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moe/cuda/check.h"
#include "moe/cuda/stages.cuh"
#include "moe/detail/workspace.h"
#include "moe/routing.h"
#include "moe/stages.h"

namespace moe::cuda {

template <class Routing>
class RoutingStage {
 public:
  static_assert(routing::RoutingPolicy<Routing>, "moe::cuda::RoutingStage: Routing must satisfy moe::routing::RoutingPolicy");

  // Workspace regions (offsets from an aligned base) for chunks of at most `chunk` tokens: the
  // policy's per-token scratch and the ids and weights it writes. Empty for precomputed routing.
  struct Plan {
    std::size_t scratch = 0, iscratch = 0, ids = 0, weights = 0, total = 0;
  };
  template <class Carver>
  static Plan plan(Index chunk, int top_k, Index num_experts) {
    Plan l;
    if constexpr (Routing::kUsesLogits) {
      const auto n = [](Index v) { return static_cast<std::size_t>(v > 0 ? v : 0); };
      Carver c;
      l.scratch = c.take(n(chunk) * routing::kScratchPerExpert * n(num_experts) * sizeof(float));
      l.iscratch = c.take(n(chunk) * n(num_experts) * sizeof(std::int32_t));
      l.ids = c.take(n(chunk) * n(top_k) * sizeof(std::int32_t));
      l.weights = c.take(n(chunk) * n(top_k) * sizeof(float));
      l.total = c.total();
    }
    return l;
  }

  // The slots of tokens [m0, m0 + C) of a forward's Arguments (router_logits, correction_bias,
  // routing, or topk_ids / topk_weights), stream-ordered; `base` is the plan's aligned region.
  template <class Args>
  static Status run(const Plan& l, const Args& a, Index m0, Index C, std::byte* base, cudaStream_t stream,
                    RoutedSlots* out) {
    if constexpr (Routing::kUsesLogits) {
      auto* ids = reinterpret_cast<std::int32_t*>(base + l.ids);
      auto* weights = reinterpret_cast<float*>(base + l.weights);
      constexpr int kThreads = 128;
      detail::route_kernel<Routing><<<static_cast<unsigned>((C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          a.router_logits.data() + m0 * a.router_logits.stride(0), a.router_logits.stride(0), C,
          static_cast<int>(a.router_logits.extent(1)), a.top_k, a.correction_bias ? a.correction_bias->data() : nullptr,
          a.routing, reinterpret_cast<float*>(base + l.scratch), reinterpret_cast<std::int32_t*>(base + l.iscratch), ids,
          weights);
      MOE_CUDA_CHECK_LAUNCH();
      *out = {ids, a.top_k, weights, a.top_k};
    } else {
      *out = {a.topk_ids->data() + m0 * a.topk_ids->stride(0), a.topk_ids->stride(0),
              a.topk_weights->data() + m0 * a.topk_weights->stride(0), a.topk_weights->stride(0)};
    }
    return Status::ok();
  }
};

}  // namespace moe::cuda
