// Weight-only checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized; W4A16 and W8A16, groups
// or per channel, with and without zero points, GPTQ act-order) through the layer on the CPU
// backend. The checkpoints are made here (testing/layer/weight_only_model.h) with the tests' own
// quantizer and packers, and a float twin holding the value each code stands for. Checked: the
// layer against the independent double-precision Hugging Face reference on the twin, the packed
// size `moe info` reports, tensor- and expert-parallel ranks adding up to the single rank, splits
// that cut a group refused, and wrong or missing tensors named.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "moe/io/safetensors.h"
#include "moe/io/synthetic_checkpoint.h"
#include "moe/layer/model_config.h"
#include "moe/layer/moe_layer.h"
#include "moe/layer/rank_group_layer.h"
#include "testing/layer/hf_reference.h"
#include "testing/layer/weight_only_model.h"
#include "testing/lib/compare.h"

namespace moe::layer {
namespace {

using testing::weight_only::IntFormat;
using testing::weight_only::Kind;
using testing::weight_only::Model;
using testing::weight_only::write_model;

io::HfLayerSpec spec_of(const std::string& architecture, Index H, Index I) {
  io::HfLayerSpec s;
  s.architecture = architecture;
  s.hidden = H;
  s.intermediate = I;
  s.shared_intermediate = I;
  s.num_experts = 8;
  s.top_k = 2;
  s.dtype = DType::kF32;
  return s;
}

Status load(const std::string& config, const std::string& weights, const std::string& prefix, const ParallelLayout& par,
            DType dtype, MoeLayer* out) {
  ModelConfig c;
  MOE_RETURN_IF_ERROR(load_model_config(config, &c));
  io::Checkpoint ckpt;
  MOE_RETURN_IF_ERROR(io::Checkpoint::open({weights}, &ckpt));
  return MoeLayer::load(c, par, dtype, ckpt, prefix, out);
}


std::vector<double> forward(const MoeLayer& l, std::vector<float>& x, Index M, Index H) {
  MoeLayer::Result r;
  const Status s = l.forward(AnyTensor{x.data(), DType::kF32, {M, H}, {}}, std::nullopt, &r);
  EXPECT_TRUE(s.is_ok()) << s.to_string();
  std::vector<double> out(static_cast<std::size_t>(M * H), 0.0);
  if (!s.is_ok()) return out;
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = to_float(reinterpret_cast<const bfloat16*>(r.output.bytes.data())[i]);
  return out;
}

struct FormatCase {
  const char* name;
  const char* architecture;
  IntFormat format;
  const char* scheme;
  const char* info;  // what `moe info` says of the quantization
};
const FormatCase kFormats[] = {
    {"gptq_g32_act_order", "MixtralForCausalLM", {Kind::kGptq, 4, 32, false, true}, "w4a16",
     "int4 weight-only W4A16, act-order [gptq], weight scales group of 32"},
    {"gptq_int8_channel_zp", "Qwen3MoeForCausalLM", {Kind::kGptq, 8, 0, true, false}, "w8a16",
     "int8 weight-only W8A16 with zero points [gptq], weight scales per-channel"},
    {"awq_g64_zp", "Qwen3MoeForCausalLM", {Kind::kAwq, 4, 64, true, false}, "w4a16",
     "int4 weight-only W4A16 with zero points [awq], weight scales group of 64"},
    {"ct_g32_zp_act_order", "DeepseekV3ForCausalLM", {Kind::kCompressedTensors, 4, 32, true, true}, "w4a16",
     "int4 weight-only W4A16 with zero points, act-order [compressed-tensors], weight scales group of 32"},
    {"ct_int8_channel", "Qwen2MoeForCausalLM", {Kind::kCompressedTensors, 8, 0, false, false}, "w8a16",
     "int8 weight-only W8A16 [compressed-tensors], weight scales per-channel"},
};

// Tolerance: the twin holds exactly the values the codes stand for (bf16(float(q - z) * bf16(s))),
// so the layer and the reference differ by the layer's bf16 activations, intermediate and output
// alone: 2e-2 of max|ref|, the bf16 tolerance of testing/layer/layer_test.cc. A scale from the
// wrong group or row (2-8x), a zero point off by one code or a nibble from the wrong slot is
// far beyond it.
constexpr testing::Tolerance kBf16{1e-3, 2e-2};

TEST(WeightOnlyCheckpoint, EachFormatMatchesTheReferenceOnTheDequantizedTwin) {
  for (const FormatCase& fc : kFormats) {
    SCOPED_TRACE(fc.name);
    const Index H = 128, I = 96, M = 9;
    const Model m = write_model(fc.name, spec_of(fc.architecture, H, I), fc.format);
    MoeLayer l;
    const Status s = load(m.config, m.weights, m.prefix, {}, DType::kBF16, &l);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    EXPECT_EQ(l.weight_scheme(), fc.scheme);
    const std::string info = l.describe();
    EXPECT_NE(info.find(fc.info), std::string::npos) << info;
    EXPECT_NE(info.find(std::string("weights ") + fc.scheme), std::string::npos) << info;
    // Packed: 4-bit codes are a quarter of the twin's bf16 bytes (plus scales), 8-bit a half.
    MoeLayer twin_layer;
    ASSERT_TRUE(load(m.float_config, m.float_weights, m.prefix, {}, DType::kBF16, &twin_layer).is_ok());
    const double ratio = static_cast<double>(l.weight_bytes()) / static_cast<double>(twin_layer.weight_bytes());
    EXPECT_LT(ratio, fc.format.bits == 4 ? 0.36 : 0.6) << l.weight_bytes() << " vs " << twin_layer.weight_bytes();
    EXPECT_NE(info.find("expert weights    " + std::to_string(l.weight_bytes()) + " bytes"), std::string::npos) << info;
    std::vector<float> x = testing::quantized::wavy_hidden_states(M, H);
    const std::vector<double> out = forward(l, x, M, H);
    io::Checkpoint twin;
    ASSERT_TRUE(io::Checkpoint::open({m.float_weights}, &twin).is_ok());
    const testing::hf::RefResult ref = testing::hf::reference_forward(m.float_config_json, twin, m.prefix, x, M);
    EXPECT_TRUE(testing::all_close(out, ref.output, kBf16));
  }
}

// Ranks add up to the single rank (each rank's output and the single one are rounded to bf16, so
// within the bf16 tolerance): tp 2 where the slices are whole groups (I = 128, group 32; per
// channel), ep 2 with act-order.
TEST(WeightOnlyCheckpoint, TensorAndExpertParallelRanksAddUpToTheSingleRankOutput) {
  const Index H = 128, I = 128, M = 6;
  struct RankCase {
    IntFormat format;
    bool tp;
  };
  for (const RankCase rc : {RankCase{{Kind::kGptq, 4, 32, true, false}, true}, RankCase{{Kind::kAwq, 4, 64, true, false}, true},
                            RankCase{{Kind::kCompressedTensors, 8, 0, false, false}, true},
                            RankCase{{Kind::kGptq, 4, 32, false, true}, false}}) {
    SCOPED_TRACE(testing::weight_only::quantization_config_of(rc.format) + (rc.tp ? " tp" : " ep"));
    const Model m = write_model("ranks", spec_of("DeepseekV3ForCausalLM", H, I), rc.format);
    MoeLayer full;
    ASSERT_TRUE(load(m.config, m.weights, m.prefix, {}, DType::kBF16, &full).is_ok());
    std::vector<float> x = testing::quantized::wavy_hidden_states(M, H);
    const std::vector<double> expect = forward(full, x, M, H);
    std::vector<double> sum(expect.size(), 0.0);
    for (int rank = 0; rank < 2; ++rank) {
      ParallelLayout par;
      (rc.tp ? par.tp_size : par.ep_size) = 2;
      (rc.tp ? par.tp_rank : par.ep_rank) = rank;
      MoeLayer l;
      const Status s = load(m.config, m.weights, m.prefix, par, DType::kBF16, &l);
      ASSERT_TRUE(s.is_ok()) << s.to_string();
      const std::vector<double> part = forward(l, x, M, H);
      for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += part[i];
    }
    EXPECT_TRUE(testing::all_close(sum, expect, kBf16));
  }
}

// EPLB on weight-only checkpoints: the codes, group scales, zero points and act-order permutations
// move with their experts in a rebalance; the in-process ranks give the single-rank output.
TEST(WeightOnlyCheckpoint, EplbReplicasAndRebalancingMoveTheScales) {
  const Index H = 128, I = 128, M = 6;
  for (const IntFormat f : {IntFormat{Kind::kGptq, 4, 32, false, true}, IntFormat{Kind::kAwq, 4, 64, true, false},
                            IntFormat{Kind::kCompressedTensors, 8, 0, false, false}}) {
    SCOPED_TRACE(testing::weight_only::quantization_config_of(f));
    const Model m = write_model("eplb", spec_of("DeepseekV3ForCausalLM", H, I), f);
    MoeLayer full;
    ASSERT_TRUE(load(m.config, m.weights, m.prefix, {}, DType::kBF16, &full).is_ok());
    std::vector<float> x = testing::quantized::wavy_hidden_states(M, H);
    const std::vector<double> expect = forward(full, x, M, H);
    ModelConfig c;
    ASSERT_TRUE(load_model_config(m.config, &c).is_ok());
    io::Checkpoint ckpt;
    ASSERT_TRUE(io::Checkpoint::open({m.weights}, &ckpt).is_ok());
    ParallelLayout par;
    par.ep_size = 2;
    par.redundant_experts = 2;
    layer::RankGroupLayer g;
    const Status ls = layer::RankGroupLayer::load(c, par, DType::kBF16, ckpt, m.prefix, &g);
    ASSERT_TRUE(ls.is_ok()) << ls.to_string();
    const auto group_forward = [&] {
      MoeLayer::Result r;
      const Status s = g.forward(AnyTensor{x.data(), DType::kF32, {M, H}, {}}, std::nullopt, &r);
      EXPECT_TRUE(s.is_ok()) << s.to_string();
      std::vector<double> out(expect.size(), 0.0);
      for (std::size_t i = 0; s.is_ok() && i < out.size(); ++i) out[i] = to_float(reinterpret_cast<const bfloat16*>(r.output.bytes.data())[i]);
      return out;
    };
    EXPECT_TRUE(testing::all_close(group_forward(), expect, kBf16));
    const std::vector<std::int32_t> before = g.rank(0).eplb_placement()->physical_to_logical;
    const Status rs = g.rebalance();
    ASSERT_TRUE(rs.is_ok()) << rs.to_string();
    EXPECT_NE(g.rank(1).eplb_placement()->physical_to_logical, before) << "the test's load moved no expert";
    EXPECT_TRUE(testing::all_close(group_forward(), expect, kBf16));
  }
}

// A tensor-parallel slice that starts inside a group, or act-order groups spread over both ranks'
// columns, cannot be represented with whole groups: refused, naming the rank and the reason.
TEST(WeightOnlyCheckpoint, SplitsThatCutAGroupAreRefused) {
  for (const IntFormat f : {IntFormat{Kind::kGptq, 4, 64, false, false}, IntFormat{Kind::kGptq, 4, 32, false, true}}) {
    const Model m = write_model("cut", spec_of("MixtralForCausalLM", 128, 96), f);
    ParallelLayout par;
    par.tp_size = 2;  // I / 2 = 48: rank 1 starts inside the first 64-group; act-order mixes every group
    par.tp_rank = 1;
    MoeLayer l;
    const Status s = load(m.config, m.weights, m.prefix, par, DType::kBF16, &l);
    ASSERT_FALSE(s.is_ok());
    EXPECT_NE(s.message().find("tp_rank 1 of tp_size 2"), std::string::npos) << s.to_string();
    EXPECT_NE(s.message().find("whole groups"), std::string::npos) << s.to_string();
  }
}

TEST(WeightOnlyCheckpoint, WrongTensorsAreNamedAndF32IsRefused) {
  const IntFormat gptq{Kind::kGptq, 4, 32, true, false};
  const auto refused = [](const Model& m, std::initializer_list<std::string> parts, DType dtype = DType::kBF16) {
    MoeLayer l;
    const Status s = load(m.config, m.weights, m.prefix, {}, dtype, &l);
    ASSERT_FALSE(s.is_ok());
    for (const std::string& p : parts) EXPECT_NE(s.message().find(p), std::string::npos) << s.to_string();
  };
  // A qweight of the wrong shape: named with both shapes.
  refused(write_model("bad_shape", spec_of("MixtralForCausalLM", 128, 64), gptq,
                      [](io::NamedTensor& t) {
                        if (t.name.find("experts.3.w2.qweight") != std::string::npos) t.shape = {t.shape[1], t.shape[0]};
                      }),
          {"experts.3.w2.qweight", "[8, 128]", "[128, 8]"});
  // Missing scales: named.
  refused(write_model("no_scales", spec_of("MixtralForCausalLM", 128, 64), gptq,
                      [](io::NamedTensor& t) {
                        if (t.name.find("experts.5.w1.scales") != std::string::npos) t.name.clear();
                      }),
          {"experts.5.w1.scales"});
  // A compressed-tensors weight_shape that disagrees with the config.
  refused(write_model("bad_weight_shape", spec_of("DeepseekV3ForCausalLM", 128, 64), {Kind::kCompressedTensors, 4, 32, false, false},
                      [](io::NamedTensor& t) {
                        if (t.name.find("shared_experts.up_proj.weight_shape") != std::string::npos) {
                          static const std::int64_t wrong[2] = {64, 256};
                          t.data = wrong;
                        }
                      }),
          {"shared_experts.up_proj.weight_shape", "[64, 128]", "[64, 256]"});
  // A group index outside the groups.
  refused(write_model("bad_g_idx", spec_of("MixtralForCausalLM", 128, 64), {Kind::kGptq, 4, 32, false, true},
                      [](io::NamedTensor& t) {
                        if (t.name.find("experts.0.w3.g_idx") != std::string::npos) {
                          static std::vector<std::int32_t> g(128, 0);
                          g[5] = 9;
                          t.data = g.data();
                        }
                      }),
          {"experts.0.w3.g_idx", "[0, 4)", "9"});
  // f32 activations: weight-only schemes run in bf16 or f16.
  const Model ok = write_model("f32", spec_of("MixtralForCausalLM", 128, 64), gptq);
  refused(ok, {"dtype", "bf16 or f16", "f32"}, DType::kF32);
}

}  // namespace
}  // namespace moe::layer

