// End-to-end tests of moe::Kernel<Spec, moe::cpu::Eigen> against the independent naive forward
// (testing/lib/naive.h, double precision), over every policy family.
// Tolerances per dtype: see testing/lib/harness.h.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <optional>
#include <vector>

#include "testing/lib/harness.h"

namespace {

using moe::Index;
using moe::testing::Case;
using moe::testing::Harness;
using moe::testing::Random;
using moe::testing::tolerance;
using moe::testing::Tolerance;

template <class A, class Q = moe::quant::BF16, class R = moe::routing::Precomputed,
          class PF = moe::StandardPrepareFinalize<>>
using SpecOf = moe::Spec<R, PF, moe::Experts<A, Q>>;

std::function<moe::naive::Routed(const std::vector<float>&)> naive_softmax(int k, bool renorm, double rsf = 1.0,
                                                                            std::vector<float> bias = {}) {
  return [=](const std::vector<float>& l) {
    moe::naive::RoutingConfig c;
    c.top_k = k;
    c.renormalize = renorm;
    c.routed_scaling_factor = rsf;
    c.correction_bias = bias;
    return moe::naive::route(l, c);
  };
}

// ---------------------------------------------------------------------------------------------
// Activations x storage types (precomputed routing).

template <class S>
class ActivationDtypeTest : public ::testing::Test {};
using ActivationDtypeSpecs = ::testing::Types<
    SpecOf<moe::SiluAndMul, moe::quant::F32>, SpecOf<moe::SiluAndMul, moe::quant::F16>,
    SpecOf<moe::SiluAndMul, moe::quant::BF16>, SpecOf<moe::GeluAndMul>, SpecOf<moe::GeluTanhAndMul>,
    SpecOf<moe::SwigluOai>, SpecOf<moe::InterleavedGateUp<moe::SiluAndMul>>, SpecOf<moe::Silu>, SpecOf<moe::Gelu>,
    SpecOf<moe::Relu2, moe::quant::F32>>;
TYPED_TEST_SUITE(ActivationDtypeTest, ActivationDtypeSpecs);

TYPED_TEST(ActivationDtypeTest, MatchesNaive) {
  Case c;
  c.M = 37;
  c.H = 72;
  c.I = 40;  // not multiples of anything in particular
  Harness<TypeParam> h(c);
  EXPECT_TRUE(h.matches_naive());
}

TYPED_TEST(ActivationDtypeTest, WithBiases) {
  Case c;
  c.bias = true;
  c.seed = 7;
  Harness<TypeParam> h(c);
  EXPECT_TRUE(h.matches_naive());
}

// ---------------------------------------------------------------------------------------------
// Routing from logits through the full forward.

TEST(KernelRouting, SoftmaxRenormalizedWithScalingFactor) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::F32, moe::routing::SoftmaxTopK>;
  Case c;
  c.M = 50;
  c.E = 16;
  c.top_k = 4;
  c.naive_route = naive_softmax(4, true, 2.5);
  Harness<S> h(c);
  h.routing_args.renormalize = true;
  h.routing_args.routed_scaling_factor = 2.5f;
  EXPECT_TRUE(h.matches_naive());
}

TEST(KernelRouting, SigmoidWithCorrectionBias) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::BF16, moe::routing::SigmoidTopK>;
  Case c;
  c.M = 40;
  c.E = 32;
  c.top_k = 4;
  c.with_correction_bias = true;
  Harness<S> h0(c);  // to read the generated bias
  c.naive_route = [bias = h0.correction_bias](const std::vector<float>& l) {
    moe::naive::RoutingConfig rc;
    rc.scoring = moe::naive::Scoring::kSigmoid;
    rc.top_k = 4;
    rc.renormalize = true;
    rc.correction_bias = bias;
    return moe::naive::route(l, rc);
  };
  Harness<S> h(c);
  h.routing_args.renormalize = true;
  EXPECT_TRUE(h.matches_naive());
}

