// moe::Spec: a backend-agnostic description of one MoE layer, composed from policies.
//
//   using MySpec = moe::Spec<moe::routing::SoftmaxTopK,
//                            moe::StandardPrepareFinalize<>,
//                            moe::Experts<moe::SiluAndMul, moe::quant::BF16>>;
//   moe::Kernel<MySpec, moe::cpu::Eigen> kernel;   // moe/cpu/kernel.h
//
// An optional fourth policy is the output epilogue: an expression over the finalize's fp32 top-k
// sum that gives the stored output (moe/output_epilogue.h; default: the sum itself).
//
// The policies are checked here, once, with messages that say what is missing.
#pragma once

#include "moe/activation.h"
#include "moe/epilogue.h"
#include "moe/experts.h"
#include "moe/prepare_finalize.h"
#include "moe/routing.h"

namespace moe {

template <class Routing_, class PrepareFinalize_, class Experts_, class OutputEpilogue_ = epilogue::Reduced>
struct Spec {
  static_assert(routing::RoutingPolicy<Routing_>,
                "moe::Spec: Routing must satisfy moe::routing::RoutingPolicy: derive from moe::routing::TopKBase, "
                "give it kName and define static void route_token(const moe::routing::TokenContext&, const "
                "Arguments&)");
  static_assert(PrepareFinalizePolicy<PrepareFinalize_>,
                "moe::Spec: PrepareFinalize must satisfy moe::PrepareFinalizePolicy (e.g. "
                "moe::StandardPrepareFinalize<>)");
  static_assert(ExpertsPolicy<Experts_>, "moe::Spec: Experts must be a moe::Experts<Activation, Quant>");

  using Routing = Routing_;
  using PrepareFinalize = PrepareFinalize_;
  using Experts = Experts_;
  using OutputEpilogue = OutputEpilogue_;
  using Activation = typename Experts::Activation;
  using Quant = typename Experts::Quant;
  using ElementIO = typename Experts::ElementIO;  // hidden states and output
  using ElementWeight = typename Quant::WeightElement;
  static constexpr bool kGated = Activation::kGated;
};

}  // namespace moe
