// Epilogue expressions: the element-wise work around the expert GEMMs, written once as a tree
// of small types that compose at compile time (Eigen's expression templates, CUTLASS's epilogue
// visitor trees).
//
// A tree is evaluated two ways, and both must agree:
//  * eval(ctx): one element at a time (MOE_HOST_DEVICE). The CUDA GEMM epilogues call this on
//    the accumulator fragment they hold in registers.
//  * eigen(ctx): a whole block at once, as an Eigen array expression. The CPU backend assigns it
//    to the destination, so Eigen fuses the tree into one loop.
//
// Leaves read from the context: the accumulator (whole, or its gate/up half for gated
// activations), the per-expert bias of the output column, and the per-row router weight.
// Nodes combine: Plus, Minus, Times, Min, Max, Activate, GatedActivate, and RoundTo<T> (round to
// the storage precision; the hook where quantization of the intermediate goes later).
//
// Output epilogues (a Spec's fourth policy, moe/output_epilogue.h) are trees a user writes over
// the finalize's fp32 top-k sum (Reduced) and run-time leaves bound through Arguments::epilogue:
// Scalar<I>, ChannelVector<I> (one float per output column) and TokenTensor<I> (an [M, H] tensor
// such as a residual). They are evaluated element by element (eval) on both backends.
#pragma once

#include "moe/activation.h"
#include "moe/config.h"
#include "moe/quant/numeric.h"

namespace moe::epilogue {

// Which part of a GEMM1 accumulator row a leaf reads.
enum class Part { kAll, kGate, kUp };

// ---- leaves -------------------------------------------------------------------------------
template <Part P = Part::kAll>
struct Accumulator {
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return c.template accumulator<P>(); }
  template <class Ctx>
  static auto eigen(const Ctx& c) { return c.template accumulator_block<P>(); }
};

template <Part P = Part::kAll>
struct Bias {
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return c.template bias<P>(); }
  template <class Ctx>
  static auto eigen(const Ctx& c) { return c.template bias_block<P>(); }
};

struct RouterWeight {
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return c.router_weight(); }
  template <class Ctx>
  static auto eigen(const Ctx& c) { return c.router_weight_block(); }
};

// Leaves of output epilogues (moe/output_epilogue.h): evaluated with eval() only.
struct Reduced {  // the token's weighted sum over its top-k expert outputs, fp32, not yet rounded
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return c.reduced(); }
};
template <int I>
struct Scalar {  // Arguments::epilogue.scalars[I]
  static_assert(I >= 0, "moe::epilogue::Scalar<I>: I must be >= 0");
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return c.scalar(I); }
};
template <int I>
struct ChannelVector {  // Arguments::epilogue.channel_vectors[I] at the output column
  static_assert(I >= 0, "moe::epilogue::ChannelVector<I>: I must be >= 0");
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return c.channel_vector(I); }
};
template <int I>
struct TokenTensor {  // Arguments::epilogue.token_tensors[I] at the output token and column
  static_assert(I >= 0, "moe::epilogue::TokenTensor<I>: I must be >= 0");
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return c.token_tensor(I); }
};

// ---- nodes --------------------------------------------------------------------------------
template <class L, class R>
struct Plus {
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return L::eval(c) + R::eval(c); }
  template <class Ctx>
  static auto eigen(const Ctx& c) { return L::eigen(c) + R::eigen(c); }
};

template <class L, class R>
struct Minus {
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return L::eval(c) - R::eval(c); }
  template <class Ctx>
  static auto eigen(const Ctx& c) { return L::eigen(c) - R::eigen(c); }
};

// Min and Max are math::fmin/fmax (a < b ? a : b), the same on every backend; Min<Max<X, lo>, hi>
// clamps X to [lo, hi].
template <class L, class R>
struct Min {
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return math::fmin(L::eval(c), R::eval(c)); }
};
template <class L, class R>
struct Max {
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return math::fmax(L::eval(c), R::eval(c)); }
};

template <class L, class R>
struct Times {
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return L::eval(c) * R::eval(c); }
  template <class Ctx>
  static auto eigen(const Ctx& c) { return L::eigen(c) * R::eigen(c); }
};

// Functors carrying the activation's run-time Arguments into Eigen's unaryExpr / binaryExpr.
template <class A>
struct GatedFunctor {
  typename A::Arguments args;
  float operator()(float gate, float up) const { return apply_gated<A>(gate, up, args); }
};
template <class A>
struct UngatedFunctor {
  typename A::Arguments args;
  float operator()(float x) const { return apply_ungated<A>(x, args); }
};
template <class T>
struct RoundFunctor {
  float operator()(float x) const { return round_to<T>(x); }
};

template <class A, class Gate, class Up>
struct GatedActivate {
  static_assert(A::kGated, "moe::epilogue::GatedActivate needs a gated activation (kGated = true)");
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) {
    return apply_gated<A>(Gate::eval(c), Up::eval(c), c.template activation_arguments<A>());
  }
  template <class Ctx>
  static auto eigen(const Ctx& c) {
    return Gate::eigen(c).binaryExpr(Up::eigen(c), GatedFunctor<A>{c.template activation_arguments<A>()});
  }
};

