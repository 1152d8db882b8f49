// The runtime layer (Hugging Face checkpoints) on the CUDA registry vs the CPU registry, for every
// supported architecture: same routing (ids and weights exactly), outputs within the per-dtype
// tolerance of the differential test (same rounding points; GEMM summation order differs).
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <cmath>
#include <random>

#include "moe/layer/cuda_registry.h"
#include "moe/layer/moe_layer.h"
#include "moe/layer/rank_group_layer.h"
#include "testing/lib/compare.h"
#include "testing/lib/gpu.h"
#include "testing/lib/layer_fixture.h"
#include "testing/layer/quantized_checkpoint.h"
#include "moe/layer/model_config.h"

namespace {

using moe::testing::floats;

class LayerBackends : public ::testing::TestWithParam<std::tuple<std::string, bool>> {
 protected:
  void SetUp() override {
    MOE_SKIP_WITHOUT_GPU();
    if (!moe::layer::cuda_device_available()) GTEST_SKIP() << "the CUDA registry needs compute capability >= 9.0";
  }
};

// M random tokens (`x`, kept for further forwards) through `layer` on the CPU registry and on the
// CUDA one.
void forward_on_both(const moe::layer::MoeLayer& layer, moe::Index M, moe::Index H, unsigned seed, std::vector<float>* x,
                     moe::layer::MoeLayer::Result* cpu, moe::layer::MoeLayer::Result* gpu) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  x->resize(static_cast<std::size_t>(M * H));
  for (auto& v : *x) v = nd(gen);
  const moe::AnyTensor hidden{x->data(), moe::DType::kF32, {M, H}, {}};
  ASSERT_TRUE(layer.forward(hidden, std::nullopt, cpu).is_ok());
  const moe::Status gs = layer.forward(hidden, std::nullopt, gpu, {}, &moe::layer::find_cuda_kernel);
  ASSERT_TRUE(gs.is_ok()) << gs.to_string();
}

TEST_P(LayerBackends, CudaMatchesCpu) {
  const auto [arch, mxfp4] = GetParam();
  moe::testing::SyntheticLayer l;
  ASSERT_NO_FATAL_FAILURE(moe::testing::load_synthetic_layer("layer", arch, mxfp4, &l));
  for (moe::DType dtype : {moe::DType::kF32, moe::DType::kBF16}) {
    moe::layer::MoeLayer layer;
    const moe::Status ls = moe::layer::MoeLayer::load(l.config, {}, dtype, l.ckpt, l.prefix, &layer);
    ASSERT_TRUE(ls.is_ok()) << ls.to_string();
    const moe::Index M = 40, H = l.spec.hidden;
    std::vector<float> x;
    moe::layer::MoeLayer::Result cpu, gpu;
    ASSERT_NO_FATAL_FAILURE(forward_on_both(layer, M, H, 5, &x, &cpu, &gpu));
    const moe::AnyTensor hidden{x.data(), moe::DType::kF32, {M, H}, {}};
    // Resident weights (copied once) give the same bits as per-call copies.
    moe::layer::MoeLayer resident = layer;
    ASSERT_TRUE(moe::layer::make_layer_resident(&resident).is_ok());
    moe::layer::MoeLayer::Result res;
    ASSERT_TRUE(resident.forward(hidden, std::nullopt, &res).is_ok());
    EXPECT_EQ(res.output.bytes, gpu.output.bytes);
    EXPECT_EQ(cpu.topk_ids, gpu.topk_ids);
    EXPECT_EQ(cpu.topk_weights, gpu.topk_weights);
    const moe::testing::Tolerance tol = moe::testing::layer_tolerance(dtype);
    EXPECT_GT(moe::testing::max_abs(floats(cpu.output)), 0.0);
    EXPECT_TRUE(moe::testing::all_close(floats(gpu.output), floats(cpu.output), tol)) << moe::to_string(dtype);
  }
}

