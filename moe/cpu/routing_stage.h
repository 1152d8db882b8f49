// The routing stage on the CPU (moe/stages.h): a routing policy's route_token over a range of
// tokens, or the caller's precomputed ids and weights passed through.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moe/routing.h"
#include "moe/stages.h"
#include "moe/tensor.h"

namespace moe::cpu {

template <class Routing>
struct RoutingStage {
  static_assert(routing::RoutingPolicy<Routing>, "moe::cpu::RoutingStage: Routing must satisfy moe::routing::RoutingPolicy");

  static constexpr std::size_t scratch_floats(Index num_experts) { return routing::kScratchPerExpert * num_experts; }
  static constexpr std::size_t scratch_ints(Index num_experts) { return num_experts; }

  // Routes tokens [begin, end) of `logits` ([M, E]); writes (end - begin) * top_k ids and weights.
  static void route(const typename Routing::Arguments& args, HostView<const float, 2> logits,
                    const float* correction_bias, Index begin, Index end, int top_k, float* scratch,
                    std::int32_t* index_scratch, std::int32_t* ids, float* weights) {
    const int num_experts = static_cast<int>(logits.extent(1));
    for (Index m = begin; m < end; ++m) {
      const Index slot = (m - begin) * top_k;
      // Logit rows are contiguous (validated); route_token reads them in place.
      routing::TokenContext t{&logits(m, 0), num_experts, top_k, correction_bias, scratch, index_scratch,
                              ids + slot, weights + slot};
      Routing::route_token(t, args);
    }
  }

  // Workspace regions for chunks of at most `chunk` tokens (moe/stages.h); empty for precomputed
  // routing. One token's scratch: tokens are routed one after another.
  using Plan = RoutingPlan;
  template <class Carver>
  static Plan plan(Index chunk, int top_k, Index num_experts) {
    if constexpr (!Routing::kUsesLogits) return {};
    else return plan_routing_regions<Carver>(scratch_floats(num_experts), scratch_ints(num_experts), chunk * top_k);
  }

  // The slots of tokens [m0, m1) of a forward's Arguments; `base` is the plan's aligned region.
  template <class Args>
  static RoutedSlots run(const Plan& l, const Args& a, Index m0, Index m1, std::byte* base) {
    if constexpr (Routing::kUsesLogits) {
      auto* ids = reinterpret_cast<std::int32_t*>(base + l.ids);
      auto* weights = reinterpret_cast<float*>(base + l.weights);
      route(a.routing, a.router_logits, a.correction_bias ? a.correction_bias->data() : nullptr, m0, m1, a.top_k,
            reinterpret_cast<float*>(base + l.scratch), reinterpret_cast<std::int32_t*>(base + l.iscratch), ids, weights);
      return {ids, a.top_k, weights, a.top_k};
    } else {
      return {&(*a.topk_ids)(m0, 0), a.topk_ids->stride(0), &(*a.topk_weights)(m0, 0), a.topk_weights->stride(0)};
    }
  }
};

}  // namespace moe::cpu
