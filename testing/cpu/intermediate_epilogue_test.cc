// User intermediate epilogues (moe/intermediate_epilogue.h) on the CPU backend. Scaling every
// intermediate value by a power of two scales the whole forward by it exactly (every rounding
// commutes with it), and zeroing intermediate column i is zeroing column i of w2: both give bitwise
// expectations from the default kernel. Unbound or mis-sized leaves are errors that write nothing.
#include <gtest/gtest.h>

#include <vector>

#include "moe/cpu/kernel.h"
#include "moe/cpu/experts_stage.h"
#include "moe/quant/none.h"
#include "testing/lib/harness.h"

namespace moe::testing {
namespace {

using namespace moe::epilogue;
template <class T, class A>
using SpecWith = moe::Spec<routing::Precomputed, StandardPrepareFinalize<>, Experts<A, quant::None<T>>>;
using ChannelScaled = ActivationThen<SiluAndMul, Times<ChannelVector<0>, Activated>>;
using ScalarScaledClamped = ActivationThen<SiluAndMul, Min<Max<Times<Scalar<0>, Activated>, Scalar<1>>, Scalar<2>>>;

static_assert(ActivationPolicy<ChannelScaled> && ChannelScaled::kName == SiluAndMul::kName &&
              ChannelScaled::kGated && ChannelScaled::kLayout == GateUpLayout::kSplit);
static_assert(ActivationThen<SwigluOai, Activated>::kLayout == GateUpLayout::kInterleaved);

Case small_case() {
  Case c;
  c.M = 19;
  c.H = 32;
  c.I = 24;
  c.E = 5;
  c.top_k = 2;
  c.chunk_tokens = 7;
  c.seed = 31;
  return c;
}

template <class S>
Status run_with(Harness<S>& h, const typename S::Activation::Arguments& act) {
  auto a = h.arguments();
  a.activation = act;
  cpu::Options o;
  o.chunk_tokens = h.c.chunk_tokens;
  return Kernel<S, cpu::Eigen>(o).run(a);
}

template <class T>
void expect_power_of_two_scaling() {
  SCOPED_TRACE(to_string(dtype_of<T>));
  const Case c = small_case();
  Harness<SpecWith<T, SiluAndMul>> plain(c);
  ASSERT_TRUE(plain.run().is_ok());

  Harness<SpecWith<T, ChannelScaled>> h(c);
  std::vector<float> twos(static_cast<std::size_t>(c.I), 2.0f);
  typename ChannelScaled::Arguments act;
  act.epilogue.channel_vectors[0] = twos.data();
  act.epilogue.channel_vector_lengths[0] = c.I;
  ASSERT_TRUE(run_with(h, act).is_ok());
  for (std::size_t i = 0; i < h.output.size(); ++i) {
    ASSERT_EQ(to_float(h.output[i]), 2.0f * to_float(plain.output[i])) << "element " << i;
  }

  Harness<SpecWith<T, ScalarScaledClamped>> k(c);
  typename ScalarScaledClamped::Arguments sc;
  sc.epilogue.scalars[0] = 0.25f;
  sc.epilogue.scalars[1] = -1e30f;  // bounds that never bind: the clamp is the identity
  sc.epilogue.scalars[2] = 1e30f;
  ASSERT_TRUE(run_with(k, sc).is_ok());
  for (std::size_t i = 0; i < k.output.size(); ++i) {
    ASSERT_EQ(to_float(k.output[i]), 0.25f * to_float(plain.output[i])) << "element " << i;
  }
}

TEST(IntermediateEpilogue, PowerOfTwoScalingScalesTheForwardExactly) {
  expect_power_of_two_scaling<float>();
  expect_power_of_two_scaling<bfloat16>();
}

TEST(IntermediateEpilogue, ZeroedChannelsEqualZeroedW2Columns) {
  const Case c = small_case();
  std::vector<float> mask(static_cast<std::size_t>(c.I), 1.0f);
  for (Index i = 0; i < c.I; i += 3) mask[i] = 0.0f;

  Harness<SpecWith<float, ChannelScaled>> h(c);
  typename ChannelScaled::Arguments act;
  act.epilogue.channel_vectors[0] = mask.data();
  act.epilogue.channel_vector_lengths[0] = c.I;
  ASSERT_TRUE(run_with(h, act).is_ok());

  Harness<SpecWith<float, SiluAndMul>> zeroed(c);  // same inputs; w2 [E, H, I] with columns i cut
  for (Index e = 0; e < zeroed.E_local; ++e)
    for (Index r = 0; r < c.H; ++r)
      for (Index i = 0; i < c.I; ++i)
        if (mask[i] == 0.0f) zeroed.w2[(e * c.H + r) * c.I + i] = 0.0f;
  ASSERT_TRUE(zeroed.run().is_ok());
  EXPECT_EQ(h.output, zeroed.output);

  Harness<SpecWith<float, SiluAndMul>> plain(c);
  ASSERT_TRUE(plain.run().is_ok());
  EXPECT_NE(h.output, plain.output);  // the mask changed something
}

TEST(IntermediateEpilogue, UnboundOrMissizedChannelVectorIsAnErrorAndWritesNothing) {
  const Case c = small_case();
  Harness<SpecWith<float, ChannelScaled>> h(c);
  const std::vector<float> before = h.output;
  typename ChannelScaled::Arguments act;
  Status s = run_with(h, act);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "activation.epilogue.channel_vectors[0]: read by the intermediate epilogue, not given");
  EXPECT_EQ(h.output, before);

  std::vector<float> shorter(static_cast<std::size_t>(c.I - 1), 1.0f);
  act.epilogue.channel_vectors[0] = shorter.data();
  act.epilogue.channel_vector_lengths[0] = c.I - 1;
  s = run_with(h, act);
  EXPECT_EQ(s.message(), "activation.epilogue.channel_vectors[0]: expected length I=24, got 23");
  EXPECT_EQ(h.output, before);

  // The experts stage called on its own checks the same.
  using Stage = cpu::ExpertsStage<Experts<ChannelScaled, quant::F32>, float>;
  typename Stage::Weights w;
  w.w13 = HostView<const float, 3>(h.w13.data(), {h.E_local, 2 * c.I, c.H});
  w.w2 = HostView<const float, 3>(h.w2.data(), {h.E_local, c.H, c.I});
  w.activation = act;
  std::vector<float> in(static_cast<std::size_t>(c.H), 1.0f), out(static_cast<std::size_t>(c.H), 0.0f);
  std::vector<Index> begin(static_cast<std::size_t>(h.E_local), 0), count(static_cast<std::size_t>(h.E_local), 0);
  typename Stage::Rows r{HostView<const float, 2>(in.data(), {1, c.H}), HostView<float, 2>(out.data(), {1, c.H}),
                         HostView<const Index, 1>(begin.data(), {h.E_local}), HostView<const Index, 1>(count.data(), {h.E_local})};
  std::vector<std::byte> ws(Stage::workspace_bytes(w, r));
  s = Stage::run(w, r, ws);
  EXPECT_EQ(s.message(), "activation.epilogue.channel_vectors[0]: expected length I=24, got 23");
}

}  // namespace
}  // namespace moe::testing
