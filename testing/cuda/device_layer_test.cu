// The layer on the GPU end to end (moe/layer/device_layer.h) against the CPU layer, for every
// supported architecture and both ways of running shared experts: the same experts chosen, the
// routing weights within float rounding (the softmax sums in another order), outputs within the
// per-dtype tolerance of the differential test (the fused shared expert is summed before the one
// rounding, where the CPU layer rounds routed and shared outputs apart). The device forward is
// captured in a CUDA graph (capture fails on any host synchronization or allocation) and its
// replays give the bits of the eager forward.
#include <gtest/gtest.h>

#include <atomic>
#include <barrier>
#include <numeric>
#include <thread>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>

#include "moe/layer/device_layer.h"
#include "moe/cuda/parallel/nccl_communicator.h"
#include "moe/layer/moe_layer.h"
#include "moe/layer/rank_group_layer.h"
#include "testing/lib/compare.h"
#include "testing/lib/gpu.h"
#include "testing/lib/layer_fixture.h"

namespace {

using moe::Index;
using moe::testing::DeviceBuffer;
using moe::testing::floats;

// Random hidden states already in the layer's dtype, so both backends' routers see the same values.
moe::layer::Buffer random_hidden(moe::DType dtype, Index M, Index H, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  moe::layer::Buffer b;
  b.dtype = dtype;
  b.shape = {M, H};
  b.bytes.resize(static_cast<std::size_t>(M * H) * (dtype == moe::DType::kF32 ? 4 : 2));
  for (Index i = 0; i < M * H; ++i) {
    const float v = nd(gen);
    if (dtype == moe::DType::kF32) reinterpret_cast<float*>(b.bytes.data())[i] = v;
    else reinterpret_cast<moe::bfloat16*>(b.bytes.data())[i] = moe::bfloat16(v);
  }
  return b;
}

void expect_same_layer(const moe::layer::MoeLayer::Result& cpu, const moe::layer::MoeLayer::Result& gpu,
                       moe::DType dtype) {
  EXPECT_EQ(cpu.topk_ids, gpu.topk_ids);
  ASSERT_EQ(cpu.topk_weights.size(), gpu.topk_weights.size());
  for (std::size_t i = 0; i < cpu.topk_weights.size(); ++i) {
    EXPECT_NEAR(cpu.topk_weights[i], gpu.topk_weights[i], 1e-5f * (1.0f + std::fabs(cpu.topk_weights[i]))) << i;
  }
  const moe::testing::Tolerance tol = moe::testing::layer_tolerance(dtype);
  EXPECT_GT(moe::testing::max_abs(floats(cpu.output)), 0.0);
  EXPECT_TRUE(moe::testing::all_close(floats(gpu.output), floats(cpu.output), tol)) << moe::to_string(dtype);
}

using Layer = moe::testing::SyntheticLayer;

void load(const std::string& arch, bool mxfp4, Layer* l) { moe::testing::load_synthetic_layer("device_layer", arch, mxfp4, l); }

class DeviceLayerTest : public ::testing::TestWithParam<std::tuple<std::string, bool>> {
 protected:
  void SetUp() override {
    MOE_SKIP_WITHOUT_GPU();
    if (!moe::layer::cuda_device_available()) GTEST_SKIP() << "the device layer needs compute capability 9.x";
  }
};

TEST_P(DeviceLayerTest, MatchesCpuLayerAndReplaysFromAGraph) {
  const auto [arch, mxfp4] = GetParam();
  Layer l;
  ASSERT_NO_FATAL_FAILURE(load(arch, mxfp4, &l));
  for (moe::DType dtype : {moe::DType::kF32, moe::DType::kBF16}) {
    SCOPED_TRACE(moe::to_string(dtype));
    moe::layer::MoeLayer layer;
    const moe::Status ls = moe::layer::MoeLayer::load(l.config, {}, dtype, l.ckpt, l.prefix, &layer);
    ASSERT_TRUE(ls.is_ok()) << ls.to_string();
    // (tokens, max_tokens): the row-streaming router (up to 256 tokens a chunk) in one chunk and in
    // chunks of 16, a decode batch, and the tiled router GEMM (300 tokens in one chunk).
    const std::pair<Index, Index> cases[] = {{40, 64}, {40, 16}, {5, 64}, {300, 512}};
    for (const auto& [M, max_tokens] : cases) {
      const moe::layer::Buffer x = random_hidden(dtype, M, l.spec.hidden, 5 + static_cast<unsigned>(M));
      moe::layer::MoeLayer::Result cpu;
      ASSERT_TRUE(layer.forward(x.tensor(), std::nullopt, &cpu).is_ok());
      for (const bool fuse : {true, false}) {
        {
          SCOPED_TRACE(::testing::Message() << "M=" << M << " fuse=" << fuse << " max_tokens=" << max_tokens);
          std::unique_ptr<moe::layer::DeviceLayer> dev;
          const moe::Status cs = moe::layer::DeviceLayer::create(layer, {max_tokens, fuse}, &dev);
          ASSERT_TRUE(cs.is_ok()) << cs.to_string();
          moe::layer::MoeLayer::Result gpu;
          const moe::Status fs = dev->forward_host(x.tensor(), &gpu);
          ASSERT_TRUE(fs.is_ok()) << fs.to_string();
          expect_same_layer(cpu, gpu, dtype);

          // The device forward in a graph: capture succeeds (no sync, no allocation), replays
          // give the eager bits.
          const std::size_t bytes = x.bytes.size();
          moe::testing::DeviceBuffer<std::byte> dx(bytes), dy(bytes);
          ASSERT_EQ(cudaMemcpy(dx.data(), x.bytes.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
          const moe::AnyTensor hidden{dx.data(), dtype, {M, l.spec.hidden}, {}};
          const moe::AnyTensor out{dy.data(), dtype, {M, l.spec.hidden}, {}};
          cudaStream_t stream;
          ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
          cudaGraph_t graph;
          ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
          const moe::Status captured = dev->forward(hidden, out, stream);
          ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
          ASSERT_TRUE(captured.is_ok()) << captured.to_string();
          cudaGraphExec_t exec;
          ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
          for (int replay = 0; replay < 2; ++replay) {
            dy.fill_bytes(0xFF);
            ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
            ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
            std::vector<std::byte> replayed(bytes);
            ASSERT_EQ(cudaMemcpy(replayed.data(), dy.data(), bytes, cudaMemcpyDeviceToHost), cudaSuccess);
            EXPECT_EQ(replayed, gpu.output.bytes) << "replay " << replay;
          }
          cudaGraphExecDestroy(exec);
          cudaGraphDestroy(graph);
          cudaStreamDestroy(stream);
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Architectures, DeviceLayerTest,
    ::testing::Values(std::make_tuple("MixtralForCausalLM", false), std::make_tuple("Qwen2MoeForCausalLM", false),
                      std::make_tuple("Qwen3MoeForCausalLM", false), std::make_tuple("DeepseekV2ForCausalLM", false),
                      std::make_tuple("DeepseekV3ForCausalLM", false), std::make_tuple("GptOssForCausalLM", false),
                      std::make_tuple("Llama4ForCausalLM", false)),
    [](const auto& info) { return std::get<0>(info.param) + (std::get<1>(info.param) ? "_mxfp4" : ""); });

// Under expert parallelism each rank's device layer gives the CPU layer's partial sum (the shared
// expert on rank 0 only, fused there as extra experts).
TEST(DeviceLayerParallel, ExpertParallelRanksMatchCpu) {
  MOE_SKIP_WITHOUT_GPU();
  if (!moe::layer::cuda_device_available()) GTEST_SKIP() << "the device layer needs compute capability 9.x";
  Layer l;
  ASSERT_NO_FATAL_FAILURE(load("DeepseekV3ForCausalLM", false, &l));
  const moe::layer::Buffer x = random_hidden(moe::DType::kBF16, 24, l.spec.hidden, 9);
  for (int rank = 0; rank < 2; ++rank) {
    for (const auto placement : {moe::ExpertPlacement::kLinear, moe::ExpertPlacement::kRoundRobin}) {
      moe::layer::ParallelLayout par;
      par.ep_size = 2;
      par.ep_rank = rank;
      par.placement = placement;
      moe::layer::MoeLayer layer;
      ASSERT_TRUE(moe::layer::MoeLayer::load(l.config, par, moe::DType::kBF16, l.ckpt, l.prefix, &layer).is_ok());
      moe::layer::MoeLayer::Result cpu, gpu;
      ASSERT_TRUE(layer.forward(x.tensor(), std::nullopt, &cpu).is_ok());
      std::unique_ptr<moe::layer::DeviceLayer> dev;
      ASSERT_TRUE(moe::layer::DeviceLayer::create(layer, {}, &dev).is_ok());
      ASSERT_TRUE(dev->forward_host(x.tensor(), &gpu).is_ok());
      SCOPED_TRACE(::testing::Message() << "rank " << rank);
      expect_same_layer(cpu, gpu, moe::DType::kBF16);
    }
  }
}

// EPLB replicas on the device layer: the routing's logical ids become physical ones on the GPU
// (token-hash replicas, as MoeLayer on the host), so the output matches the CPU layer's and the
// load per physical expert equals the CPU's count exactly; reset_expert_load clears it.
TEST(DeviceLayerParallel, EplbReplicasMatchCpu) {
  MOE_SKIP_WITHOUT_GPU();
  if (!moe::layer::cuda_device_available()) GTEST_SKIP() << "the device layer needs compute capability 9.x";
  Layer l;
  ASSERT_NO_FATAL_FAILURE(load("DeepseekV3ForCausalLM", false, &l));  // fused shared experts after the physical ids
  const moe::layer::Buffer x = random_hidden(moe::DType::kBF16, 24, l.spec.hidden, 10);
  for (int rank = 0; rank < 2; ++rank) {
    SCOPED_TRACE(::testing::Message() << "rank " << rank);
    moe::layer::ParallelLayout par;
    par.ep_size = 2;
    par.ep_rank = rank;
    par.redundant_experts = 2;
    moe::layer::MoeLayer layer;
    ASSERT_TRUE(moe::layer::MoeLayer::load(l.config, par, moe::DType::kBF16, l.ckpt, l.prefix, &layer).is_ok());
    std::unique_ptr<moe::layer::DeviceLayer> dev;
    const moe::Status cs = moe::layer::DeviceLayer::create(layer, {}, &dev);
    ASSERT_TRUE(cs.is_ok()) << cs.to_string();
    moe::layer::MoeLayer::Result cpu, gpu;
    ASSERT_TRUE(layer.forward(x.tensor(), std::nullopt, &cpu).is_ok());
    ASSERT_TRUE(dev->forward_host(x.tensor(), &gpu).is_ok());
    expect_same_layer(cpu, gpu, moe::DType::kBF16);
    std::vector<std::int64_t> load;
    ASSERT_TRUE(dev->expert_load(&load).is_ok());
    EXPECT_EQ(load, layer.expert_load());
    EXPECT_EQ(std::accumulate(load.begin(), load.end(), std::int64_t{0}), 24 * l.spec.top_k);
    ASSERT_TRUE(dev->reset_expert_load().is_ok());
    ASSERT_TRUE(dev->expert_load(&load).is_ok());
    EXPECT_EQ(load, std::vector<std::int64_t>(load.size(), 0));
  }
  // Without EPLB the load is an error that says why.
  moe::layer::MoeLayer plain;
  ASSERT_TRUE(moe::layer::MoeLayer::load(l.config, {}, moe::DType::kBF16, l.ckpt, l.prefix, &plain).is_ok());
  std::unique_ptr<moe::layer::DeviceLayer> dev;
  ASSERT_TRUE(moe::layer::DeviceLayer::create(plain, {}, &dev).is_ok());
  std::vector<std::int64_t> load;
  EXPECT_NE(dev->expert_load(&load).to_string().find("without EPLB"), std::string::npos);
}

// The all-to-all dispatch on the device layer over NCCL, one EP rank per visible GPU (1, 2, 4 or
// 8: divisors of the 8 experts; one rank on a one-GPU machine, whose rows then go to itself
// through NCCL): each rank's DeviceLayer routes its share of the tokens, dispatches the rows and
// adds its shared expert; the shares put together match the CPU layer of one rank holding every
// expert, in both modes, and with EPLB replicas.
TEST(DeviceLayerParallel, AllToAllDispatchOverNcclMatchesCpu) {
  MOE_SKIP_WITHOUT_GPU();
  if (!moe::layer::cuda_device_available()) GTEST_SKIP() << "the device layer needs compute capability 9.x";
  const moe::Status available = moe::cuda::NcclCommunicator::available();
  ASSERT_TRUE(available.is_ok()) << available.to_string() << " (a GPU is present, so NCCL must load)";
  int gpus = 0;
  moe::testing::cuda_ok(cudaGetDeviceCount(&gpus), "cudaGetDeviceCount");
  int P = 1;
  while (P * 2 <= std::min(gpus, 8)) P *= 2;
  std::vector<int> devices(static_cast<std::size_t>(P));
  std::iota(devices.begin(), devices.end(), 0);
  std::vector<std::unique_ptr<moe::cuda::NcclCommunicator>> comms;
  const moe::Status cs = moe::cuda::NcclCommunicator::create_all(devices, &comms);
  ASSERT_TRUE(cs.is_ok()) << cs.to_string();
  Layer l;
  ASSERT_NO_FATAL_FAILURE(load("DeepseekV3ForCausalLM", false, &l));  // shared experts, grouped routing
  const Index M = 29, H = l.spec.hidden, k = l.spec.top_k;
  const moe::layer::Buffer x = random_hidden(moe::DType::kBF16, M, H, 11);
  moe::layer::MoeLayer full;
  ASSERT_TRUE(moe::layer::MoeLayer::load(l.config, {}, moe::DType::kBF16, l.ckpt, l.prefix, &full).is_ok());
  moe::layer::MoeLayer::Result cpu;
  ASSERT_TRUE(full.forward(x.tensor(), std::nullopt, &cpu).is_ok());
  for (const auto dispatch : {moe::layer::EpDispatch::kAllToAll, moe::layer::EpDispatch::kAllToAllLowLatency}) {
    for (const Index redundant : {Index{0}, Index{2 * P}}) {
      SCOPED_TRACE(::testing::Message() << P << " ranks, " << (dispatch == moe::layer::EpDispatch::kAllToAll ? "normal" : "low latency")
                                        << ", " << redundant << " redundant experts");
      moe::layer::MoeLayer::Result gpu;
      gpu.output = moe::layer::Buffer{moe::DType::kBF16, {M, H}, std::vector<std::byte>(x.bytes.size())};
      gpu.topk_ids.resize(static_cast<std::size_t>(M * k));
      gpu.topk_weights.resize(static_cast<std::size_t>(M * k));
      std::vector<moe::Status> results(static_cast<std::size_t>(P));
      std::barrier ready(P);  // every rank's layer and buffers in place before any enters NCCL
      std::barrier finished(P);  // and no rank frees them before every rank is out of it
      std::atomic<bool> any_failed{false};  // then no rank enters it: a missing peer would hang NCCL
      std::vector<std::thread> threads;
      for (int r = 0; r < P; ++r) {
        threads.emplace_back([&, r] {
          bool arrived = false;
          try {  // DeviceBuffer throws on a CUDA error; a thread must not
          (void)(results[r] = [&]() -> moe::Status {
            const auto arrive = [&] {
              if (!arrived) ready.arrive_and_wait();
              arrived = true;
              return !any_failed.load();
            };
            const auto leave = [&](moe::Status st) {  // before the collectives: out of both barriers
              any_failed = true;
              if (!arrived) {
                ready.arrive_and_drop();
                finished.arrive_and_drop();
              }
              arrived = true;
              return st;
            };
            if (cudaSetDevice(comms[r]->device()) != cudaSuccess) return leave(moe::make_status(moe::StatusCode::kCudaError, "cudaSetDevice"));
            moe::layer::ParallelLayout par;
            par.ep_size = P;
            par.ep_rank = r;
            par.dispatch = dispatch;
            par.redundant_experts = redundant;
            moe::layer::MoeLayer layer;
            const moe::Status loaded = moe::layer::MoeLayer::load(l.config, par, moe::DType::kBF16, l.ckpt, l.prefix, &layer);
            if (!loaded.is_ok()) return leave(loaded);
            moe::layer::DeviceLayer::Options options;
            options.max_tokens = (M + P - 1) / P;
            std::unique_ptr<moe::layer::DeviceLayer> dev;
            const moe::Status created = moe::layer::DeviceLayer::create(layer, options, &dev);
            if (!created.is_ok()) return leave(created);
            const Index m0 = moe::layer::token_share_begin(M, P, r), m1 = moe::layer::token_share_begin(M, P, r + 1), Mr = m1 - m0;
            const std::size_t row = static_cast<std::size_t>(H) * 2;
            DeviceBuffer<std::byte> d_x(std::vector<std::byte>(x.bytes.begin() + m0 * row, x.bytes.begin() + m1 * row));
            DeviceBuffer<std::byte> d_y(static_cast<std::size_t>(Mr) * row);
            DeviceBuffer<std::int32_t> d_ids(static_cast<std::size_t>(std::max<Index>(Mr * k, 1)));
            DeviceBuffer<float> d_w(static_cast<std::size_t>(std::max<Index>(Mr * k, 1)));
            if (!arrive()) {
              finished.arrive_and_drop();
              return moe::make_status(moe::StatusCode::kAborted, "another rank failed before the collectives");
            }
            const moe::Status st = dev->forward_all_to_all(*comms[r], moe::AnyTensor{d_x.data(), moe::DType::kBF16, {Mr, H}, {}},
                                         moe::AnyTensor{d_y.data(), moe::DType::kBF16, {Mr, H}, {}}, nullptr,
                                         moe::AnyTensor{d_ids.data(), moe::DType::kI32, {Mr, k}, {}},
                                         moe::AnyTensor{d_w.data(), moe::DType::kF32, {Mr, k}, {}});
            const bool synced = cudaDeviceSynchronize() == cudaSuccess;
            finished.arrive_and_wait();  // every rank's collectives done before this one's buffers go
            if (!st.is_ok()) return st;
            if (!synced) return moe::make_status(moe::StatusCode::kCudaError, "synchronize");
            const std::vector<std::byte> y = d_y.download();
            const std::vector<std::int32_t> ids = d_ids.download();
            const std::vector<float> w = d_w.download();
            std::copy(y.begin(), y.end(), gpu.output.bytes.begin() + m0 * row);
            std::copy_n(ids.begin(), Mr * k, gpu.topk_ids.begin() + m0 * k);
            std::copy_n(w.begin(), Mr * k, gpu.topk_weights.begin() + m0 * k);
            return moe::Status::ok();
          }());
          } catch (const std::exception& e) {  // a DeviceBuffer allocation or copy failed
            any_failed = true;
            if (!arrived) {
              ready.arrive_and_drop();
              finished.arrive_and_drop();
            }
            (void)(results[r] = moe::make_status(moe::StatusCode::kCudaError, e.what()));
          }
        });
      }
      for (std::thread& t : threads) t.join();
      for (int r = 0; r < P; ++r) ASSERT_TRUE(results[r].is_ok()) << "rank " << r << ": " << results[r].to_string();
      expect_same_layer(cpu, gpu, moe::DType::kBF16);
    }
  }
}

// Quantized checkpoints (DeepSeek-V3 layout, routed and shared experts quantized, I = 192 ragged
// against the 128 blocks) through the device layer: codes and scales resident, routing on the
// device, the shared expert apart (its scale blocks need not line up with the routed ones').
// Against the CPU layer: the same experts, outputs within 2% relative RMS (the FP8 tensor cores'
// block accumulation; testing/cuda/quantized_experts_test.cu explains it); a graph replay gives
// the eager bits. An f32 layer is refused with the reason.
TEST(DeviceLayerQuantized, MatchesCpuLayerOnQuantizedCheckpoints) {
  MOE_SKIP_WITHOUT_GPU();
  if (!moe::layer::cuda_device_available()) GTEST_SKIP() << "the device layer needs compute capability 9.x";
  using moe::testing::quantized::Format;
  // The W8A8 formats, then the weight-only ones (GPTQ act-order, AWQ, compressed-tensors).
  const std::vector<moe::testing::weight_only::IntFormat> weight_only = moe::testing::weight_only_formats();
  for (int c = 0; c < 4 + static_cast<int>(weight_only.size()); ++c) {
    const Format f = c < 4 ? static_cast<Format>(c) : Format::kFp8Channel;
    SCOPED_TRACE(c < 4 ? std::to_string(c) : moe::testing::weight_only::quantization_config_of(weight_only[c - 4]));
    moe::testing::QuantizedLayer q;
    if (c < 4) {
      ASSERT_NO_FATAL_FAILURE(moe::testing::load_quantized_layer("device_layer", f, &q));
    } else {
      ASSERT_NO_FATAL_FAILURE(moe::testing::load_weight_only_layer("device_layer", weight_only[c - 4], &q));
    }
    moe::layer::MoeLayer layer;
    ASSERT_TRUE(moe::layer::MoeLayer::load(q.config, {}, moe::DType::kBF16, q.ckpt, q.prefix, &layer).is_ok());
    const Index M = 24, H = q.spec.hidden;
    const moe::layer::Buffer x = random_hidden(moe::DType::kBF16, M, H, 11);
    moe::layer::MoeLayer::Result cpu, gpu;
    ASSERT_TRUE(layer.forward(x.tensor(), std::nullopt, &cpu).is_ok());
    std::unique_ptr<moe::layer::DeviceLayer> dev;
    const moe::Status cs = moe::layer::DeviceLayer::create(layer, {}, &dev);
    ASSERT_TRUE(cs.is_ok()) << cs.to_string();
    EXPECT_FALSE(dev->shared_experts_fused());
    const moe::Status fs = dev->forward_host(x.tensor(), &gpu);
    ASSERT_TRUE(fs.is_ok()) << fs.to_string();
    EXPECT_EQ(cpu.topk_ids, gpu.topk_ids);
    EXPECT_GT(moe::testing::max_abs(floats(cpu.output)), 0.0);
    EXPECT_LE(moe::testing::relative_rms(floats(gpu.output), floats(cpu.output)), 0.02) << "relative RMS difference";

    // Captured in a graph: no host sync or allocation, replays give the eager bits.
    const std::size_t bytes = x.bytes.size();
    moe::testing::DeviceBuffer<std::byte> dx(bytes), dy(bytes);
    ASSERT_EQ(cudaMemcpy(dx.data(), x.bytes.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
    cudaStream_t stream;
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
    cudaGraph_t graph;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
    const moe::Status captured = dev->forward(moe::AnyTensor{dx.data(), moe::DType::kBF16, {M, H}, {}},
                                              moe::AnyTensor{dy.data(), moe::DType::kBF16, {M, H}, {}}, stream);
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    ASSERT_TRUE(captured.is_ok()) << captured.to_string();
    cudaGraphExec_t exec;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    dy.fill_bytes(0xFF);
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    std::vector<std::byte> replayed(bytes);
    ASSERT_EQ(cudaMemcpy(replayed.data(), dy.data(), bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(replayed, gpu.output.bytes);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);

    if (f == Format::kFp8Block) {  // the 8-bit GEMMs take bf16 or f16 rows
      moe::layer::MoeLayer f32;
      ASSERT_TRUE(moe::layer::MoeLayer::load(q.config, {}, moe::DType::kF32, q.ckpt, q.prefix, &f32).is_ok());
      std::unique_ptr<moe::layer::DeviceLayer> refused;
      const moe::Status rs = moe::layer::DeviceLayer::create(f32, {}, &refused);
      ASSERT_FALSE(rs.is_ok());
      EXPECT_NE(rs.message().find("bf16 or f16"), std::string::npos) << rs.to_string();
    }
  }
}

TEST(DeviceLayerArguments, BadTensorsAreErrorsThatNameThem) {
  MOE_SKIP_WITHOUT_GPU();
  if (!moe::layer::cuda_device_available()) GTEST_SKIP() << "the device layer needs compute capability 9.x";
  Layer l;
  ASSERT_NO_FATAL_FAILURE(load("Qwen3MoeForCausalLM", false, &l));
  moe::layer::MoeLayer layer;
  ASSERT_TRUE(moe::layer::MoeLayer::load(l.config, {}, moe::DType::kBF16, l.ckpt, l.prefix, &layer).is_ok());
  std::unique_ptr<moe::layer::DeviceLayer> dev;
  EXPECT_FALSE(moe::layer::DeviceLayer::create(layer, {0, true}, &dev).is_ok());
  ASSERT_TRUE(moe::layer::DeviceLayer::create(layer, {}, &dev).is_ok());
  const Index H = l.spec.hidden;
  moe::testing::DeviceBuffer<std::byte> a(8 * H * 2), b(8 * H * 2);
  const moe::AnyTensor x{a.data(), moe::DType::kBF16, {8, H}, {}}, y{b.data(), moe::DType::kBF16, {8, H}, {}};
  const auto message = [&](const moe::AnyTensor& in, const moe::AnyTensor& out) {
    return dev->forward(in, out, nullptr).to_string();
  };
  EXPECT_NE(message({a.data(), moe::DType::kF32, {8, H}, {}}, y).find("hidden_states: expected dtype bf16"), std::string::npos);
  EXPECT_NE(message(x, {b.data(), moe::DType::kBF16, {8, H + 1}, {}}).find("output: expected shape"), std::string::npos);
  EXPECT_NE(message(x, {b.data(), moe::DType::kBF16, {7, H}, {}}).find("output: expected 8 rows"), std::string::npos);
  EXPECT_NE(message(x, x).find("overlaps"), std::string::npos);
  EXPECT_NE(message({a.data(), moe::DType::kBF16, {8, H}, {2 * H, 1}}, y).find("contiguous"), std::string::npos);
  // Nothing was written by the refused calls.
  b.fill_bytes(0x5A);
  (void)message(x, {b.data(), moe::DType::kBF16, {7, H}, {}});
  std::vector<std::byte> after(b.size());
  ASSERT_EQ(cudaMemcpy(after.data(), b.data(), after.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  for (std::byte v : after) ASSERT_EQ(v, std::byte{0x5A});
}

}  // namespace
