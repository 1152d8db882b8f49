// Block-scaled FP8 checkpoints (quant_method fp8, weight_block_size [128, 128]: DeepSeek-V3 and
// Qwen3 FP8) through the layer on the CPU backend. The checkpoints are made here from the synthetic
// float ones: every routed and shared expert Linear quantized with its own 128x128 scales (the
// blocks' magnitudes made to differ by up to 8x, so a scale taken from the wrong block, expert or
// rank is far off), and a float twin holding code * scale. Checked: the layer against the
// independent double-precision Hugging Face reference on the twin (the difference is the dynamic
// activation quantization alone), tensor- and expert-parallel ranks adding up to the single-rank
// output, splits that cut a scale block refused, and wrong scale tensors named.
#include <gtest/gtest.h>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "moe/io/json.h"
#include "moe/io/safetensors.h"
#include "moe/io/synthetic_checkpoint.h"
#include "moe/layer/model_config.h"
#include "moe/layer/moe_layer.h"
#include "moe/layer/rank_group_layer.h"
#include "moe/quant/numeric.h"
#include "testing/layer/hf_reference.h"
#include "testing/layer/quantized_checkpoint.h"

namespace moe::layer {
namespace {

using namespace moe::testing::quantized;

io::HfLayerSpec deepseek(Index H, Index I) {
  io::HfLayerSpec s;
  s.architecture = "DeepseekV3ForCausalLM";
  s.hidden = H;
  s.intermediate = I;
  s.num_experts = 8;
  s.top_k = 2;
  s.n_shared_experts = 1;
  s.dtype = DType::kF32;
  return s;
}

Status load(const std::string& config, const std::string& weights, const std::string& prefix, const ParallelLayout& par,
            MoeLayer* out) {
  ModelConfig c;
  MOE_RETURN_IF_ERROR(load_model_config(config, &c));
  io::Checkpoint ckpt;
  MOE_RETURN_IF_ERROR(io::Checkpoint::open({weights}, &ckpt));
  return MoeLayer::load(c, par, DType::kF32, ckpt, prefix, out);
}


std::vector<float> forward(const MoeLayer& l, std::vector<float>& x, Index M, Index H) {
  MoeLayer::Result r;
  const Status s = l.forward(AnyTensor{x.data(), DType::kF32, {M, H}, {}}, std::nullopt, &r);
  EXPECT_TRUE(s.is_ok()) << s.to_string();
  std::vector<float> out(static_cast<std::size_t>(M * H));
  if (s.is_ok()) std::memcpy(out.data(), r.output.bytes.data(), out.size() * sizeof(float));
  return out;
}

// Tolerance: the twin holds exactly the values the codes and scales stand for, so the layer and
// the reference differ by the dynamic FP8 quantization of GEMM1's input (per token and 128
// columns) and of the intermediate: a relative error of at most 1/16 per element, about 2-4% of
// the output's RMS after the two GEMMs. 8% bounds it; a scale from the wrong block (2-8x) or the
// activation left unquantized with the wrong scale is far beyond it.
// Per format: the scheme the layer picks, and what `moe info` says of it.
struct FormatCase {
  Format format;
  const char* name;
  const char* scheme;
  const char* info;
};
constexpr FormatCase kFormats[] = {
    {Format::kFp8Block, "fp8_block", "fp8_block_128x128", "fp8 e4m3 W8A8 [fp8], weight scales block 128x128, activations dynamic per-token-group of 128"},
    {Format::kFp8Channel, "fp8_channel", "fp8_per_token_channel", "fp8 e4m3 W8A8 [compressed-tensors], weight scales per-channel, activations dynamic per-token"},
    {Format::kInt8Channel, "int8_channel", "int8_per_token_channel", "int8 W8A8 [compressed-tensors], weight scales per-channel, activations dynamic per-token"},
    {Format::kFp8TensorStatic, "fp8_tensor", "fp8_per_tensor", "fp8 e4m3 W8A8 [fp8], weight scales per-tensor, activations static per-tensor"},
};

TEST(Fp8Checkpoint, DeepSeekV3MatchesTheReferenceOnTheDequantizedTwin) {
  for (const FormatCase& fc : kFormats) {
  SCOPED_TRACE(fc.name);
  const Index H = 160, I = 192, M = 9;  // ragged: H = 128 + 32, I = 128 + 64 (one rank)
  const Fp8Model m = write_fp8_model(std::string("deepseek_") + fc.name, deepseek(H, I), nullptr, fc.format);
  MoeLayer l;
  const Status s = load(m.fp8_config, m.fp8_weights, m.prefix, {}, &l);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(l.weight_scheme(), fc.scheme);
  const std::string info = l.describe();
  EXPECT_NE(info.find(fc.info), std::string::npos) << info;
  EXPECT_NE(info.find(std::string("weights ") + fc.scheme), std::string::npos) << info;
  // The codes are held as one byte each: the float twin's layer holds four.
  MoeLayer twin_layer;
  ASSERT_TRUE(load(m.float_config, m.float_weights, m.prefix, {}, &twin_layer).is_ok());
  EXPECT_LT(l.weight_bytes() * 3, twin_layer.weight_bytes()) << l.weight_bytes() << " vs " << twin_layer.weight_bytes();
  EXPECT_NE(info.find("expert weights    " + std::to_string(l.weight_bytes()) + " bytes"), std::string::npos) << info;
  std::vector<float> x = testing::quantized::wavy_hidden_states(M, H);
  const std::vector<float> out = forward(l, x, M, H);
  io::Checkpoint twin;
  ASSERT_TRUE(io::Checkpoint::open({m.float_weights}, &twin).is_ok());
  const testing::hf::RefResult ref = testing::hf::reference_forward(m.float_config_json, twin, m.prefix, x, M);
  double err = 0, mag = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    ASSERT_TRUE(std::isfinite(out[i]));
    err += (out[i] - ref.output[i]) * (out[i] - ref.output[i]);
    mag += ref.output[i] * ref.output[i];
  }
  EXPECT_GT(mag, 0.0);
  // Static per-tensor activations: values far below the scale's range are subnormal codes (an
  // absolute error of scale * 2^-10), so 10% there (measured 6%; the dynamic formats 2-4%).
  EXPECT_LE(std::sqrt(err / mag), fc.format == Format::kFp8TensorStatic ? 0.10 : 0.08) << "relative RMS error";
  }
}

// Ranks add up to the single-rank output (f32: the same scales and activation groups; only the
// order of the final sums differs): ep 2 in every format; tp 2 where each rank quantizes its slice
// of the intermediate with the single rank's groups (128-blocks whose slices are whole blocks,
// static scales). Per-token activations of a TP slice are scaled by that slice's amax, as in vLLM,
// so those ranks do not add up bit for bit and are not checked here.
TEST(Fp8Checkpoint, TensorAndExpertParallelRanksAddUpToTheSingleRankOutput) {
  for (const FormatCase& fc : kFormats) {
  SCOPED_TRACE(fc.name);
  const Index H = 128, I = 256, M = 6;
  const Fp8Model m = write_fp8_model(std::string("ranks_") + fc.name, deepseek(H, I), nullptr, fc.format);
  MoeLayer full;
  ASSERT_TRUE(load(m.fp8_config, m.fp8_weights, m.prefix, {}, &full).is_ok());
  std::vector<float> x = testing::quantized::wavy_hidden_states(M, H);
  const std::vector<float> expect = forward(full, x, M, H);
  const bool tp_adds_up = fc.format == Format::kFp8Block || fc.format == Format::kFp8TensorStatic;
  for (const bool tp : {true, false}) {
    if (tp && !tp_adds_up) continue;
    std::vector<float> sum(expect.size(), 0.0f);
    for (int rank = 0; rank < 2; ++rank) {
      ParallelLayout par;
      (tp ? par.tp_size : par.ep_size) = 2;
      (tp ? par.tp_rank : par.ep_rank) = rank;
      MoeLayer l;
      const Status s = load(m.fp8_config, m.fp8_weights, m.prefix, par, &l);
      ASSERT_TRUE(s.is_ok()) << s.to_string();
      const std::vector<float> part = forward(l, x, M, H);
      for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += part[i];
    }
    double max_abs = 0;
    for (float v : expect) max_abs = std::max(max_abs, std::fabs(double(v)));
    for (std::size_t i = 0; i < sum.size(); ++i) {
      ASSERT_NEAR(sum[i], expect[i], 1e-5 * max_abs) << (tp ? "tp" : "ep") << " element " << i;
    }
  }
  }
}

// EPLB on quantized checkpoints: replicas and a rebalance move the codes and every scale tensor
// with their experts, so the in-process ranks still give the single-rank output (to the EP test's
// 1e-5); static activation scales (the largest of a rank's experts) make the rebalance an error
// that names them.
TEST(Fp8Checkpoint, EplbReplicasAndRebalancingMoveTheScales) {
  for (const FormatCase& fc : kFormats) {
    SCOPED_TRACE(fc.name);
    const Index H = 128, I = 256, M = 6;
    const Fp8Model m = write_fp8_model(std::string("eplb_") + fc.name, deepseek(H, I), nullptr, fc.format);
    MoeLayer full;
    ASSERT_TRUE(load(m.fp8_config, m.fp8_weights, m.prefix, {}, &full).is_ok());
    std::vector<float> x = testing::quantized::wavy_hidden_states(M, H);
    const std::vector<float> expect = forward(full, x, M, H);
    double max_abs = 0;
    for (float v : expect) max_abs = std::max(max_abs, std::fabs(double(v)));
    ModelConfig c;
    ASSERT_TRUE(load_model_config(m.fp8_config, &c).is_ok());
    io::Checkpoint ckpt;
    ASSERT_TRUE(io::Checkpoint::open({m.fp8_weights}, &ckpt).is_ok());
    ParallelLayout par;
    par.ep_size = 2;
    par.redundant_experts = 2;
    layer::RankGroupLayer g;
    const Status ls = layer::RankGroupLayer::load(c, par, DType::kF32, ckpt, m.prefix, &g);
    ASSERT_TRUE(ls.is_ok()) << ls.to_string();
    const auto expect_full_output = [&](const char* when) {
      MoeLayer::Result r;
      const Status s = g.forward(AnyTensor{x.data(), DType::kF32, {M, H}, {}}, std::nullopt, &r);
      ASSERT_TRUE(s.is_ok()) << s.to_string();
      const auto* out = reinterpret_cast<const float*>(r.output.bytes.data());
      for (std::size_t i = 0; i < expect.size(); ++i) ASSERT_NEAR(out[i], expect[i], 1e-5 * max_abs) << when << " element " << i;
    };
    expect_full_output("before the rebalance");
    const std::vector<std::int32_t> before = g.rank(0).eplb_placement()->physical_to_logical;
    const Status rs = g.rebalance();
    if (fc.format == Format::kFp8TensorStatic) {
      EXPECT_NE(rs.to_string().find("static activation scales"), std::string::npos) << rs.to_string();
      continue;
    }
    ASSERT_TRUE(rs.is_ok()) << rs.to_string();
    EXPECT_NE(g.rank(1).eplb_placement()->physical_to_logical, before) << "the test's load moved no expert";
    expect_full_output("after the rebalance");
  }
}

TEST(Fp8Checkpoint, SplitsThatCutAScaleBlockAreRefused) {
  const Fp8Model m = write_fp8_model("ragged_tp", deepseek(128, 192));
  ParallelLayout par;
  par.tp_size = 2;  // I/2 = 96: rank 1 would start inside a block
  MoeLayer l;
  const Status s = load(m.fp8_config, m.fp8_weights, m.prefix, par, &l);
  ASSERT_FALSE(s.is_ok());
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("tp_size"), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("128"), std::string::npos) << s.to_string();
}

