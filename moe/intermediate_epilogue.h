// Intermediate epilogues: a user expression applied to the activation's result inside GEMM1's
// epilogue, before the intermediate is rounded to its storage type and fed to GEMM2.
//
//   // inter = clamp(act(gate, up) * channel_scale[i], -s0, s0)
//   using namespace moe::epilogue;
//   using Act = moe::ActivationThen<moe::SiluAndMul,
//                                   Min<Max<Times<Activated, ChannelVector<0>>, Scalar<1>>, Scalar<0>>>;
//   using MySpec = moe::Spec<Routing, moe::StandardPrepareFinalize<>, moe::Experts<Act, moe::quant::BF16>>;
//   args.activation.epilogue.scalars = {4.0f, -4.0f};
//   args.activation.epilogue.channel_vectors[0] = scale;   // [I] floats in the backend's memory
//
// ActivationThen<A, Expr> is an activation policy: it has A's name, gating and w13 layout, and its
// Arguments carry A's (`.activation`) and the expression's run-time leaves (`.epilogue`): Scalar<I>
// and ChannelVector<I> (one float per intermediate column; TokenTensor is not available here, rows
// are grouped by expert). Every backend and schedule evaluates the same tree: the CUDA GEMM1
// epilogues per element (fused swap mainloop, its split-K reduction, the activation pass of the
// CUTLASS schedule, the Sm80 mainloops), the CPU one per block. So a user expression is fused into
// GEMM1 with no new kernel code, like a user activation.
#pragma once

#include <memory>
#include <string>
#include <type_traits>

#include "moe/activation.h"
#include "moe/config.h"
#include "moe/epilogue.h"
#include "moe/output_epilogue.h"  // LeafUse, kMaxEpilogueLeaves
#include "moe/status.h"

namespace moe {

// The run-time leaves of an intermediate epilogue, plain so that kernels take them by value:
// pointers into the backend's memory (device memory for CUDA).
struct IntermediateEpilogueArguments {
  float scalars[kMaxEpilogueLeaves] = {};
  const float* channel_vectors[kMaxEpilogueLeaves] = {};  // [I] each, contiguous
  Index channel_vector_lengths[kMaxEpilogueLeaves] = {};  // checked against I before any work
};

template <class A, class Expr>
struct ActivationThen {
  static_assert(ActivationPolicy<A>, "moe::ActivationThen<A, Expr>: A must be an activation policy");
  using Inner = A;
  using Epilogue = Expr;
  static constexpr std::string_view kName = A::kName;
  static constexpr bool kGated = A::kGated;
  static constexpr GateUpLayout kLayout = A::kLayout;
  static constexpr bool kIsHeavy = true;  // fast paths that special-case cheap activations stay off
  struct Arguments {
    typename A::Arguments activation{};
    IntermediateEpilogueArguments epilogue{};
  };
  // The activation alone (the expression needs the column, which only the epilogue tree has).
  MOE_HOST_DEVICE static float apply(float gate, float up, const Arguments& a)
    requires(A::kGated)
  {
    return apply_gated<A>(gate, up, a.activation);
  }
  MOE_HOST_DEVICE static float apply(float x, const Arguments& a)
    requires(!A::kGated)
  {
    return apply_ungated<A>(x, a.activation);
  }
};

template <class A>
inline constexpr bool kIsActivationThen = false;
template <class A, class Expr>
inline constexpr bool kIsActivationThen<ActivationThen<A, Expr>> = true;

namespace epilogue {

// The activation's result, in fp32, before the rounding to the intermediate storage type.
struct Activated {
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) { return c.activated(); }
};

// A context as the inner activation's tree sees it: everything of `Ctx`, but the activation
// arguments are the inner policy's.
template <class Ctx, class Wrapper>
struct InnerContext {
  const Ctx& c;
  MOE_FORWARDING_HOST_DEVICE
  template <Part P>
  MOE_HOST_DEVICE float accumulator() const { return c.template accumulator<P>(); }
  MOE_FORWARDING_HOST_DEVICE
  template <Part P>
  MOE_HOST_DEVICE float bias() const { return c.template bias<P>(); }
  MOE_FORWARDING_HOST_DEVICE
  MOE_HOST_DEVICE float router_weight() const { return c.router_weight(); }
  template <Part P>
  auto accumulator_block() const { return c.template accumulator_block<P>(); }
  template <Part P>
  auto bias_block() const { return c.template bias_block<P>(); }
  auto router_weight_block() const { return c.router_weight_block(); }
  MOE_FORWARDING_HOST_DEVICE
  template <class A>
  MOE_HOST_DEVICE const typename A::Arguments& activation_arguments() const {
    return c.template activation_arguments<Wrapper>().activation;
  }
};

// One element of the user expression: the activated value, its column, the wrapper's arguments.
template <class Wrapper>
struct IntermediateContext {
  const typename Wrapper::Arguments& args;
  Index column;
  float value;
  MOE_HOST_DEVICE float activated() const { return value; }
  MOE_HOST_DEVICE float scalar(int i) const { return args.epilogue.scalars[i]; }
  MOE_HOST_DEVICE float channel_vector(int i) const { return args.epilogue.channel_vectors[i][column]; }
};

// Core (the inner activation's tree), then the user expression on its value. Element-wise needs
// the context's column(); the block path evaluates Core as a block, then the expression per
// element.
template <class Wrapper, class Core>
struct Then {
  using Expr = typename Wrapper::Epilogue;
  MOE_FORWARDING_HOST_DEVICE
  template <class Ctx>
  MOE_HOST_DEVICE static float eval(const Ctx& c) {
    const float v = Core::eval(InnerContext<Ctx, Wrapper>{c});
    return Expr::eval(IntermediateContext<Wrapper>{c.template activation_arguments<Wrapper>(), c.column(), v});
  }
  template <class Ctx>
  static auto eigen(const Ctx& c) {
    using Block = typename Ctx::EigenBlock;  // a row-major float array (moe/cpu/experts_stage.h)
    Block core = Core::eigen(InnerContext<Ctx, Wrapper>{c});
    const typename Wrapper::Arguments args = c.template activation_arguments<Wrapper>();
    for (Index r = 0; r < core.rows(); ++r) {
      for (Index col = 0; col < core.cols(); ++col) {
        core(r, col) = Expr::eval(IntermediateContext<Wrapper>{args, col, core(r, col)});
      }
    }
    // An expression that owns the block: the nodes above (RoundTo) keep expressions by value but
    // plain arrays by reference, so returning the array itself would leave them a dangling one.
    const Index rows = core.rows(), cols = core.cols();
    return Block::NullaryExpr(rows, cols, OwnedBlock<Block>{std::make_shared<const Block>(std::move(core))});
  }