TEST(KernelRouting, GroupedTopKDeepSeekStyle) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::F32, moe::routing::GroupedTopK<moe::routing::Sigmoid>>;
  Case c;
  c.M = 33;
  c.E = 64;
  c.top_k = 6;
  c.with_correction_bias = true;
  Harness<S> h0(c);
  c.naive_route = [bias = h0.correction_bias](const std::vector<float>& l) {
    moe::naive::RoutingConfig rc;
    rc.scoring = moe::naive::Scoring::kSigmoid;
    rc.top_k = 6;
    rc.renormalize = true;
    rc.routed_scaling_factor = 2.5;
    rc.correction_bias = bias;
    rc.num_expert_group = 8;
    rc.topk_group = 3;
    return moe::naive::route(l, rc);
  };
  Harness<S> h(c);
  h.routing_args = {8, 3, true, 2.5f};
  EXPECT_TRUE(h.matches_naive());
}

TEST(KernelRouting, Llama4WeightOnInput) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::BF16, moe::routing::Llama4TopK, moe::StandardPrepareFinalize<true>>;
  Case c;
  c.M = 29;
  c.E = 16;
  c.top_k = 1;
  c.naive_route = [](const std::vector<float>& l) { return moe::naive::route_llama4(l, 1); };
  Harness<S> h(c);
  EXPECT_TRUE(h.matches_naive());
}

// A routing rule a user writes: the k experts with the smallest logits, equal weights.
struct ContrarianTopK : moe::routing::TopKBase {
  static constexpr std::string_view kName = "contrarian";
  struct Arguments {};
  static void route_token(const moe::routing::TokenContext& t, const Arguments&) {
    for (int i = 0; i < t.num_experts; ++i) t.scratch[i] = -t.logits[i];
    moe::routing::select_topk(t.scratch, t.num_experts, t.top_k, t.ids, t.weights);
    for (int j = 0; j < t.top_k; ++j) t.weights[j] = 1.0f / static_cast<float>(t.top_k);
  }
};

TEST(KernelRouting, UserRoutingPolicy) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::F32, ContrarianTopK>;
  Case c;
  c.E = 12;
  c.top_k = 3;
  c.naive_route = [](const std::vector<float>& l) {
    std::vector<double> neg(l.size());
    for (std::size_t i = 0; i < l.size(); ++i) neg[i] = -l[i];
    moe::naive::Routed r;
    r.ids = moe::naive::topk_indices(neg, 3);
    r.weights.assign(3, 1.0 / 3.0);
    return r;
  };
  Harness<S> h(c);
  EXPECT_TRUE(h.matches_naive());
}

// A user activation (through the public headers only): x * tanh(softplus(gate)) * up ("mish").
struct MishAndMul : moe::GatedActivation {
  static constexpr std::string_view kName = "mish_and_mul";
  MOE_HOST_DEVICE static float apply(float gate, float up) {
    const float softplus = gate > 20.0f ? gate : std::log1p(moe::math::exp(gate));
    return gate * moe::math::tanh(softplus) * up;
  }
  static double naive(double g, double u) { return g * std::tanh(std::log1p(std::exp(g))) * u; }
};
static_assert(moe::ActivationPolicy<MishAndMul>);

TEST(KernelActivation, UserActivation) {
  Case c;
  c.bias = true;
  Harness<SpecOf<MishAndMul, moe::quant::F32>> h(c);
  EXPECT_TRUE(h.matches_naive());
}

TEST(KernelActivation, SwigluOaiArgumentsAreUsed) {
  using S = SpecOf<moe::SwigluOai, moe::quant::F32>;
  Case c;
  Harness<S> h(c);
  h.hidden.assign(h.hidden.size(), 0.0f);
  auto a = h.arguments();
  a.activation.limit = 0.5f;
  moe::Kernel<S, moe::cpu::Eigen> k;
  ASSERT_TRUE(k.run(a).is_ok());
  // With zero input, gate = up = 0 and the output is 0 for any limit; use the biases instead.
  Case cb = c;
  cb.bias = true;
  Harness<S> hb(cb);
  auto args = hb.arguments();
  ASSERT_TRUE(k.run(args).is_ok());
  const auto default_out = hb.output_float();
  args.activation.limit = 0.25f;
  args.activation.alpha = 1.0f;
  ASSERT_TRUE(k.run(args).is_ok());
  EXPECT_NE(default_out, hb.output_float());
}

