// Output epilogues: what the finalize stores, as an expression a user writes.
//
// The finalize of every backend sums each token's weighted expert outputs in fp32 (the leaf
// epilogue::Reduced) and stores the result rounded once to the output type. A Spec's fourth
// policy replaces "the result" by a tree of moe/epilogue.h's nodes, for example
//
//   // out = residual + scale * sum_k w_k * y_k, clamped to [lo, hi]
//   using namespace moe::epilogue;
//   using Out = Min<Max<Plus<TokenTensor<0>, Times<Scalar<0>, Reduced>>, Scalar<1>>, Scalar<2>>;
//   using MySpec = moe::Spec<Routing, moe::StandardPrepareFinalize<>, Experts, Out>;
//
// and the leaves are bound at run time through Arguments::epilogue (OutputEpilogueArguments):
// scalars[I], channel_vectors[I] ([H] floats: a per-channel scale) and token_tensors[I] ([M, H] in
// the output's element type, rows may be spaced: a residual; it may be the output itself, each
// element is read before it is written). Views are contiguous in their last dimension, as every
// view the kernels take. Every leaf the tree uses must be bound (checked with the other
// shapes, before anything is written). Both backends evaluate the tree element by element on the
// same fp32 sum, so CPU and GPU results agree as for the built-in finalize.
#pragma once

#include <array>
#include <optional>
#include <string>
#include <type_traits>

#include "moe/config.h"
#include "moe/detail/validate.h"
#include "moe/epilogue.h"
#include "moe/quant/numeric.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe {

inline constexpr int kMaxEpilogueLeaves = 4;  // of each kind: scalars, channel vectors, token tensors

namespace epilogue {

// How many leaves of each kind a tree reads (the largest index + 1), found by walking its nodes.
template <class E>
struct LeafUse {
  static constexpr int kScalars = 0, kChannelVectors = 0, kTokenTensors = 0;
};
template <int I>
struct LeafUse<Scalar<I>> {
  static constexpr int kScalars = I + 1, kChannelVectors = 0, kTokenTensors = 0;
};
template <int I>
struct LeafUse<ChannelVector<I>> {
  static constexpr int kScalars = 0, kChannelVectors = I + 1, kTokenTensors = 0;
};
template <int I>
struct LeafUse<TokenTensor<I>> {
  static constexpr int kScalars = 0, kChannelVectors = 0, kTokenTensors = I + 1;
};
template <template <class, class> class Node, class L, class R>
struct LeafUse<Node<L, R>> {
  static constexpr int kScalars = LeafUse<L>::kScalars > LeafUse<R>::kScalars ? LeafUse<L>::kScalars : LeafUse<R>::kScalars;
  static constexpr int kChannelVectors = LeafUse<L>::kChannelVectors > LeafUse<R>::kChannelVectors
                                             ? LeafUse<L>::kChannelVectors
                                             : LeafUse<R>::kChannelVectors;
  static constexpr int kTokenTensors =
      LeafUse<L>::kTokenTensors > LeafUse<R>::kTokenTensors ? LeafUse<L>::kTokenTensors : LeafUse<R>::kTokenTensors;
};
template <template <class, class, class> class Node, class A, class B, class C>
struct LeafUse<Node<A, B, C>> {
  static_assert(LeafUse<B>::kScalars + LeafUse<B>::kChannelVectors + LeafUse<B>::kTokenTensors +
                        LeafUse<C>::kScalars + LeafUse<C>::kChannelVectors + LeafUse<C>::kTokenTensors ==
                    0,
                "output epilogue: run-time leaves under a three-operand node are not supported");
  static constexpr int kScalars = 0, kChannelVectors = 0, kTokenTensors = 0;
};

// The plain form of the bound leaves that kernels take by value: pointers and strides.
template <class IO>
struct OutputEpilogueParams {
  float scalars[kMaxEpilogueLeaves] = {};
  const float* channel[kMaxEpilogueLeaves] = {};  // contiguous
  const IO* token[kMaxEpilogueLeaves] = {};        // rows token_row_stride apart, columns contiguous
  Index token_row_stride[kMaxEpilogueLeaves] = {};
};

// One output element: the token (global row), the column, and its fp32 sum.
template <class IO>
struct OutputContext {
  const OutputEpilogueParams<IO>& p;
  Index token, column;
  float sum;
  MOE_HOST_DEVICE float reduced() const { return sum; }
  MOE_HOST_DEVICE float scalar(int i) const { return p.scalars[i]; }
  MOE_HOST_DEVICE float channel_vector(int i) const { return p.channel[i][column]; }
  MOE_HOST_DEVICE float token_tensor(int i) const { return to_float(p.token[i][token * p.token_row_stride[i] + column]); }
};

// The stored output element: the tree over the sum, rounded once to IO.
template <class Expr, class IO>
MOE_HOST_DEVICE IO store_output(const OutputEpilogueParams<IO>& p, Index token, Index column, float sum) {
  if constexpr (std::is_same_v<Expr, Reduced>) {
    return from_float<IO>(sum);
  } else {
    return from_float<IO>(Expr::eval(OutputContext<IO>{p, token, column, sum}));
  }
}

}  // namespace epilogue