 private:
  template <class Block>
  struct OwnedBlock {
    std::shared_ptr<const Block> block;
    float operator()(Index r, Index c) const { return (*block)(r, c); }
  };
};

namespace detail {
template <class A, class E, class T, bool HasBias>
struct Gemm1Core<ActivationThen<A, E>, T, HasBias> {
  using type = Then<ActivationThen<A, E>, typename Gemm1Core<A, T, HasBias>::type>;
};
}  // namespace detail

}  // namespace epilogue

namespace detail {
// The channel vectors the expression reads are given, each of length I.
template <class Activation>
Status validate_intermediate_epilogue(const typename Activation::Arguments& a, Index intermediate) {
  if constexpr (kIsActivationThen<Activation>) {
    using Use = epilogue::LeafUse<typename Activation::Epilogue>;
    static_assert(Use::kTokenTensors == 0, "intermediate epilogue: TokenTensor is not available inside GEMM1");
    static_assert(Use::kScalars <= kMaxEpilogueLeaves && Use::kChannelVectors <= kMaxEpilogueLeaves,
                  "intermediate epilogue: leaf index beyond moe::kMaxEpilogueLeaves");
    for (int i = 0; i < Use::kChannelVectors; ++i) {
      const std::string name = "activation.epilogue.channel_vectors[" + std::to_string(i) + "]";
      if (a.epilogue.channel_vectors[i] == nullptr) {
        return invalid_argument(name, ": read by the intermediate epilogue, not given");
      }
      if (a.epilogue.channel_vector_lengths[i] != intermediate) {
        return invalid_argument(name, ": expected length I=", intermediate, ", got ", a.epilogue.channel_vector_lengths[i]);
      }
    }
  }
  return Status::ok();
}
}  // namespace detail

}  // namespace moe
