// CPU routing stage: runs a routing policy's route_token over a range of tokens.
#pragma once

#include <cstdint>
#include <optional>

#include "moe/routing.h"
#include "moe/tensor.h"

namespace moe::cpu {

template <class Routing>
struct RouterStage {
  static_assert(routing::RoutingPolicy<Routing>, "moe::cpu::RouterStage: Routing must satisfy moe::routing::RoutingPolicy");

  static constexpr std::size_t scratch_floats(Index num_experts) { return routing::kScratchPerExpert * num_experts; }
  static constexpr std::size_t scratch_ints(Index num_experts) { return num_experts; }

  // Routes tokens [begin, end) of `logits` ([M, E]); writes (end - begin) * top_k ids and weights.
  static void run(const typename Routing::Arguments& args, HostView<const float, 2> logits, const float* correction_bias,
                  Index begin, Index end, int top_k, float* scratch, std::int32_t* index_scratch, std::int32_t* ids,
                  float* weights) {
    const int num_experts = static_cast<int>(logits.extent(1));
    for (Index m = begin; m < end; ++m) {
      const Index slot = (m - begin) * top_k;
      // Logit rows are contiguous (validated); route_token reads them in place.
      routing::TokenContext t{&logits(m, 0), num_experts, top_k, correction_bias, scratch, index_scratch,
                              ids + slot, weights + slot};
      Routing::route_token(t, args);
    }
  }
};

}  // namespace moe::cpu
