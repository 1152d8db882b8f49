// The expert-parallel all-to-all on the GPU (moe/cuda/parallel/ep_all_to_all.cuh) over NCCL, one
// rank per visible GPU (one rank on a one-GPU machine: the dispatch and combine then go to itself
// through NCCL), each rank with its own tokens and its share of the experts: both dispatch modes
// give the single-rank CUDA forward's bits when the experts stage runs the same schedule (a pinned
// tile, no K splits), and bad arguments are refused before anything is enqueued.
#include <gtest/gtest.h>

#include <barrier>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

#include "moe/cuda/kernel.cuh"
#include "moe/cuda/parallel/ep_all_to_all.cuh"
#include "testing/lib/gpu.h"
#include "testing/lib/harness.h"

namespace {

using moe::Index;
using moe::Status;
using moe::cuda::NcclCommunicator;
using moe::parallel::DispatchMode;
using moe::testing::DeviceBuffer;
using IO = moe::bfloat16;
using Experts = moe::Experts<moe::SiluAndMul, moe::quant::BF16>;
using Spec = moe::Spec<moe::routing::Precomputed, moe::StandardPrepareFinalize<>, Experts>;
using Stage = moe::cuda::ExpertsStage<Experts, IO, moe::cuda::Sm90>;

class EpAllToAllTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MOE_SKIP_WITHOUT_GPU();
    const Status a = NcclCommunicator::available();
    ASSERT_TRUE(a.is_ok()) << a.to_string() << " (a GPU is present, so NCCL must load)";
    int n = 0;
    moe::testing::cuda_ok(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
    // One rank per GPU, as many as divide the test's 8 experts evenly (1, 2, 4 or 8).
    int ranks = 1;
    while (ranks * 2 <= std::min(n, 8)) ranks *= 2;
    std::vector<int> devices;
    for (int d = 0; d < ranks; ++d) devices.push_back(d);
    const Status s = NcclCommunicator::create_all(devices, &comms_);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
  }
  int ranks() const { return static_cast<int>(comms_.size()); }
  std::vector<std::unique_ptr<NcclCommunicator>> comms_;
};

moe::cuda::Options pinned() {
  moe::cuda::Options o;
  o.sm90_tile = moe::cuda::gemm::Sm90Tile::kNormal128x256;
  o.max_k_splits = 1;
  return o;
}

// The single-rank forward of all tokens on device 0.
std::vector<IO> single_rank(const moe::testing::Harness<Spec>& h) {
  const moe::testing::Case& c = h.c;
  moe::testing::cuda_ok(cudaSetDevice(0), "cudaSetDevice");
  DeviceBuffer<IO> hidden(h.hidden), w13(h.w13), w2(h.w2), out(h.output.size());
  DeviceBuffer<std::int32_t> ids(h.ids);
  DeviceBuffer<float> weights(h.weights);
  moe::Kernel<Spec, moe::cuda::Sm90>::Arguments a;
  a.hidden_states = moe::DeviceView<const IO, 2>(hidden.data(), {c.M, c.H});
  a.topk_ids = moe::DeviceView<const std::int32_t, 2>(ids.data(), {c.M, c.top_k});
  a.topk_weights = moe::DeviceView<const float, 2>(weights.data(), {c.M, c.top_k});
  a.top_k = c.top_k;
  a.w13 = moe::DeviceView<const IO, 3>(w13.data(), {c.E, 2 * c.I, c.H});
  a.w2 = moe::DeviceView<const IO, 3>(w2.data(), {c.E, c.H, c.I});
  a.output = moe::DeviceView<IO, 2>(out.data(), {c.M, c.H});
  moe::Kernel<Spec, moe::cuda::Sm90> kernel(pinned());
  DeviceBuffer<std::byte> ws(kernel.workspace_bytes(a));
  moe::check(kernel.run(a, std::span<std::byte>(ws.data(), ws.size())));
  moe::testing::cuda_ok(cudaDeviceSynchronize(), "sync");
  return out.download();
}

