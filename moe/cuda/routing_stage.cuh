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

  // Workspace regions for chunks of at most `chunk` tokens (moe/stages.h); empty for precomputed
  // routing. Scratch for every token of the chunk: one thread routes each.
  using Plan = RoutingPlan;
  template <class Carver>
  static Plan plan(Index chunk, int top_k, Index num_experts) {
    if constexpr (!Routing::kUsesLogits) {
      return {};
    } else {
      const std::size_t tokens = static_cast<std::size_t>(chunk > 0 ? chunk : 0);
      const std::size_t experts = static_cast<std::size_t>(num_experts);
      return plan_routing_regions<Carver>(tokens * routing::kScratchPerExpert * experts, tokens * experts, chunk * top_k);
    }
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