// Arguments::epilogue: the run-time leaves of the Spec's output epilogue, in the backend's memory.
template <class IO, class Space>
struct OutputEpilogueArguments {
  std::array<float, kMaxEpilogueLeaves> scalars{};
  std::array<std::optional<TensorView<const float, 1, Space>>, kMaxEpilogueLeaves> channel_vectors;  // [H]
  std::array<std::optional<TensorView<const IO, 2, Space>>, kMaxEpilogueLeaves> token_tensors;       // [M, H]

  epilogue::OutputEpilogueParams<IO> params() const {
    epilogue::OutputEpilogueParams<IO> p;
    for (int i = 0; i < kMaxEpilogueLeaves; ++i) {
      p.scalars[i] = scalars[i];
      if (channel_vectors[i]) p.channel[i] = channel_vectors[i]->data();
      if (token_tensors[i]) {
        p.token[i] = token_tensors[i]->data();
        p.token_row_stride[i] = token_tensors[i]->stride(0);
      }
    }
    return p;
  }
};

namespace detail {
// Every leaf the tree reads is bound with the right shape; none beyond kMaxEpilogueLeaves.
template <class Expr, class IO, class Space>
Status validate_output_epilogue(const OutputEpilogueArguments<IO, Space>& e, Index tokens, Index hidden) {
  using Use = epilogue::LeafUse<Expr>;
  static_assert(Use::kScalars <= kMaxEpilogueLeaves && Use::kChannelVectors <= kMaxEpilogueLeaves &&
                    Use::kTokenTensors <= kMaxEpilogueLeaves,
                "output epilogue: leaf index beyond moe::kMaxEpilogueLeaves");
  for (int i = 0; i < Use::kChannelVectors; ++i) {
    const std::string name = "epilogue.channel_vectors[" + std::to_string(i) + "]";
    if (!e.channel_vectors[i]) return invalid_argument(name, ": read by the output epilogue, not given");
    MOE_RETURN_IF_ERROR(expect_shape(*e.channel_vectors[i], name, std::array<Dim, 1>{{{"H", hidden}}}));
  }
  for (int i = 0; i < Use::kTokenTensors; ++i) {
    const std::string name = "epilogue.token_tensors[" + std::to_string(i) + "]";
    if (!e.token_tensors[i]) return invalid_argument(name, ": read by the output epilogue, not given");
    MOE_RETURN_IF_ERROR(expect_shape(*e.token_tensors[i], name, std::array<Dim, 2>{{{"M", tokens}, {"H", hidden}}}));
  }
  return Status::ok();
}
}  // namespace detail

}  // namespace moe