// Rank r of P: its share of the tokens and of the experts, through ep_forward; writes its output
// rows into `got`.
Status run_rank(const moe::testing::Harness<Spec>& h, int r, int P, Index n, DispatchMode mode, NcclCommunicator& comm,
                std::barrier<>& ready, std::vector<IO>* got) {
  const moe::testing::Case& c = h.c;
  moe::testing::cuda_ok(cudaSetDevice(comm.device()), "cudaSetDevice");
  const Index m0 = c.M * r / P, m1 = c.M * (r + 1) / P, M = m1 - m0;
  const std::vector<IO> hid(h.hidden.begin() + m0 * c.H, h.hidden.begin() + m1 * c.H);
  const std::vector<std::int32_t> id(h.ids.begin() + m0 * c.top_k, h.ids.begin() + m1 * c.top_k);
  const std::vector<float> wt(h.weights.begin() + m0 * c.top_k, h.weights.begin() + m1 * c.top_k);
  const std::vector<IO> w13(h.w13.begin() + r * n * 2 * c.I * c.H, h.w13.begin() + (r + 1) * n * 2 * c.I * c.H);
  const std::vector<IO> w2(h.w2.begin() + r * n * c.H * c.I, h.w2.begin() + (r + 1) * n * c.H * c.I);
  DeviceBuffer<IO> d_hidden(hid), d_w13(w13), d_w2(w2), d_out(static_cast<std::size_t>(M * c.H));
  DeviceBuffer<std::int32_t> d_ids(id);
  DeviceBuffer<float> d_weights(wt);
  moe::cuda::DeviceEpTokens<IO> t;
  t.hidden = moe::DeviceView<const IO, 2>(d_hidden.data(), {M, c.H});
  t.topk_ids = moe::DeviceView<const std::int32_t, 2>(d_ids.data(), {M, c.top_k});
  t.topk_weights = moe::DeviceView<const float, 2>(d_weights.data(), {M, c.top_k});
  const moe::parallel::EpConfig config{n, mode, c.M};
  const Stage stage(pinned());
  Stage::Weights w;
  w.w13 = moe::DeviceView<const IO, 3>(d_w13.data(), {n, 2 * c.I, c.H});
  w.w2 = moe::DeviceView<const IO, 3>(d_w2.data(), {n, c.H, c.I});
  // The stage's workspace for the most rows a rank can receive, allocated before the collectives
  // (no cudaMalloc while a peer waits in NCCL).
  const Index most = P * c.M * c.top_k;
  Stage::Rows bound;
  bound.input = moe::DeviceView<const IO, 2>(nullptr, {most, c.H});
  bound.output = moe::DeviceView<IO, 2>(nullptr, {most, c.H});
  bound.seg_begin = moe::DeviceView<const Index, 1>(nullptr, {n});
  bound.seg_count = moe::DeviceView<const Index, 1>(nullptr, {n});
  std::size_t stage_bytes = 0;
  for (const Index rows_per_expert : {Index{1}, P * c.M, most}) {
    bound.max_rows_per_expert = rows_per_expert;
    stage_bytes = std::max(stage_bytes, stage.workspace_bytes(w, bound));
  }
  DeviceBuffer<std::byte> stage_ws(stage_bytes);
  moe::cuda::DeviceLocalExperts<IO> experts = [&](const moe::ExpertRows<IO, moe::DeviceSpace>& rows, cudaStream_t s) {
    return stage.run(w, rows, std::span<std::byte>(stage_ws.data(), stage_ws.size()), s);
  };
  std::size_t bytes = 0;
  MOE_RETURN_IF_ERROR(moe::cuda::ep_forward_workspace_bytes<IO>(config, P, c.H, c.top_k, &bytes));
  DeviceBuffer<std::byte> ws(bytes);
  ready.arrive_and_wait();
  MOE_RETURN_IF_ERROR(moe::cuda::ep_forward<IO>(comm, config, t, experts, moe::DeviceView<IO, 2>(d_out.data(), {M, c.H}),
                                                std::span<std::byte>(ws.data(), ws.size()), nullptr));
  moe::testing::cuda_ok(cudaDeviceSynchronize(), "sync");
  const std::vector<IO> out = d_out.download();
  std::copy(out.begin(), out.end(), got->begin() + m0 * c.H);
  return Status::ok();
}