// ---------------------------------------------------------------------------------------------
// Shapes and edge cases.

TEST(KernelShapes, EmptyBatch) {
  Case c;
  c.M = 0;
  Harness<SpecOf<moe::SiluAndMul>> h(c);
  EXPECT_TRUE(h.run().is_ok());
}

TEST(KernelShapes, SingleToken) {
  Case c;
  c.M = 1;
  Harness<SpecOf<moe::SiluAndMul>> h(c);
  EXPECT_TRUE(h.matches_naive());
}

TEST(KernelShapes, SingleExpert) {
  Case c;
  c.E = 1;
  c.top_k = 1;
  Harness<SpecOf<moe::SiluAndMul, moe::quant::F32>> h(c);
  EXPECT_TRUE(h.matches_naive());
}

TEST(KernelShapes, TopKEqualsNumExperts) {
  Case c;
  c.E = 6;
  c.top_k = 6;
  c.naive_route = naive_softmax(6, false);
  Harness<SpecOf<moe::SiluAndMul, moe::quant::F32, moe::routing::SoftmaxTopK>> h(c);
  EXPECT_TRUE(h.matches_naive());
}

TEST(KernelShapes, AllTokensOnOneExpertOthersEmpty) {
  Case c;
  c.M = 300;
  c.top_k = 2;
  for (Index m = 0; m < c.M; ++m) c.ids.insert(c.ids.end(), {5, 2});
  Harness<SpecOf<moe::SiluAndMul>> h(c);
  EXPECT_TRUE(h.matches_naive());
}

TEST(KernelShapes, ManyExperts) {
  Case c;
  c.M = 64;
  c.E = 512;
  c.top_k = 8;
  c.H = 32;
  c.I = 16;
  c.naive_route = naive_softmax(8, true);
  Harness<SpecOf<moe::SiluAndMul, moe::quant::BF16, moe::routing::SoftmaxTopK>> h(c);
  h.routing_args.renormalize = true;
  EXPECT_TRUE(h.matches_naive());
}

TEST(KernelShapes, DuplicateExpertInOneRow) {
  Case c;
  c.M = 3;
  c.top_k = 2;
  c.ids = {3, 3, 1, 1, 0, 7};
  Harness<SpecOf<moe::SiluAndMul, moe::quant::F32>> h(c);
  EXPECT_TRUE(h.matches_naive());
}

TEST(KernelShapes, PaddedRowStrides) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::F32>;
  Case c;
  Harness<S> h(c);
  // hidden_states and output as column slices of wider buffers (row stride H + 5).
  const Index ld = c.H + 5;
  std::vector<float> wide_in(c.M * ld, 99.0f), wide_out(c.M * ld, -7.0f);
  for (Index m = 0; m < c.M; ++m)
    for (Index j = 0; j < c.H; ++j) wide_in[m * ld + j] = h.hidden[m * c.H + j];
  auto a = h.arguments();
  a.hidden_states = moe::HostView<const float, 2>(wide_in.data(), {c.M, c.H}, {ld, 1});
  a.output = moe::HostView<float, 2>(wide_out.data(), {c.M, c.H}, {ld, 1});
  moe::Kernel<S, moe::cpu::Eigen> k;
  ASSERT_TRUE(k.run(a).is_ok());
  std::vector<float> got;
  for (Index m = 0; m < c.M; ++m) {
    for (Index j = 0; j < c.H; ++j) got.push_back(wide_out[m * ld + j]);
    for (Index j = c.H; j < ld; ++j) ASSERT_EQ(wide_out[m * ld + j], -7.0f) << "padding written";
  }
  EXPECT_TRUE(moe::testing::all_close(got, h.naive(), tolerance<float>()));
}

// ---------------------------------------------------------------------------------------------
// Expert parallelism.