namespace moe::layer {
namespace {

// gpt-oss's MXFP4 experts stay packed in a bf16 layer (moe/quant/mxfp4.h): the scheme is mxfp4,
// the codes and E8M0 scales take about a quarter of the widened layer's bf16 bytes, the output
// is the widened f32 layer's within the bf16 tolerance, TP 2 ranks (I = 64: 32 columns each) add
// up to the single rank, and a split that cuts a 32-column scale block is refused.
TEST(Mxfp4Checkpoint, GptOssExpertsStayPackedInBf16) {
  io::HfLayerSpec spec = spec_of("GptOssForCausalLM", 64, 64);
  spec.mxfp4 = true;
  const std::string dir = testing::hf::make_test_dir("mxfp4_packed");
  io::HfCheckpointWriter w(spec);
  ASSERT_TRUE(w.write(dir).is_ok());
  const auto load_gpt_oss = [&](const ParallelLayout& par, DType dtype, MoeLayer* out) {
    return load(dir + "/config.json", dir + "/model.safetensors", w.prefix(), par, dtype, out);
  };
  MoeLayer packed, widened;
  ASSERT_TRUE(load_gpt_oss({}, DType::kBF16, &packed).is_ok());
  ASSERT_TRUE(load_gpt_oss({}, DType::kF32, &widened).is_ok());
  EXPECT_EQ(packed.weight_scheme(), "mxfp4");
  EXPECT_EQ(widened.weight_scheme(), "none");
  // Codes (1/2 byte) and a scale byte per 32 against 4-byte floats: under a seventh, biases included.
  EXPECT_LT(packed.weight_bytes() * 7, widened.weight_bytes()) << packed.weight_bytes() << " vs " << widened.weight_bytes();
  const Index M = 7, H = spec.hidden;
  std::vector<float> x = testing::quantized::wavy_hidden_states(M, H);
  const std::vector<double> out = forward(packed, x, M, H);
  MoeLayer::Result r;
  ASSERT_TRUE(widened.forward(AnyTensor{x.data(), DType::kF32, {M, H}, {}}, std::nullopt, &r).is_ok());
  std::vector<double> ref(static_cast<std::size_t>(M * H));
  for (std::size_t i = 0; i < ref.size(); ++i) ref[i] = reinterpret_cast<const float*>(r.output.bytes.data())[i];
  EXPECT_TRUE(testing::all_close(out, ref, kBf16));
  std::vector<double> sum(out.size(), 0.0);
  for (int rank = 0; rank < 2; ++rank) {
    ParallelLayout par;
    par.tp_size = 2;
    par.tp_rank = rank;
    MoeLayer l;
    const Status s = load_gpt_oss(par, DType::kBF16, &l);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    const std::vector<double> part = forward(l, x, M, H);
    for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += part[i];
  }
  EXPECT_TRUE(testing::all_close(sum, out, kBf16));
  ParallelLayout four;
  four.tp_size = 4;  // 16 columns per rank: half a scale block
  MoeLayer refused;
  const Status s = load_gpt_oss(four, DType::kBF16, &refused);
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("multiple of 32"), std::string::npos) << s.to_string();
}

}  // namespace
}  // namespace moe::layer
