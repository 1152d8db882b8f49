// User output epilogues (moe/output_epilogue.h) on the CPU backend: the stored output is the
// user's tree over the same fp32 sum the built-in finalize rounds, so with f32 outputs it equals
// the tree applied to the default kernel's output bit for bit, whatever the chunking, row strides
// or aliasing of the leaves; a leaf the tree reads but the caller did not bind is an error that
// names it and writes nothing.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "moe/cpu/kernel.h"
#include "moe/quant/none.h"
#include "testing/lib/harness.h"

namespace moe::testing {
namespace {

using namespace moe::epilogue;
template <class T, class Out = Reduced>
using SpecWith = moe::Spec<routing::Precomputed, StandardPrepareFinalize<>, Experts<SiluAndMul, quant::None<T>>, Out>;

using ResidualPlusScaled = Plus<TokenTensor<0>, Times<Scalar<0>, Reduced>>;
using ClampedChannelScaled = Times<Min<Max<Reduced, Scalar<0>>, Scalar<1>>, ChannelVector<0>>;

static_assert(LeafUse<ResidualPlusScaled>::kScalars == 1 && LeafUse<ResidualPlusScaled>::kTokenTensors == 1 &&
              LeafUse<ResidualPlusScaled>::kChannelVectors == 0);
static_assert(LeafUse<ClampedChannelScaled>::kScalars == 2 && LeafUse<ClampedChannelScaled>::kChannelVectors == 1);
static_assert(LeafUse<Plus<Scalar<3>, TokenTensor<2>>>::kScalars == 4 &&
              LeafUse<Plus<Scalar<3>, TokenTensor<2>>>::kTokenTensors == 3);

Case chunked_case() {
  Case c;
  c.M = 23;
  c.H = 40;
  c.I = 24;
  c.E = 6;
  c.top_k = 2;
  c.chunk_tokens = 5;  // five chunks: the token index of every leaf is global, not per chunk
  c.seed = 77;
  return c;
}

// The default kernel's output on the same inputs (the harnesses draw the same values: the user
// leaves are drawn after everything else).
template <class T>
std::vector<T> default_output(const Case& c) {
  Harness<SpecWith<T>> d(c);
  check(d.run());
  return d.output;
}

TEST(OutputEpilogue, ResidualPlusScaledSumIsTheTreeOverTheSum) {
  const Case c = chunked_case();
  Harness<SpecWith<float, ResidualPlusScaled>> h(c);
  h.epilogue_scalars[0] = 0.625f;
  ASSERT_TRUE(h.run().is_ok());
  const std::vector<float> sum = default_output<float>(c);
  for (std::size_t i = 0; i < sum.size(); ++i) {
    const float expected = h.token_tensors[0][i] + 0.625f * sum[i];
    ASSERT_EQ(h.output[i], expected) << "element " << i;
  }
}

TEST(OutputEpilogue, Bf16RoundsOnceAfterTheTree) {
  const Case c = chunked_case();
  Harness<SpecWith<bfloat16, ResidualPlusScaled>> h(c);
  h.epilogue_scalars[0] = -1.25f;
  ASSERT_TRUE(h.run().is_ok());
  const std::vector<bfloat16> sum = default_output<bfloat16>(c);
  // The default output is the sum rounded to bf16; the tree sees the unrounded sum: one bf16
  // rounding of the sum (2^-8 relative) times |scale| apart, plus the final rounding.
  std::vector<float> expected(sum.size());
  for (std::size_t i = 0; i < sum.size(); ++i) {
    expected[i] = to_float(h.token_tensors[0][i]) - 1.25f * to_float(sum[i]);
  }
  EXPECT_TRUE(all_close(h.output_float(), expected, Tolerance{1e-2, 2e-2}));
}

TEST(OutputEpilogue, ClampAndPerChannelScale) {
  const Case c = chunked_case();
  Harness<SpecWith<float, ClampedChannelScaled>> h(c);
  h.epilogue_scalars[0] = -0.05f;
  h.epilogue_scalars[1] = 0.05f;
  ASSERT_TRUE(h.run().is_ok());
  const std::vector<float> sum = default_output<float>(c);
  int clamped = 0, inside = 0;
  for (Index m = 0; m < c.M; ++m) {
    for (Index col = 0; col < c.H; ++col) {
      const std::size_t i = static_cast<std::size_t>(m * c.H + col);
      const float s = sum[i];
      const float kept = s < -0.05f ? -0.05f : (s > 0.05f ? 0.05f : s);
      (kept == s ? inside : clamped) += 1;
      ASSERT_EQ(h.output[i], kept * h.channel_vectors[0][col]) << "token " << m << " column " << col;
    }
  }
  EXPECT_GT(clamped, 0);  // the bounds cut some sums and leave others: both branches ran
  EXPECT_GT(inside, 0);
}

TEST(OutputEpilogue, SpacedRowsAndAResidualThatIsTheOutput) {
  const Case c = chunked_case();
  using S = SpecWith<float, Plus<TokenTensor<0>, Times<Scalar<0>, Times<ChannelVector<0>, Reduced>>>>;
  Harness<S> h(c);
  h.epilogue_scalars[0] = 2.0f;
  ASSERT_TRUE(h.run().is_ok());
  const std::vector<float> contiguous = h.output;

  // The same residual through a view whose rows are spaced (a column slice of a wider buffer).
  const Index ld = c.H + 5;
  std::vector<float> padded(static_cast<std::size_t>(c.M * ld), 99.0f);
  for (Index m = 0; m < c.M; ++m)
    for (Index col = 0; col < c.H; ++col) padded[m * ld + col] = h.token_tensors[0][m * c.H + col];
  auto a = h.arguments();
  a.epilogue.token_tensors[0] = HostView<const float, 2>(padded.data(), {c.M, c.H}, {ld, 1});
  std::fill(h.output.begin(), h.output.end(), -7.0f);
  cpu::Options o;
  o.chunk_tokens = c.chunk_tokens;
  const Kernel<S, cpu::Eigen> kernel(o);
  const Status strided = kernel.run(a);
  ASSERT_TRUE(strided.is_ok()) << strided.to_string();
  EXPECT_EQ(h.output, contiguous);

  // In place: the residual is the output buffer itself (read before written, element by element).
  h.output = h.token_tensors[0];
  a = h.arguments();
  a.epilogue.token_tensors[0] = HostView<const float, 2>(h.output.data(), {c.M, c.H});
  const Status in_place = kernel.run(a);
  ASSERT_TRUE(in_place.is_ok()) << in_place.to_string();
  EXPECT_EQ(h.output, contiguous);
}

TEST(OutputEpilogue, AnUnboundOrMisshapedLeafIsAnErrorAndWritesNothing) {
  const Case c = chunked_case();
  Harness<SpecWith<float, ClampedChannelScaled>> h(c);
  const std::vector<float> before = h.output;
  auto a = h.arguments();
  a.epilogue.channel_vectors[0].reset();
  Status s = Harness<SpecWith<float, ClampedChannelScaled>>::Kernel().run(a);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "epilogue.channel_vectors[0]: read by the output epilogue, not given");
  EXPECT_EQ(h.output, before);

  std::vector<float> longer(static_cast<std::size_t>(c.H + 1), 1.0f);
  a.epilogue.channel_vectors[0] = HostView<const float, 1>(longer.data(), {c.H + 1});
  s = Harness<SpecWith<float, ClampedChannelScaled>>::Kernel().run(a);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("epilogue.channel_vectors[0]: expected shape [H=40]"), std::string::npos) << s.message();
  EXPECT_EQ(h.output, before);

  Harness<SpecWith<float, ResidualPlusScaled>> r(c);
  auto b = r.arguments();
  std::vector<float> short_residual(static_cast<std::size_t>((c.M - 1) * c.H));
  b.epilogue.token_tensors[0] = HostView<const float, 2>(short_residual.data(), {c.M - 1, c.H});
  s = Harness<SpecWith<float, ResidualPlusScaled>>::Kernel().run(b);
  EXPECT_NE(s.message().find("epilogue.token_tensors[0]: expected shape [M=23, H=40]"), std::string::npos)
      << s.message();
}

}  // namespace
}  // namespace moe::testing
