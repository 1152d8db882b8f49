// The runtime layer (Hugging Face checkpoints) on the CUDA registry vs the CPU registry, for every
// supported architecture: same routing (ids and weights exactly), outputs within the per-dtype
// tolerance of the differential test (same rounding points; GEMM summation order differs).
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <random>

#include "moe/layer/cuda_registry.h"
#include "moe/layer/moe_layer.h"
#include "testing/lib/compare.h"
#include "testing/lib/gpu.h"
#include "moe/io/synthetic_checkpoint.h"

namespace {

std::vector<float> floats(const moe::layer::Buffer& b) {
  std::vector<float> v(b.bytes.size() / (b.dtype == moe::DType::kF32 ? 4 : 2));
  for (std::size_t i = 0; i < v.size(); ++i) {
    v[i] = b.dtype == moe::DType::kF32 ? reinterpret_cast<const float*>(b.bytes.data())[i]
           : b.dtype == moe::DType::kBF16 ? moe::to_float(reinterpret_cast<const moe::bfloat16*>(b.bytes.data())[i])
                                          : moe::to_float(reinterpret_cast<const moe::half*>(b.bytes.data())[i]);
  }
  return v;
}

class LayerBackends : public ::testing::TestWithParam<std::tuple<std::string, bool>> {
 protected:
  void SetUp() override {
    MOE_SKIP_WITHOUT_GPU();
    if (!moe::layer::cuda_device_available()) GTEST_SKIP() << "the CUDA registry needs compute capability >= 9.0";
  }
};

TEST_P(LayerBackends, CudaMatchesCpu) {
  const auto [arch, mxfp4] = GetParam();
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::filesystem::path dir = std::filesystem::path(tmp ? tmp : "/tmp") / ("layer_" + arch + (mxfp4 ? "_mxfp4" : ""));
  std::filesystem::create_directories(dir);
  moe::io::HfLayerSpec spec;
  spec.architecture = arch;
  spec.mxfp4 = mxfp4;
  spec.top_k = arch == "Llama4ForCausalLM" ? 1 : 2;
  moe::io::HfCheckpointWriter writer(spec);
  ASSERT_TRUE(writer.write(dir.string()).is_ok());
  moe::layer::ModelConfig config;
  ASSERT_TRUE(moe::layer::load_model_config((dir / "config.json").string(), &config).is_ok());
  moe::io::Checkpoint ckpt;
  ASSERT_TRUE(moe::io::Checkpoint::open({(dir / "model.safetensors").string()}, &ckpt).is_ok());
  for (moe::DType dtype : {moe::DType::kF32, moe::DType::kBF16}) {
    moe::layer::MoeLayer layer;
    const moe::Status ls = moe::layer::MoeLayer::load(config, {}, dtype, ckpt, writer.prefix(), &layer);
    ASSERT_TRUE(ls.is_ok()) << ls.to_string();
    const moe::Index M = 40, H = spec.hidden;
    std::mt19937 gen(5);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> x(M * H);
    for (auto& v : x) v = nd(gen);
    const moe::AnyTensor hidden{x.data(), moe::DType::kF32, {M, H}, {}};
    moe::layer::MoeLayer::Result cpu, gpu;
    ASSERT_TRUE(layer.forward(hidden, std::nullopt, &cpu).is_ok());
    const moe::Status gs = layer.forward(hidden, std::nullopt, &gpu, {}, &moe::layer::find_cuda_kernel);
    ASSERT_TRUE(gs.is_ok()) << gs.to_string();
    // Resident weights (copied once) give the same bits as per-call copies.
    moe::layer::MoeLayer resident = layer;
    ASSERT_TRUE(moe::layer::make_layer_resident(&resident).is_ok());
    moe::layer::MoeLayer::Result res;
    ASSERT_TRUE(resident.forward(hidden, std::nullopt, &res).is_ok());
    EXPECT_EQ(res.output.bytes, gpu.output.bytes);
    EXPECT_EQ(cpu.topk_ids, gpu.topk_ids);
    EXPECT_EQ(cpu.topk_weights, gpu.topk_weights);
    const moe::testing::Tolerance tol = dtype == moe::DType::kF32 ? moe::testing::Tolerance{1e-4, 5e-3}
                                                                  : moe::testing::Tolerance{1e-3, 2e-2};
    EXPECT_GT(moe::testing::max_abs(floats(cpu.output)), 0.0);
    EXPECT_TRUE(moe::testing::all_close(floats(gpu.output), floats(cpu.output), tol)) << moe::to_string(dtype);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Architectures, LayerBackends,
    ::testing::Values(std::make_tuple("MixtralForCausalLM", false), std::make_tuple("Qwen2MoeForCausalLM", false),
                      std::make_tuple("Qwen3MoeForCausalLM", false), std::make_tuple("DeepseekV2ForCausalLM", false),
                      std::make_tuple("DeepseekV3ForCausalLM", false), std::make_tuple("GptOssForCausalLM", false),
                      std::make_tuple("GptOssForCausalLM", true), std::make_tuple("Llama4ForCausalLM", false)),
    [](const auto& info) { return std::get<0>(info.param) + (std::get<1>(info.param) ? "_mxfp4" : ""); });

}  // namespace
