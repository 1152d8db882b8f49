// The experts policy: bundles the activation and quantization scheme of the two expert GEMMs and
// declares the numeric contract both backends follow.
//
// Rounding points (identical on every backend):
//   GEMM1: products of ActElement x WeightElement accumulated in float (ElementAccumulator),
//          + bias (float), activation (float), rounded once to ElementIntermediate.
//   GEMM2: ElementIntermediate x WeightElement accumulated in float, + bias, x router weight
//          (float), rounded to ElementIO per (token, slot), as vLLM's [M, k, H] cache.
//   Finalize: the k slot results of a token summed in float in ascending slot order, rounded
//          once to ElementIO.
#pragma once

#include "moe/activation.h"
#include "moe/quant/scheme.h"

namespace moe {

template <class Activation_, class Quant_>
struct Experts {
  static_assert(ActivationPolicy<Activation_>,
                "moe::Experts: Activation must satisfy moe::ActivationPolicy: derive from moe::GatedActivation "
                "(define static float apply(float gate, float up)) or moe::UngatedActivation (define static float "
                "apply(float x)), and give it a static constexpr std::string_view kName");
  static_assert(quant::QuantScheme<Quant_>,
                "moe::Experts: Quant must satisfy moe::quant::QuantScheme (e.g. moe::quant::BF16)");

  using Activation = Activation_;
  using Quant = Quant_;
  using ElementAccumulator = float;
  using ElementIntermediate = typename Quant::ActElement;
  static constexpr bool kGated = Activation::kGated;
};

template <class X>
concept ExpertsPolicy = requires {
  typename X::Activation;
  typename X::Quant;
  typename X::ElementAccumulator;
  typename X::ElementIntermediate;
} && ActivationPolicy<typename X::Activation> && quant::QuantScheme<typename X::Quant>;

}  // namespace moe
