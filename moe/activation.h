// Activation policies: the element-wise function between the two expert GEMMs.
//
// An activation is a small class with a static `apply`. Gated activations combine the gate and up
// halves of GEMM1's output, apply(gate, up); ungated ones map one value, apply(x). The same
// definition runs on the CPU reference and inside the CUDA GEMM1 epilogue, so a user's activation
// is one class of about fifteen lines (see README.md).
//
// Layout of w13 rows for gated activations: [gate rows; up rows] (vLLM's concatenated w1/w3),
// unless the activation declares GateUpLayout::kInterleaved (gate, up, gate, up, ...), as gpt-oss's
// swigluoai does.
#pragma once

#include <concepts>
#include <string_view>

#include "moe/config.h"
#include "moe/detail/math.h"

namespace moe {

enum class GateUpLayout { kSplit, kInterleaved };

// Base for gated activations; provides the optional members' defaults.
struct GatedActivation {
  static constexpr bool kGated = true;
  static constexpr GateUpLayout kLayout = GateUpLayout::kSplit;
  static constexpr bool kIsHeavy = false;  // cost hint for fast paths; never changes results
  struct Arguments {};
};

// Base for activations without the multiply: w13 then has I rows, not 2*I.
struct UngatedActivation {
  static constexpr bool kGated = false;
  static constexpr GateUpLayout kLayout = GateUpLayout::kSplit;
  static constexpr bool kIsHeavy = false;
  struct Arguments {};
};

template <class A>
concept ActivationPolicy =
    requires {
      { A::kGated } -> std::convertible_to<bool>;
      { A::kName } -> std::convertible_to<std::string_view>;
      { A::kLayout } -> std::convertible_to<GateUpLayout>;
      typename A::Arguments;
    } &&
    (A::kGated ? (requires(float g, float u, const typename A::Arguments& a) { { A::apply(g, u, a) } -> std::convertible_to<float>; } ||
                  requires(float g, float u) { { A::apply(g, u) } -> std::convertible_to<float>; })
               : (requires(float x, const typename A::Arguments& a) { { A::apply(x, a) } -> std::convertible_to<float>; } ||
                  requires(float x) { { A::apply(x) } -> std::convertible_to<float>; }));

// Calls A::apply with or without its Arguments, whichever the policy defines.
template <class A>
MOE_HOST_DEVICE float apply_gated(float gate, float up, const typename A::Arguments& args) {
  if constexpr (requires { A::apply(gate, up, args); }) {
    return A::apply(gate, up, args);
  } else {
    return A::apply(gate, up);
  }
}
template <class A>
MOE_HOST_DEVICE float apply_ungated(float x, const typename A::Arguments& args) {
  if constexpr (requires { A::apply(x, args); }) {
    return A::apply(x, args);
  } else {
    return A::apply(x);
  }
}

namespace activation_detail {
MOE_HOST_DEVICE float silu(float x) { return x / (1.0f + math::exp(-x)); }
MOE_HOST_DEVICE float gelu_erf(float x) { return 0.5f * x * (1.0f + math::erf(x * 0.70710678118654752f)); }
MOE_HOST_DEVICE float gelu_tanh(float x) {
  constexpr float kSqrt2OverPi = 0.79788456080286536f;
  return 0.5f * x * (1.0f + math::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
}
}  // namespace activation_detail

// silu(gate) * up (vLLM "silu").
struct SiluAndMul : GatedActivation {
  static constexpr std::string_view kName = "silu_and_mul";
  MOE_HOST_DEVICE static float apply(float gate, float up) { return activation_detail::silu(gate) * up; }
};

// gelu(gate) * up with the exact erf form (vLLM "gelu", PyTorch approximate='none').
struct GeluAndMul : GatedActivation {
  static constexpr std::string_view kName = "gelu_and_mul";
  static constexpr bool kIsHeavy = true;
  MOE_HOST_DEVICE static float apply(float gate, float up) { return activation_detail::gelu_erf(gate) * up; }
};

// gelu(gate) * up with the tanh approximation (vLLM "gelu_tanh").
struct GeluTanhAndMul : GatedActivation {
  static constexpr std::string_view kName = "gelu_tanh_and_mul";
  static constexpr bool kIsHeavy = true;
  MOE_HOST_DEVICE static float apply(float gate, float up) { return activation_detail::gelu_tanh(gate) * up; }
};

// gpt-oss: gate clamped above at `limit`, up clamped to [-limit, limit],
// out = (up + 1) * gate * sigmoid(alpha * gate). Gate and up are interleaved in w13.
struct SwigluOai : GatedActivation {
  static constexpr std::string_view kName = "swigluoai";
  static constexpr GateUpLayout kLayout = GateUpLayout::kInterleaved;
  struct Arguments {
    float alpha = 1.702f;
    float limit = 7.0f;
  };
  MOE_HOST_DEVICE static float apply(float gate, float up, const Arguments& a) {
    const float g = math::fmin(gate, a.limit);
    const float u = math::clamp(up, -a.limit, a.limit);
    return (u + 1.0f) * g * math::sigmoid(a.alpha * g);
  }
};

// Ungated activations: w13 holds I rows and there is no multiply.
struct Silu : UngatedActivation {
  static constexpr std::string_view kName = "silu";
  MOE_HOST_DEVICE static float apply(float x) { return activation_detail::silu(x); }
};
struct Gelu : UngatedActivation {
  static constexpr std::string_view kName = "gelu";
  static constexpr bool kIsHeavy = true;
  MOE_HOST_DEVICE static float apply(float x) { return activation_detail::gelu_erf(x); }
};
// relu(x)^2 (vLLM "relu2", Nemotron-H style).
struct Relu2 : UngatedActivation {
  static constexpr std::string_view kName = "relu2";
  MOE_HOST_DEVICE static float apply(float x) {
    const float r = math::fmax(x, 0.0f);
    return r * r;
  }
};

// Any [gate; up] activation on w13 rows stored interleaved (gate 2c, up 2c + 1): the same function,
// for weights that come in that order. Every backend and schedule takes it (the CUDA fused swap
// tiles pair the rows across lanes). An epilogue applying it inside the Hopper prefill GEMM was
// measured slower than the activation pass (benchmarks/NOTES.md, session 19).
template <class A>
struct InterleavedGateUp : A {
  static_assert(A::kGated && A::kLayout == GateUpLayout::kSplit,
                "moe::InterleavedGateUp<A>: A must be a gated activation on [gate; up] rows");
  using Base = A;
  static constexpr GateUpLayout kLayout = GateUpLayout::kInterleaved;
};

static_assert(ActivationPolicy<SiluAndMul>);
static_assert(ActivationPolicy<InterleavedGateUp<SiluAndMul>>);
static_assert(ActivationPolicy<GeluAndMul>);
static_assert(ActivationPolicy<GeluTanhAndMul>);
static_assert(ActivationPolicy<SwigluOai>);
static_assert(ActivationPolicy<Silu>);
static_assert(ActivationPolicy<Gelu>);
static_assert(ActivationPolicy<Relu2>);

}  // namespace moe