class ExpertParallel : public ::testing::TestWithParam<std::tuple<int, moe::ExpertPlacement>> {};

TEST_P(ExpertParallel, RanksMatchNaiveAndSumToFullLayer) {
  const auto [ep_size, placement] = GetParam();
  using S = SpecOf<moe::SiluAndMul, moe::quant::F32>;
  Case full;
  full.M = 40;
  full.E = 13;
  full.top_k = 3;
  full.bias = true;
  Harness<S> whole(full);
  ASSERT_TRUE(whole.run().is_ok());
  std::vector<double> sum(whole.output.size(), 0.0);
  for (int r = 0; r < ep_size; ++r) {
    Case c = full;
    c.ep_size = ep_size;
    c.ep_rank = r;
    c.placement = placement;
    c.ids = whole.ids;
    Harness<S> h(c);
    // Same global experts: copy each local expert's weights from the full layer.
    for (Index g = 0; g < c.E; ++g) {
      const int l = h.map[g];
      if (l < 0) continue;
      std::copy_n(whole.w13.begin() + g * h.N1 * c.H, h.N1 * c.H, h.w13.begin() + l * h.N1 * c.H);
      std::copy_n(whole.w2.begin() + g * c.H * c.I, c.H * c.I, h.w2.begin() + l * c.H * c.I);
      std::copy_n(whole.b13.begin() + g * h.N1, h.N1, h.b13.begin() + l * h.N1);
      std::copy_n(whole.b2.begin() + g * c.H, c.H, h.b2.begin() + l * c.H);
    }
    h.hidden = whole.hidden;
    h.weights = whole.weights;
    EXPECT_TRUE(h.matches_naive()) << "rank " << r;
    for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += h.output[i];
  }
  EXPECT_TRUE(moe::testing::all_close(whole.output_float(), sum, {1e-5, 1e-5}));
}

INSTANTIATE_TEST_SUITE_P(Placements, ExpertParallel,
                         ::testing::Combine(::testing::Values(2, 5), ::testing::Values(moe::ExpertPlacement::kLinear,
                                                                                      moe::ExpertPlacement::kRoundRobin)));

TEST(ExpertParallelMap, RankOwningNothingRoutedWritesZeros) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::BF16>;
  Case c;
  c.E = 16;
  c.ep_size = 4;
  c.ep_rank = 3;  // owns experts 12..15
  c.top_k = 2;
  c.M = 10;
  for (Index m = 0; m < c.M; ++m) c.ids.insert(c.ids.end(), {0, 5});  // never local
  Harness<S> h(c);
  ASSERT_TRUE(h.run().is_ok());
  for (float v : h.output_float()) ASSERT_EQ(v, 0.0f);
}

TEST(ExpertParallelMap, InvalidIdsSkippedWhenAsked) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::F32>;
  Case c;
  c.M = 4;
  c.top_k = 2;
  c.ids = {-1, 2, 8, 3, 2147483647, -2147483647, 1, 0};
  Harness<S> h(c);
  moe::cpu::Options o;
  o.invalid_ids = moe::cpu::InvalidIds::kSkip;
  ASSERT_TRUE(h.run(o).is_ok());
  EXPECT_TRUE(moe::testing::all_close(h.output_float(), h.naive(), tolerance<float>()));
  for (Index j = 0; j < c.H; ++j) EXPECT_EQ(h.output[2 * c.H + j], 0.0f);  // token 2: both ids invalid
}

// ---------------------------------------------------------------------------------------------
// Chunking, batched format, determinism and workspace poisoning.

TEST(KernelChunking, ChunkedEqualsUnchunkedBitwise) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::BF16, moe::routing::SoftmaxTopK>;
  Case c;
  c.M = 203;
  c.E = 8;
  c.top_k = 2;
  c.bias = true;
  Harness<S> whole(c);
  ASSERT_TRUE(whole.run().is_ok());
  for (Index chunk : {1, 7, 64, 202}) {
    Case cc = c;
    cc.chunk_tokens = chunk;
    Harness<S> h(cc);
    ASSERT_TRUE(h.run().is_ok());
    EXPECT_EQ(0, std::memcmp(h.output.data(), whole.output.data(), h.output.size() * sizeof(h.output[0])))
        << "chunk " << chunk;
  }
}

