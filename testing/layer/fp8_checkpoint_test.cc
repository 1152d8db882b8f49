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
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "moe/io/json.h"
#include "moe/io/safetensors.h"
#include "moe/io/synthetic_checkpoint.h"
#include "moe/layer/model_config.h"
#include "moe/layer/moe_layer.h"
#include "moe/quant/numeric.h"
#include "testing/layer/hf_reference.h"

namespace moe::layer {
namespace {

constexpr Index kBlock = 128;

bool is_expert_linear(const std::string& name) {
  const bool expert = name.find(".experts.") != std::string::npos || name.find(".shared_experts.") != std::string::npos;
  const auto ends = [&](const std::string& s) { return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0; };
  return expert && ends("_proj.weight");
}

struct Fp8Model {
  std::string dir, fp8_config, float_config, fp8_weights, float_weights, prefix;
  io::Json float_config_json;
};

// The stored formats: quant_method fp8 with 128x128 blocks (DeepSeek-V3), compressed-tensors FP8
// and INT8 per channel (dynamic per-token activations), quant_method fp8 per tensor with static
// input scales.
enum class Format { kFp8Block, kFp8Channel, kInt8Channel, kFp8TensorStatic };
// Static activation scales: the intermediate of the weights scaled by up to 8x reaches ~100; up to
// 128 is represented, and values from 128 * 2^-6 / 448 up keep fp8's full relative precision.
constexpr float kStaticInputScale = 128.0f / 448.0f;

const char* quantization_config_of(Format f) {
  switch (f) {
    case Format::kFp8Block:
      return R"({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]})";
    case Format::kFp8Channel:
      return R"({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {"targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": false, "symmetric": true},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true, "symmetric": true}}}})";
    case Format::kInt8Channel:
      return R"({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {"targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "dynamic": false, "symmetric": true},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": true, "symmetric": true}}}})";
    case Format::kFp8TensorStatic:
      return R"({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "static"})";
  }
  return "";
}

// `edit_scale` may change a scale tensor's name or shape before it is written.
Fp8Model write_fp8_model(const std::string& name, const io::HfLayerSpec& spec,
                         const std::function<void(std::string&, std::vector<std::int64_t>&)>& edit_scale = nullptr,
                         Format format = Format::kFp8Block) {
  Fp8Model m;
  m.dir = testing::hf::make_test_dir("fp8_" + name);
  io::HfCheckpointWriter w(spec);
  EXPECT_TRUE(w.write(m.dir).is_ok());
  m.prefix = w.prefix();
  io::SafetensorsFile f;
  EXPECT_TRUE(io::SafetensorsFile::open(m.dir + "/model.safetensors", &f).is_ok());
  // Storage for every tensor written (NamedTensor points into it).
  std::vector<std::vector<std::uint8_t>> codes;
  std::vector<std::vector<float>> floats;
  codes.reserve(f.names().size() * 2);
  floats.reserve(f.names().size() * 3);
  std::vector<io::NamedTensor> fp8_tensors, float_tensors;
  int linear = 0;
  for (const std::string& n : f.names()) {
    AnyTensor t;
    EXPECT_TRUE(f.tensor(n, &t).is_ok());
    Index count = 1;
    for (Index e : t.extents) count *= e;
    std::vector<float>& v = floats.emplace_back(static_cast<std::size_t>(count));
    for (Index i = 0; i < count; ++i) {
      v[i] = t.dtype == DType::kF32 ? static_cast<const float*>(t.data)[i]
                                    : bfloat16::to_float(static_cast<const std::uint16_t*>(t.data)[i]);
    }
    const std::vector<std::int64_t> shape(t.extents.begin(), t.extents.end());
    if (!is_expert_linear(n)) {
      fp8_tensors.push_back({n, DType::kF32, shape, v.data()});
      float_tensors.push_back({n, DType::kF32, shape, v.data()});
      continue;
    }
    // Scale blocks: 128x128, whole rows (channel) or the whole tensor.
    const Index N = t.extents[0], K = t.extents[1];
    const Index bn = format == Format::kFp8Block ? kBlock : (format == Format::kFp8TensorStatic ? N : 1);
    const Index bk = format == Format::kFp8Block ? kBlock : K;
    const Index nb = (N + bn - 1) / bn, kb = (K + bk - 1) / bk;
    const bool int8 = format == Format::kInt8Channel;
    const float qmax = int8 ? 127.0f : 448.0f;
    std::vector<std::uint8_t>& q = codes.emplace_back(static_cast<std::size_t>(N * K));
    std::vector<float>& scale = floats.emplace_back(static_cast<std::size_t>(nb * kb));
    std::vector<float>& deq = floats.emplace_back(static_cast<std::size_t>(N * K));
    ++linear;
    for (Index bi = 0; bi < nb; ++bi) {
      for (Index bj = 0; bj < kb; ++bj) {
        const float factor = std::ldexp(1.0f, static_cast<int>((bi + 2 * bj + linear) % 4));
        float amax = 0;
        for (Index r = bi * bn; r < std::min(N, (bi + 1) * bn); ++r)
          for (Index c = bj * bk; c < std::min(K, (bj + 1) * bk); ++c) amax = std::max(amax, std::fabs(v[r * K + c] * factor));
        const float s = amax > 0 ? amax / qmax : 1.0f;
        scale[bi * kb + bj] = s;
        for (Index r = bi * bn; r < std::min(N, (bi + 1) * bn); ++r)
          for (Index c = bj * bk; c < std::min(K, (bj + 1) * bk); ++c) {
            const float x = v[r * K + c] * factor / s;
            if (int8) {
              const float code = std::clamp(std::round(x), -128.0f, 127.0f);
              q[r * K + c] = static_cast<std::uint8_t>(static_cast<std::int8_t>(code));
              deq[r * K + c] = code * s;
            } else {
              q[r * K + c] = float8_e4m3::from_float(x);
              deq[r * K + c] = float8_e4m3::to_float(q[r * K + c]) * s;
            }
          }
      }
    }
    fp8_tensors.push_back({n, int8 ? DType::kI8 : DType::kF8E4M3, shape, q.data()});
    std::string scale_name = n + (format == Format::kFp8Block ? "_scale_inv" : "_scale");
    std::vector<std::int64_t> scale_shape{nb, kb};
    if (format == Format::kFp8TensorStatic) {
      scale_shape = {1};
      fp8_tensors.push_back({n.substr(0, n.size() - 6) + "input_scale", DType::kF32, {1}, &kStaticInputScale});
    }
    if (edit_scale) edit_scale(scale_name, scale_shape);
    if (scale_shape[0] * scale_shape[1] > nb * kb) scale.resize(static_cast<std::size_t>(scale_shape[0] * scale_shape[1]), 1.0f);
    fp8_tensors.push_back({scale_name, DType::kF32, scale_shape, scale.data()});
    float_tensors.push_back({n, DType::kF32, shape, deq.data()});
  }
  m.fp8_weights = m.dir + "/fp8.safetensors";
  m.float_weights = m.dir + "/float.safetensors";
  EXPECT_TRUE(io::write_safetensors(m.fp8_weights, fp8_tensors).is_ok());
  EXPECT_TRUE(io::write_safetensors(m.float_weights, float_tensors).is_ok());
  io::Json j;
  EXPECT_TRUE(io::parse_json(testing::hf::read_text(m.dir + "/config.json"), &j).is_ok());
  m.float_config_json = j;
  m.float_config = m.dir + "/float_config.json";
  testing::hf::write_text(m.float_config, j.dump());
  io::Json q;
  EXPECT_TRUE(io::parse_json(quantization_config_of(format), &q).is_ok());
  j.set("quantization_config", q);
  m.fp8_config = m.dir + "/fp8_config.json";
  testing::hf::write_text(m.fp8_config, j.dump());
  return m;
}

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

std::vector<float> hidden_states(Index M, Index H) {
  std::vector<float> x(static_cast<std::size_t>(M * H));
  for (Index i = 0; i < M * H; ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) + 0.25f * std::cos(1.3f * static_cast<float>(i % 17));
  return x;
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
  std::vector<float> x = hidden_states(M, H);
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
  std::vector<float> x = hidden_states(M, H);
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
