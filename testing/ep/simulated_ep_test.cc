// The seam of moe/stages.h on the CPU: an expert-parallel forward over simulated ranks, built from
// cpu::ExpertsStage and a prepare/finalize written here, gives the single-rank forward's bits; and
// the experts stage's own checks.
#include "testing/ep/simulated_ep.h"

#include <gtest/gtest.h>

#include <cstring>

#include "moe/cpu/experts_stage.h"
#include "moe/cpu/kernel.h"
#include "moe/quant/none.h"
#include "testing/lib/harness.h"

namespace {

using moe::Index;

template <class Spec>
void expect_simulated_ep_matches_single_rank(moe::testing::Case c, int ranks) {
  using IO = typename Spec::ElementIO;
  using Stage = moe::cpu::ExpertsStage<typename Spec::Experts, IO>;
  moe::testing::Harness<Spec> h(c);
  ASSERT_TRUE(h.run().is_ok());
  const Index E_local = c.E / ranks, N1 = h.N1;
  moe::testing::ep::RankExperts<IO> run_rank = [&](int r, const moe::testing::ep::RankRows<IO>& in, std::vector<IO>* out) {
    typename Stage::Weights w;
    w.w13 = moe::HostView<const IO, 3>(h.w13.data() + r * E_local * N1 * c.H, {E_local, N1, c.H});
    w.w2 = moe::HostView<const IO, 3>(h.w2.data() + r * E_local * c.H * c.I, {E_local, c.H, c.I});
    if (c.bias) {
      w.w13_bias = moe::HostView<const IO, 2>(h.b13.data() + r * E_local * N1, {E_local, N1});
      w.w2_bias = moe::HostView<const IO, 2>(h.b2.data() + r * E_local * c.H, {E_local, c.H});
    }
    const Index R = E_local * in.capacity;
    out->assign(static_cast<std::size_t>(R * c.H), moe::from_float<IO>(0.0f));
    typename Stage::Rows rows;
    rows.input = moe::HostView<const IO, 2>(in.rows.data(), {R, c.H});
    rows.output = moe::HostView<IO, 2>(out->data(), {R, c.H});
    rows.seg_begin = moe::HostView<const Index, 1>(in.begin.data(), {E_local});
    rows.seg_count = moe::HostView<const Index, 1>(in.count.data(), {E_local});
    rows.max_rows_per_expert = in.capacity;
    std::vector<std::byte> ws(Stage::workspace_bytes(w, rows));
    return Stage::run(w, rows, ws);
  };
  std::vector<IO> ep_out;
  const moe::Status s = moe::testing::ep::forward<IO>(h.hidden, c.M, c.H, h.ids, h.weights, c.top_k, c.E, ranks, run_rank, &ep_out);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  ASSERT_EQ(ep_out.size(), h.output.size());
  EXPECT_EQ(0, std::memcmp(ep_out.data(), h.output.data(), ep_out.size() * sizeof(IO)))
      << Spec::Activation::kName << " " << sizeof(IO) << "-byte IO, ranks=" << ranks << " M=" << c.M << ": the simulated expert-parallel forward differs from the single-rank one";
}

moe::testing::Case ep_case(Index M, bool bias = false) {
  moe::testing::Case c;
  c.M = M;
  c.E = 8;
  c.top_k = 3;
  c.H = 40;
  c.I = 24;
  c.bias = bias;
  c.seed = static_cast<std::uint64_t>(M + 7);
  return c;
}

template <class A, class IO = moe::bfloat16>
using PrecomputedSpec = moe::Spec<moe::routing::Precomputed, moe::StandardPrepareFinalize<>,
                                  moe::Experts<A, moe::quant::None<IO>>>;

TEST(SimulatedExpertParallel, MatchesTheSingleRankForwardBitForBit) {
  for (int ranks : {1, 2, 4, 8}) {
    for (Index M : {1, 5, 300}) {
      expect_simulated_ep_matches_single_rank<PrecomputedSpec<moe::SiluAndMul>>(ep_case(M), ranks);
    }
  }
}

TEST(SimulatedExpertParallel, BiasesUngatedActivationsAndFloat) {
  expect_simulated_ep_matches_single_rank<PrecomputedSpec<moe::SwigluOai>>(ep_case(33, true), 4);
  expect_simulated_ep_matches_single_rank<PrecomputedSpec<moe::Gelu, moe::half>>(ep_case(33, true), 2);
  expect_simulated_ep_matches_single_rank<PrecomputedSpec<moe::SiluAndMul, float>>(ep_case(33), 2);
}

// The stage on its own: bad shapes are errors naming the argument that write nothing, and a
// segment outside the rows is clamped, never read or written out of bounds.
using Stage = moe::cpu::ExpertsStage<moe::Experts<moe::SiluAndMul, moe::quant::BF16>, moe::bfloat16>;

struct StageFixture {
  Index E = 2, H = 16, I = 8, R = 6;
  std::vector<moe::bfloat16> w13, w2, in, out;
  std::vector<Index> begin{0, 3}, count{3, 3};
  StageFixture() {
    moe::testing::Random rng(3);
    w13 = rng.normal_vector<moe::bfloat16>(E * 2 * I * H, 0.3f);
    w2 = rng.normal_vector<moe::bfloat16>(E * H * I, 0.3f);
    in = rng.normal_vector<moe::bfloat16>(R * H);
    out.assign(R * H, moe::from_float<moe::bfloat16>(7.0f));
  }
  Stage::Weights weights() const {
    Stage::Weights w;
    w.w13 = moe::HostView<const moe::bfloat16, 3>(w13.data(), {E, 2 * I, H});
    w.w2 = moe::HostView<const moe::bfloat16, 3>(w2.data(), {E, H, I});
    return w;
  }
  Stage::Rows rows() {
    Stage::Rows r;
    r.input = moe::HostView<const moe::bfloat16, 2>(in.data(), {R, H});
    r.output = moe::HostView<moe::bfloat16, 2>(out.data(), {R, H});
    r.seg_begin = moe::HostView<const Index, 1>(begin.data(), {E});
    r.seg_count = moe::HostView<const Index, 1>(count.data(), {E});
    return r;
  }
  bool output_untouched() const {
    for (const auto& x : out) {
      if (moe::to_float(x) != 7.0f) return false;
    }
    return true;
  }
};

TEST(CpuExpertsStage, BadShapesAreErrorsThatWriteNothing) {
  StageFixture f;
  Stage::Rows r = f.rows();
  r.output = moe::HostView<moe::bfloat16, 2>(f.out.data(), {f.R - 1, f.H});
  std::vector<std::byte> ws(1 << 20);
  moe::Status s = Stage::run(f.weights(), r, ws);
  EXPECT_FALSE(s.is_ok());
  EXPECT_NE(s.to_string().find("rows.output"), std::string::npos) << s.to_string();
  r = f.rows();
  r.seg_count = moe::HostView<const Index, 1>(f.count.data(), {1});
  s = Stage::run(f.weights(), r, ws);
  EXPECT_NE(s.to_string().find("rows.seg_count"), std::string::npos) << s.to_string();
  r = f.rows();
  s = Stage::run(f.weights(), r, std::span<std::byte>(ws.data(), 16));
  EXPECT_NE(s.to_string().find("workspace"), std::string::npos) << s.to_string();
  EXPECT_TRUE(f.output_untouched());
}

TEST(CpuExpertsStage, SegmentsAreClampedToTheRows) {
  StageFixture f;
  f.begin = {4, 100};  // expert 0: rows 4, 5 (count 3 clamped to 2); expert 1 starts past R: nothing
  f.count = {3, 5};
  const Stage::Rows r = f.rows();
  std::vector<std::byte> ws(Stage::workspace_bytes(f.weights(), r));
  ASSERT_TRUE(Stage::run(f.weights(), r, ws).is_ok());
  for (Index row = 0; row < f.R; ++row) {
    bool untouched = true;
    for (Index c = 0; c < f.H; ++c) untouched = untouched && moe::to_float(f.out[row * f.H + c]) == 7.0f;
    EXPECT_EQ(untouched, row < 4) << "row " << row;
  }
}

}  // namespace