// EPLB replicas on one EP rank: the CUDA registry runs the physical ids the routing chose (the
// per-call and resident paths alike) and matches the CPU.
TEST_P(LayerBackends, EplbReplicasMatchCpu) {
  const auto [arch, mxfp4] = GetParam();
  moe::testing::SyntheticLayer l;
  ASSERT_NO_FATAL_FAILURE(moe::testing::load_synthetic_layer("layer_eplb", arch, mxfp4, &l));
  moe::layer::ParallelLayout p;
  p.ep_size = 2;
  p.ep_rank = 1;
  p.redundant_experts = 2;
  moe::layer::MoeLayer layer;
  const moe::Status ls = moe::layer::MoeLayer::load(l.config, p, moe::DType::kBF16, l.ckpt, l.prefix, &layer);
  if (!ls.is_ok() && ls.code() == moe::StatusCode::kUnsupported) GTEST_SKIP() << ls.to_string();  // zero experts
  ASSERT_TRUE(ls.is_ok()) << ls.to_string();
  const moe::Index M = 40, H = l.spec.hidden;
  std::vector<float> x;
  moe::layer::MoeLayer::Result cpu, gpu;
  ASSERT_NO_FATAL_FAILURE(forward_on_both(layer, M, H, 7, &x, &cpu, &gpu));
  moe::layer::MoeLayer resident = layer;
  ASSERT_TRUE(moe::layer::make_layer_resident(&resident).is_ok());
  moe::layer::MoeLayer::Result res;
  ASSERT_TRUE(resident.forward(moe::AnyTensor{x.data(), moe::DType::kF32, {M, H}, {}}, std::nullopt, &res).is_ok());
  EXPECT_EQ(res.output.bytes, gpu.output.bytes);
  EXPECT_EQ(cpu.topk_ids, gpu.topk_ids);
  EXPECT_TRUE(moe::testing::all_close(floats(gpu.output), floats(cpu.output), moe::testing::layer_tolerance(moe::DType::kBF16)));
}