TEST_F(EpAllToAllTest, BothModesMatchTheSingleRankForward) {
  const int P = ranks();
  moe::testing::Case c;
  c.M = 61;
  c.E = 8;
  c.top_k = 3;
  c.H = 128;
  c.I = 64;
  c.seed = 17;
  moe::testing::Harness<Spec> h(c);
  const std::vector<IO> expected = single_rank(h);
  const Index n = c.E / P;
  for (const DispatchMode mode : {DispatchMode::kNormal, DispatchMode::kLowLatency}) {
    std::vector<IO> got(expected.size(), moe::from_float<IO>(-5.0f));
    std::vector<Status> results(static_cast<std::size_t>(P));
    std::barrier ready(P);  // every rank's allocations done before any enters NCCL
    std::vector<std::thread> threads;
    for (int r = 0; r < P; ++r) {
      threads.emplace_back([&, r] {
        try {
          results[r] = run_rank(h, r, P, n, mode, *comms_[r], ready, &got);
        } catch (const std::exception& e) {  // cuda_ok throws; a thread must not
          results[r] = moe::make_status(moe::StatusCode::kCudaError, e.what());
          ready.arrive_and_drop();
        }
      });
    }
    for (std::thread& th : threads) th.join();
    for (int r = 0; r < P; ++r) ASSERT_TRUE(results[r].is_ok()) << "rank " << r << ": " << results[r].to_string();
    EXPECT_EQ(0, std::memcmp(got.data(), expected.data(), expected.size() * sizeof(IO)))
        << (mode == DispatchMode::kNormal ? "normal" : "low-latency") << " over " << P << " ranks differs from the single-rank forward";
  }
}

TEST_F(EpAllToAllTest, BadArgumentsAreRefusedBeforeAnythingRuns) {
  const int P = ranks();
  DeviceBuffer<IO> hidden(std::vector<IO>(4 * 16, moe::from_float<IO>(1.0f))), out(std::vector<IO>(4 * 16, moe::from_float<IO>(7.0f)));
  DeviceBuffer<std::int32_t> ids(std::vector<std::int32_t>(8, 0));
  DeviceBuffer<float> weights(std::vector<float>(8, 1.0f));
  moe::cuda::DeviceEpTokens<IO> t;
  t.hidden = moe::DeviceView<const IO, 2>(hidden.data(), {4, 16});
  t.topk_ids = moe::DeviceView<const std::int32_t, 2>(ids.data(), {4, 2});
  t.topk_weights = moe::DeviceView<const float, 2>(weights.data(), {4, 2});
  bool ran = false;
  moe::cuda::DeviceLocalExperts<IO> experts = [&](const moe::ExpertRows<IO, moe::DeviceSpace>&, cudaStream_t) {
    ran = true;
    return Status::ok();
  };
  std::vector<std::byte> none;
  const moe::DeviceView<IO, 2> o(out.data(), {4, 16});
  Status s = moe::cuda::ep_forward<IO>(*comms_[0], {2, DispatchMode::kNormal, 3}, t, experts, o, none, nullptr);
  EXPECT_NE(s.to_string().find("max_tokens_per_rank"), std::string::npos) << s.to_string();
  s = moe::cuda::ep_forward<IO>(*comms_[0], {0, DispatchMode::kNormal, 4}, t, experts, o, none, nullptr);
  EXPECT_NE(s.to_string().find("experts_per_rank"), std::string::npos) << s.to_string();
  s = moe::cuda::ep_forward<IO>(*comms_[0], {2, DispatchMode::kNormal, 4}, t, experts, o, none, nullptr);
  EXPECT_EQ(s.code(), moe::StatusCode::kWorkspaceTooSmall) << s.to_string();
  s = moe::cuda::ep_forward<IO>(*comms_[0], {2, DispatchMode::kNormal, 4}, t, experts, moe::DeviceView<IO, 2>(out.data(), {3, 16}),
                                none, nullptr);
  EXPECT_NE(s.to_string().find("output"), std::string::npos) << s.to_string();
  EXPECT_FALSE(ran);
  for (const IO& x : out.download()) ASSERT_EQ(moe::to_float(x), 7.0f);
  (void)P;
}

}  // namespace
