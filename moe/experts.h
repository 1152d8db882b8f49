// The experts policy: bundles the activation, the quantization scheme of the two expert GEMMs and
// the element type of hidden states and output (IO: bf16, f16 or f32; by default the scheme's),
// and declares the numeric contract both backends follow.
//
// Rounding points (identical on every backend):
//   GEMM1: products of ElementIO x WeightElement accumulated in float (ElementAccumulator),
//          + bias (float), activation (float), rounded once to ElementIntermediate (= ElementIO).
//          A quantized scheme first quantizes the rows and scales the products (moe/quant/w8a8.h).
//   GEMM2: ElementIntermediate x WeightElement accumulated in float (quantized schemes: the
//          intermediate quantized first), + bias, x router weight (float), rounded to ElementIO
//          per (token, slot), as vLLM's [M, k, H] cache.
//   Finalize: the k slot results of a token summed in float in ascending slot order, rounded
//          once to ElementIO.
#pragma once

#include <type_traits>

#include "moe/activation.h"
#include "moe/quant/numeric.h"
#include "moe/quant/scheme.h"

namespace moe {

template <class Activation_, class Quant_, class IO_ = typename Quant_::DefaultIO>
struct Experts {
  static_assert(ActivationPolicy<Activation_>,
                "moe::Experts: Activation must satisfy moe::ActivationPolicy: derive from moe::GatedActivation "
                "(define static float apply(float gate, float up)) or moe::UngatedActivation (define static float "
                "apply(float x)), and give it a static constexpr std::string_view kName");
  static_assert(quant::QuantScheme<Quant_>,
                "moe::Experts: Quant must satisfy moe::quant::QuantScheme (e.g. moe::quant::BF16)");

  static_assert(is_storage_float_v<IO_>, "moe::Experts: IO must be float, moe::half or moe::bfloat16");
  static_assert(Quant_::kQuantized || quant::weight_only_v<Quant_> || std::is_same_v<IO_, typename Quant_::WeightElement>,
                "moe::Experts: an unquantized scheme's weights are stored in the IO type (quant::None<IO>)");
  static_assert(!quant::weight_only_v<Quant_> || !std::is_same_v<IO_, float>,
                "moe::Experts: the weight-only schemes dequantize to bf16 or f16 activations (vLLM's W4A16/W8A16)");

  using Activation = Activation_;
  using Quant = Quant_;
  using ElementIO = IO_;
  using ElementAccumulator = float;
  using ElementIntermediate = IO_;
  static constexpr bool kGated = Activation::kGated;
};

template <class X>
concept ExpertsPolicy = requires {
  typename X::Activation;
  typename X::Quant;
  typename X::ElementIO;
  typename X::ElementAccumulator;
  typename X::ElementIntermediate;
} && ActivationPolicy<typename X::Activation> && quant::QuantScheme<typename X::Quant>;

}  // namespace moe