// The all-to-all dispatch over two in-process EP ranks on the CUDA registry (per call, and with
// each rank's weights resident) against the same group on the CPU registry: the same routing, and
// the one-rank tolerance (each dispatched row goes through its rank's kernel once).
TEST_P(LayerBackends, AllToAllDispatchMatchesCpu) {
  const auto [arch, mxfp4] = GetParam();
  moe::testing::SyntheticLayer l;
  ASSERT_NO_FATAL_FAILURE(moe::testing::load_synthetic_layer("layer_a2a", arch, mxfp4, &l));
  for (moe::layer::EpDispatch dispatch : {moe::layer::EpDispatch::kAllToAll, moe::layer::EpDispatch::kAllToAllLowLatency}) {
    SCOPED_TRACE(dispatch == moe::layer::EpDispatch::kAllToAll ? "normal" : "low latency");
    moe::layer::ParallelLayout p;
    p.ep_size = 2;
    p.dispatch = dispatch;
    moe::layer::RankGroupLayer group, resident;
    const moe::Status ls = moe::layer::RankGroupLayer::load(l.config, p, moe::DType::kBF16, l.ckpt, l.prefix, &group);
    ASSERT_TRUE(ls.is_ok()) << ls.to_string();
    const moe::Status rs = moe::layer::RankGroupLayer::load(l.config, p, moe::DType::kBF16, l.ckpt, l.prefix, &resident);
    ASSERT_TRUE(rs.is_ok()) << rs.to_string();
    for (int r = 0; r < resident.size(); ++r) ASSERT_TRUE(moe::layer::make_layer_resident(resident.mutable_rank(r)).is_ok());
    const moe::Index M = 40, H = l.spec.hidden;
    std::mt19937 gen(9);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> x(static_cast<std::size_t>(M * H));
    for (auto& v : x) v = nd(gen);
    const moe::AnyTensor hidden{x.data(), moe::DType::kF32, {M, H}, {}};
    moe::layer::MoeLayer::Result cpu, gpu, res;
    ASSERT_TRUE(group.forward(hidden, std::nullopt, &cpu).is_ok());
    const moe::Status gs = group.forward(hidden, std::nullopt, &gpu, {}, &moe::layer::find_cuda_kernel);
    ASSERT_TRUE(gs.is_ok()) << gs.to_string();
    ASSERT_TRUE(resident.forward(hidden, std::nullopt, &res).is_ok());
    EXPECT_EQ(res.output.bytes, gpu.output.bytes);
    EXPECT_EQ(cpu.topk_ids, gpu.topk_ids);
    EXPECT_GT(moe::testing::max_abs(floats(cpu.output)), 0.0);
    EXPECT_TRUE(moe::testing::all_close(floats(gpu.output), floats(cpu.output), moe::testing::layer_tolerance(moe::DType::kBF16)));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Architectures, LayerBackends,
    ::testing::Values(std::make_tuple("MixtralForCausalLM", false), std::make_tuple("Qwen2MoeForCausalLM", false),
                      std::make_tuple("Qwen3MoeForCausalLM", false), std::make_tuple("DeepseekV2ForCausalLM", false),
                      std::make_tuple("DeepseekV3ForCausalLM", false), std::make_tuple("GptOssForCausalLM", false),
                      std::make_tuple("GptOssForCausalLM", true), std::make_tuple("Llama4ForCausalLM", false)),
    [](const auto& info) { return std::get<0>(info.param) + (std::get<1>(info.param) ? "_mxfp4" : ""); });

// Quantized checkpoints (DeepSeek-V3 layout, routed and shared experts quantized) through the layer
// on the CUDA registry against the CPU registry, bf16 hidden states, every stored format. The CUDA
// quantizer gives the CPU's codes; the GEMMs differ in fp32 summation order and, for FP8, in the
// tensor cores' ~14-bit accumulation within each 128-wide K block (testing/cuda/
// quantized_experts_test.cu explains the bound): 2% relative RMS bounds it, where a scale from the
// wrong block (2-8x) or an unquantized activation is far beyond.
TEST(LayerBackendsQuantized, CudaMatchesCpuOnQuantizedCheckpoints) {
  MOE_SKIP_WITHOUT_GPU();
  if (!moe::layer::cuda_device_available()) GTEST_SKIP() << "the CUDA registry needs compute capability >= 9.0";
  using moe::testing::quantized::Format;
  // The W8A8 formats, then the weight-only ones (GPTQ act-order, AWQ, compressed-tensors).
  const std::vector<moe::testing::weight_only::IntFormat> weight_only = moe::testing::weight_only_formats();
  for (int c = 0; c < 4 + static_cast<int>(weight_only.size()); ++c) {
    const Format f = c < 4 ? static_cast<Format>(c) : Format::kFp8Block;
    SCOPED_TRACE(c < 4 ? std::to_string(c) : moe::testing::weight_only::quantization_config_of(weight_only[c - 4]));
    moe::testing::QuantizedLayer q;
    if (c < 4) {
      ASSERT_NO_FATAL_FAILURE(moe::testing::load_quantized_layer("cuda_layer", f, &q));
    } else {
      ASSERT_NO_FATAL_FAILURE(moe::testing::load_weight_only_layer("cuda_layer", weight_only[c - 4], &q));
    }
    const moe::io::HfLayerSpec& spec = q.spec;
    moe::layer::MoeLayer layer;
    const moe::Status ls = moe::layer::MoeLayer::load(q.config, {}, moe::DType::kBF16, q.ckpt, q.prefix, &layer);
    ASSERT_TRUE(ls.is_ok()) << ls.to_string();
    std::vector<float> x;
    moe::layer::MoeLayer::Result cpu, gpu;
    ASSERT_NO_FATAL_FAILURE(forward_on_both(layer, 24, spec.hidden, 7, &x, &cpu, &gpu));
    EXPECT_EQ(cpu.topk_ids, gpu.topk_ids);
    EXPECT_GT(moe::testing::max_abs(floats(cpu.output)), 0.0);
    EXPECT_LE(moe::testing::relative_rms(floats(gpu.output), floats(cpu.output)), 0.02)
        << "relative RMS difference, format " << static_cast<int>(f);
    // Resident codes and scales (uploaded once) give the per-call path's bits.
    moe::layer::MoeLayer resident = layer;
    const moe::Status rs = moe::layer::make_layer_resident(&resident);
    ASSERT_TRUE(rs.is_ok()) << rs.to_string();
    const moe::AnyTensor hidden{x.data(), moe::DType::kF32, {24, spec.hidden}, {}};
    moe::layer::MoeLayer::Result res;
    const moe::Status fs = resident.forward(hidden, std::nullopt, &res);
    ASSERT_TRUE(fs.is_ok()) << fs.to_string();
    EXPECT_EQ(res.output.bytes, gpu.output.bytes) << "resident vs per-call, format " << static_cast<int>(f);
  }
}

}  // namespace