TEST(Fp8Checkpoint, WrongScaleTensorsAndFloatWeightsAreNamed) {
  // A scale tensor of the wrong shape: named with both shapes.
  const Fp8Model m = write_fp8_model("bad_scale", deepseek(128, 128), [](std::string& name, std::vector<std::int64_t>& shape) {
    if (name.find("experts.3.down_proj") != std::string::npos) shape = {1, 2};
  });
  MoeLayer l;
  Status s = load(m.fp8_config, m.fp8_weights, m.prefix, {}, &l);
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("experts.3.down_proj.weight_scale_inv"), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("[1, 1]"), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("[1, 2]"), std::string::npos) << s.to_string();
  // A missing scale tensor: named.
  const Fp8Model n = write_fp8_model("no_scale", deepseek(128, 128), [](std::string& name, std::vector<std::int64_t>&) {
    if (name.find("shared_experts.up_proj") != std::string::npos) name += "_renamed";
  });
  s = load(n.fp8_config, n.fp8_weights, n.prefix, {}, &l);
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("shared_experts.up_proj.weight_scale_inv"), std::string::npos) << s.to_string();
  // Float weights under an fp8 quantization_config: the dtype is named, never run as unscaled.
  s = load(n.fp8_config, n.float_weights, n.prefix, {}, &l);
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("F8_E4M3"), std::string::npos) << s.to_string();
}

}  // namespace
}  // namespace moe::layer
