// cuda::ExpertsStage through moe/stages.h's interface: an expert-parallel forward over simulated
// ranks (testing/ep/simulated_ep.h: dispatch and combine by plain copies, each rank's experts on
// the device) gives the single-rank CUDA forward's bits on every schedule; the stage agrees with
// the CPU stage; and segments outside the rows are clamped (run under compute-sanitizer).
#include <gtest/gtest.h>

#include <cstring>
#include <optional>
#include <vector>

#include "moe/cpu/experts_stage.h"
#include "moe/cuda/kernel.cuh"
#include "testing/ep/simulated_ep.h"
#include "testing/lib/gpu.h"
#include "testing/lib/harness.h"

namespace {

using moe::Index;
using moe::testing::DeviceBuffer;
using IO = moe::bfloat16;
using Experts = moe::Experts<moe::SiluAndMul, moe::quant::BF16>;
using Spec = moe::Spec<moe::routing::Precomputed, moe::StandardPrepareFinalize<>, Experts>;

class ExpertsStageTest : public ::testing::Test {
 protected:
  void SetUp() override { MOE_SKIP_WITHOUT_GPU(); }
};

moe::testing::Case ep_case(Index M) {
  moe::testing::Case c;
  c.M = M;
  c.E = 8;
  c.top_k = 2;
  c.H = 128;  // multiples of 8: every Hopper tile applies
  c.I = 64;
  c.seed = static_cast<std::uint64_t>(M + 11);
  return c;
}

// The single-rank forward on the device (moe::Kernel) and the simulated ranks' forward with the
// same options; equal bits expected.
template <class Arch>
void expect_simulated_ep_matches(Index M, int ranks, moe::cuda::Options options) {
  moe::testing::Case c = ep_case(M);
  moe::testing::Harness<Spec> h(c);
  DeviceBuffer<IO> hidden(h.hidden), w13(h.w13), w2(h.w2), out(h.output.size());
  DeviceBuffer<std::int32_t> ids(h.ids);
  DeviceBuffer<float> weights(h.weights);
  typename moe::Kernel<Spec, Arch>::Arguments a;
  a.hidden_states = moe::DeviceView<const IO, 2>(hidden.data(), {c.M, c.H});
  a.topk_ids = moe::DeviceView<const std::int32_t, 2>(ids.data(), {c.M, c.top_k});
  a.topk_weights = moe::DeviceView<const float, 2>(weights.data(), {c.M, c.top_k});
  a.top_k = c.top_k;
  a.w13 = moe::DeviceView<const IO, 3>(w13.data(), {c.E, 2 * c.I, c.H});
  a.w2 = moe::DeviceView<const IO, 3>(w2.data(), {c.E, c.H, c.I});
  a.output = moe::DeviceView<IO, 2>(out.data(), {c.M, c.H});
  moe::Kernel<Spec, Arch> kernel(options);
  DeviceBuffer<std::byte> ws(kernel.workspace_bytes(a));
  const moe::Status single = kernel.run(a, std::span<std::byte>(ws.data(), ws.size()));
  ASSERT_TRUE(single.is_ok()) << single.to_string();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<IO> expected = out.download();

  using Stage = moe::cuda::ExpertsStage<Experts, IO, Arch>;
  const Stage stage(options);
  const Index E_local = c.E / ranks;
  moe::testing::ep::RankExperts<IO> run_rank = [&](int r, const moe::testing::ep::RankRows<IO>& in, std::vector<IO>* result) {
    const Index R = E_local * in.capacity;
    DeviceBuffer<IO> rows(in.rows), rows_out(in.rows.size());
    DeviceBuffer<Index> begin(in.begin), count(in.count);
    rows_out.fill_bytes(0);
    typename Stage::Weights w;
    w.w13 = moe::DeviceView<const IO, 3>(w13.data() + r * E_local * 2 * c.I * c.H, {E_local, 2 * c.I, c.H});
    w.w2 = moe::DeviceView<const IO, 3>(w2.data() + r * E_local * c.H * c.I, {E_local, c.H, c.I});
    typename Stage::Rows rw;
    rw.input = moe::DeviceView<const IO, 2>(rows.data(), {R, c.H});
    rw.output = moe::DeviceView<IO, 2>(rows_out.data(), {R, c.H});
    rw.seg_begin = moe::DeviceView<const Index, 1>(begin.data(), {E_local});
    rw.seg_count = moe::DeviceView<const Index, 1>(count.data(), {E_local});
    rw.max_rows_per_expert = in.capacity;
    DeviceBuffer<std::byte> stage_ws(stage.workspace_bytes(w, rw));
    MOE_RETURN_IF_ERROR(stage.run(w, rw, std::span<std::byte>(stage_ws.data(), stage_ws.size())));
    if (cudaDeviceSynchronize() != cudaSuccess) return moe::make_status(moe::StatusCode::kCudaError, "rank ", r);
    *result = rows_out.download();
    return moe::Status::ok();
  };
  std::vector<IO> ep_out;
  const moe::Status s = moe::testing::ep::forward<IO>(h.hidden, c.M, c.H, h.ids, h.weights, c.top_k, c.E, ranks, run_rank, &ep_out);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  ASSERT_EQ(ep_out.size(), expected.size());
  EXPECT_EQ(0, std::memcmp(ep_out.data(), expected.data(), expected.size() * sizeof(IO)))
      << Arch::kName << " ranks=" << ranks << " M=" << M << ": the simulated expert-parallel forward differs";
}

// The same schedule on both sides: a pinned tile and no K splits (the single-rank forward and the
// ranks see different rows per expert, from which the table and the split count are chosen).
TEST_F(ExpertsStageTest, SimulatedExpertParallelMatchesTheSingleRankForward) {
  using moe::cuda::gemm::Sm90Tile;
  for (const Sm90Tile tile : {Sm90Tile::kFusedSwap128x16, Sm90Tile::kNormal128x256}) {
    moe::cuda::Options o;
    o.sm90_tile = tile;
    o.max_k_splits = 1;
    for (int ranks : {1, 2, 4}) {
      for (Index M : {5, 300}) expect_simulated_ep_matches<moe::cuda::Sm90>(M, ranks, o);
    }
  }
  for (int ranks : {2, 8}) expect_simulated_ep_matches<moe::cuda::Sm80>(37, ranks, {});
}

// The device stage against the CPU stage on the same rows, a bad segment included: expert 1's
// segment runs past the rows (clamped), expert 2's starts past them (nothing).
TEST_F(ExpertsStageTest, AgreesWithTheCpuStageAndClampsSegments) {
  const Index E = 3, H = 64, I = 40, R = 50;
  moe::testing::Random rng(5);
  std::vector<IO> w13 = rng.normal_vector<IO>(E * 2 * I * H, 0.15f), w2 = rng.normal_vector<IO>(E * H * I, 0.15f);
  std::vector<IO> in = rng.normal_vector<IO>(R * H);
  const std::vector<Index> begin{0, 30, 70}, count{20, 40, 5};
  const IO poison = moe::from_float<IO>(-3.0f);
  std::vector<IO> cpu_out(R * H, poison);
  using CpuStage = moe::cpu::ExpertsStage<Experts, IO>;
  CpuStage::Weights cw;
  cw.w13 = moe::HostView<const IO, 3>(w13.data(), {E, 2 * I, H});
  cw.w2 = moe::HostView<const IO, 3>(w2.data(), {E, H, I});
  CpuStage::Rows cr;
  cr.input = moe::HostView<const IO, 2>(in.data(), {R, H});
  cr.output = moe::HostView<IO, 2>(cpu_out.data(), {R, H});
  cr.seg_begin = moe::HostView<const Index, 1>(begin.data(), {E});
  cr.seg_count = moe::HostView<const Index, 1>(count.data(), {E});
  std::vector<std::byte> cws(CpuStage::workspace_bytes(cw, cr));
  ASSERT_TRUE(CpuStage::run(cw, cr, cws).is_ok());

  for (const bool sm80 : {false, true}) {
    DeviceBuffer<IO> dw13(w13), dw2(w2), din(in), dout(std::vector<IO>(R * H, poison));
    DeviceBuffer<Index> dbegin(begin), dcount(count);
    moe::ExpertWeights<Experts, IO, moe::DeviceSpace> w;
    w.w13 = moe::DeviceView<const IO, 3>(dw13.data(), {E, 2 * I, H});
    w.w2 = moe::DeviceView<const IO, 3>(dw2.data(), {E, H, I});
    moe::ExpertRows<IO, moe::DeviceSpace> r;
    r.input = moe::DeviceView<const IO, 2>(din.data(), {R, H});
    r.output = moe::DeviceView<IO, 2>(dout.data(), {R, H});
    r.seg_begin = moe::DeviceView<const Index, 1>(dbegin.data(), {E});
    r.seg_count = moe::DeviceView<const Index, 1>(dcount.data(), {E});
    const auto run = [&](const auto& stage) {
      DeviceBuffer<std::byte> ws(stage.workspace_bytes(w, r));
      const moe::Status s = stage.run(w, r, std::span<std::byte>(ws.data(), ws.size()));
      ASSERT_TRUE(s.is_ok()) << s.to_string();
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    };
    if (sm80) run(moe::cuda::ExpertsStage<Experts, IO, moe::cuda::Sm80>());
    else run(moe::cuda::ExpertsStage<Experts, IO, moe::cuda::Sm90>());
    const std::vector<IO> gpu_out = dout.download();
    std::vector<float> g, c;
    for (Index i = 0; i < R * H; ++i) {
      g.push_back(moe::to_float(gpu_out[i]));
      c.push_back(moe::to_float(cpu_out[i]));
    }
    EXPECT_TRUE(moe::testing::all_close(g, c, moe::testing::tolerance<IO>())) << (sm80 ? "Sm80" : "Sm90");
    // Rows 20..29 belong to no segment: both backends leave them as they were.
    for (Index row = 20; row < 30; ++row) EXPECT_EQ(moe::to_float(gpu_out[row * H]), -3.0f) << "row " << row;
  }
}

TEST_F(ExpertsStageTest, BadShapesAreErrorsBeforeAnyLaunch) {
  DeviceBuffer<IO> w13(std::vector<IO>(2 * 16 * 8)), w2(std::vector<IO>(2 * 8 * 8)), rows(std::vector<IO>(4 * 8));
  DeviceBuffer<Index> seg(std::vector<Index>{0, 2});
  moe::ExpertWeights<Experts, IO, moe::DeviceSpace> w;
  w.w13 = moe::DeviceView<const IO, 3>(w13.data(), {2, 16, 8});
  w.w2 = moe::DeviceView<const IO, 3>(w2.data(), {2, 8, 8});
  moe::ExpertRows<IO, moe::DeviceSpace> r;
  r.input = moe::DeviceView<const IO, 2>(rows.data(), {4, 8});
  r.output = moe::DeviceView<IO, 2>(rows.data(), {4, 8});
  r.seg_begin = moe::DeviceView<const Index, 1>(seg.data(), {2});
  r.seg_count = moe::DeviceView<const Index, 1>(seg.data(), {1});
  const moe::cuda::ExpertsStage<Experts, IO, moe::cuda::Sm90> stage;
  std::byte* none = nullptr;
  const moe::Status s = stage.run(w, r, std::span<std::byte>(none, 0));
  EXPECT_FALSE(s.is_ok());
  EXPECT_NE(s.to_string().find("rows.seg_count"), std::string::npos) << s.to_string();
}

}  // namespace