template <class A, class X>
struct Activate {
  static_assert(!A::kGated, "moe::epilogue::Activate needs an ungated activation (kGated = false)");
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) {
    return apply_ungated<A>(X::eval(c), c.template activation_arguments<A>());
  }
  template <class Ctx>
  static auto eigen(const Ctx& c) {
    return X::eigen(c).unaryExpr(UngatedFunctor<A>{c.template activation_arguments<A>()});
  }
};

template <class T, class X>
struct RoundTo {
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return round_to<T>(X::eval(c)); }
  template <class Ctx>
  static auto eigen(const Ctx& c) {
    if constexpr (std::is_same_v<T, float>) {
      return X::eigen(c);
    } else {
      return X::eigen(c).unaryExpr(RoundFunctor<T>{});
    }
  }
};

// ---- element-wise evaluation context ------------------------------------------------------
// What a GEMM epilogue knows about one output element: the accumulator (whole, or the gate and
// up values that pair into it), the matching biases, the row's router weight, its column, and the
// activation's arguments. Used by the CUDA epilogues and by tests of the scalar path.
template <class Activation>
struct ElementContext {
  float acc[3] = {0, 0, 0};   // indexed by Part: all, gate, up
  float bias_[3] = {0, 0, 0};
  float weight = 1.0f;
  Index col = 0;  // output column (the intermediate column in GEMM1): for column-indexed leaves
  typename Activation::Arguments args{};

  template <Part P>
  MOE_HOST_DEVICE float accumulator() const { return acc[static_cast<int>(P)]; }
  MOE_HOST_DEVICE Index column() const { return col; }
  template <Part P>
  MOE_HOST_DEVICE float bias() const { return bias_[static_cast<int>(P)]; }
  MOE_HOST_DEVICE float router_weight() const { return weight; }
  template <class A>
  MOE_HOST_DEVICE const typename A::Arguments& activation_arguments() const { return args; }
};

// ---- the two epilogues of the experts stage ------------------------------------------------
// Rounding points, the same on both backends and on every CUDA schedule: GEMM1's accumulators
// (plus bias) are rounded to the intermediate storage type before the activation, as vLLM's
// intermediate cache and Hugging Face's 16-bit projections round them; the activation's result
// is rounded again. GEMM2's accumulator (plus bias) is rounded to the output type, then weighted
// by the router weight and rounded once more, as vLLM's TopKWeightAndReduce weights a stored
// expert output. So a schedule may store a GEMM's raw output in the storage type and apply the
// rest of the tree in a later pass, and still match a schedule that fuses it all.
namespace detail {
template <bool HasBias, Part P>
struct MaybeBiased {
  using type = Accumulator<P>;
};
template <Part P>
struct MaybeBiased<true, P> {
  using type = Plus<Accumulator<P>, Bias<P>>;
};
template <class T, bool HasBias, Part P>
using Stored = RoundTo<T, typename MaybeBiased<HasBias, P>::type>;

template <class A, class T, bool HasBias>
struct Gemm1Core {
  using type = GatedActivate<A, Stored<T, HasBias, Part::kGate>, Stored<T, HasBias, Part::kUp>>;
};
template <class A, class T, bool HasBias>
  requires(!A::kGated)
struct Gemm1Core<A, T, HasBias> {
  using type = Activate<A, Stored<T, HasBias, Part::kAll>>;
};
}  // namespace detail

// GEMM1: (accumulator + bias), stored -> activation -> rounded to the intermediate storage type.
template <class Activation, class ElementIntermediate, bool HasBias>
using Gemm1Epilogue =
    RoundTo<ElementIntermediate, typename detail::Gemm1Core<Activation, ElementIntermediate, HasBias>::type>;

// The same tree for a pass that reads GEMM1's output already stored in the intermediate type
// (no bias): the rounding of the stored values is then the identity and is left out (nvcc cannot
// see that, and the round trip cost the activation pass six instructions per value).
template <class Activation, class ElementIntermediate>
using Gemm1EpilogueOfStored =
    RoundTo<ElementIntermediate, typename detail::Gemm1Core<Activation, float, false>::type>;

// GEMM2: (accumulator + bias), stored -> times the router weight (unless it was applied to the
// input) -> rounded to the output storage type.
namespace detail {
template <class ElementOut, class ElementStored, bool HasBias, bool WeightOutput>
using Gemm2Tree = std::conditional_t<
    WeightOutput, RoundTo<ElementOut, Times<Stored<ElementStored, HasBias, Part::kAll>, RouterWeight>>,
    Stored<ElementStored, HasBias, Part::kAll>>;
}  // namespace detail
template <class ElementOut, bool HasBias, bool WeightOutput>
using Gemm2Epilogue = detail::Gemm2Tree<ElementOut, ElementOut, HasBias, WeightOutput>;
// The same tree for a pass over GEMM2's output already stored in the output type (no bias), the
// identity rounding of the stored values left out as in Gemm1EpilogueOfStored.
template <class ElementOut, bool WeightOutput>
using Gemm2EpilogueOfStored = detail::Gemm2Tree<ElementOut, float, false, WeightOutput>;

}  // namespace moe::epilogue