// A token alone on its expert (a one-row block) gets the same bits as in a bigger block: the
// one-row case must not fall to a matrix-vector product with another summation order.
TEST(KernelChunking, SingleRowBlocksMatchTwoRowBlocksF32) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::F32>;
  Case c;
  c.M = 2;
  c.top_k = 1;
  c.ids = {3, 3};
  Harness<S> whole(c);
  ASSERT_TRUE(whole.run().is_ok());
  Case one = c;
  one.chunk_tokens = 1;
  Harness<S> chunked(one);
  ASSERT_TRUE(chunked.run().is_ok());
  EXPECT_EQ(0, std::memcmp(whole.output.data(), chunked.output.data(), whole.output.size() * sizeof(float)));
}

TEST(KernelBatched, BatchedFormatMatchesStandardBitwise) {
  using Std = SpecOf<moe::SiluAndMul, moe::quant::BF16>;
  using Bat = SpecOf<moe::SiluAndMul, moe::quant::BF16, moe::routing::Precomputed, moe::BatchedPrepareFinalize<>>;
  Case c;
  c.M = 77;
  c.bias = true;
  Harness<Std> s(c);
  Harness<Bat> b(c);
  ASSERT_TRUE(s.run().is_ok());
  ASSERT_TRUE(b.matches_naive());
  EXPECT_EQ(0, std::memcmp(s.output.data(), b.output.data(), s.output.size() * sizeof(s.output[0])));
}

TEST(KernelBatched, CapacityExceededIsAnErrorAndWritesNothing) {
  using Bat = SpecOf<moe::SiluAndMul, moe::quant::F32, moe::routing::Precomputed, moe::BatchedPrepareFinalize<>>;
  Case c;
  c.M = 20;
  c.top_k = 1;
  c.chunk_tokens = 8;
  for (Index m = 0; m < c.M; ++m) c.ids.push_back(m < 17 ? static_cast<int>(m % 8) : 3);
  Harness<Bat> h(c);
  h.pf_args.max_tokens_per_expert = 2;
  // Chunks [0,8) and [8,16) give each expert one token; [16,20) gives expert 3 three tokens.
  const auto before = h.output;
  std::int64_t dropped = -7;
  h.pf_args.dropped_slots = &dropped;
  const moe::Status s = h.run();
  EXPECT_EQ(s.code(), moe::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("max_tokens_per_expert"), std::string::npos) << s.message();
  EXPECT_EQ(0, std::memcmp(before.data(), h.output.data(), before.size() * sizeof(float)));
  EXPECT_EQ(dropped, -7) << "a refused forward writes nothing, the drop count included";
  // With room for every slot the forward succeeds and reports no drop.
  h.pf_args.max_tokens_per_expert = 3;
  ASSERT_TRUE(h.run().is_ok());
  EXPECT_EQ(dropped, 0);
}

TEST(KernelWorkspace, PoisonedWorkspacesGiveBitIdenticalOutputs) {
  using S = SpecOf<moe::GeluAndMul, moe::quant::BF16, moe::routing::SoftmaxTopK>;
  Case c;
  c.M = 90;
  c.E = 16;
  c.top_k = 3;
  c.bias = true;
  Harness<S> h(c);
  moe::Kernel<S, moe::cpu::Eigen> k;
  const auto args = h.arguments();
  std::vector<std::byte> ws(k.workspace_bytes(args));
  std::vector<moe::bfloat16> first;
  for (unsigned char pattern : {0xD5, 0x2A, 0xFF}) {
    std::memset(ws.data(), pattern, ws.size());
    ASSERT_TRUE(k.run(args, ws).is_ok());
    if (first.empty()) {
      first = h.output;
    } else {
      EXPECT_EQ(0, std::memcmp(first.data(), h.output.data(), first.size() * sizeof(moe::bfloat16)))
          << "pattern " << int(pattern);
    }
  }
}

}  // namespace
