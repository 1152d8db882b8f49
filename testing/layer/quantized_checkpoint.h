// Quantized checkpoints made from the synthetic float ones (moe/io/synthetic_checkpoint.h), for the
// layer's and the tool's tests: every routed and shared expert Linear quantized with its own scales
// in one of the stored formats the loader reads (moe/layer/moe_layer.cc), the blocks' or rows'
// magnitudes made to differ by up to 8x so a scale taken from the wrong place is far off, and a
// float twin holding code * scale (what the reference computes with).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/io/json.h"
#include "moe/io/safetensors.h"
#include "moe/io/synthetic_checkpoint.h"
#include "moe/quant/numeric.h"
#include "testing/layer/hf_reference.h"

namespace moe::testing::quantized {

constexpr Index kBlock = 128;

inline bool is_expert_linear(const std::string& name) {
  // A routed or shared expert's Linear weight (gate_proj/up_proj/down_proj or Mixtral's w1/w3/w2).
  const bool expert = name.find(".experts.") != std::string::npos || name.find(".shared_expert.") != std::string::npos ||
                      name.find(".shared_experts.") != std::string::npos;
  return expert && name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0;
}

// A synthetic checkpoint's tensor (f32 or bf16) as floats.
inline std::vector<float> tensor_as_floats(const AnyTensor& t) {
  Index count = 1;
  for (Index e : t.extents) count *= e;
  std::vector<float> v(static_cast<std::size_t>(count));
  for (Index i = 0; i < count; ++i) {
    v[i] = t.dtype == DType::kF32 ? static_cast<const float*>(t.data)[i]
                                  : bfloat16::to_float(static_cast<const std::uint16_t*>(t.data)[i]);
  }
  return v;
}

// The files of a quantized checkpoint beside the synthetic one in `dir`: `<tag>.safetensors` and
// float.safetensors (the twin), `<tag>_config.json` (config.json with `quantization_config`) and
// float_config.json (without).
struct Written {
  std::string weights, float_weights, config, float_config;
  io::Json float_config_json;
};
inline Written write_checkpoint_pair(const std::string& dir, const std::string& tag, const std::vector<io::NamedTensor>& quantized,
                                     const std::vector<io::NamedTensor>& twin, const std::string& quantization_config) {
  Written w;
  w.weights = dir + "/" + tag + ".safetensors";
  w.float_weights = dir + "/float.safetensors";
  EXPECT_TRUE(io::write_safetensors(w.weights, quantized).is_ok());
  EXPECT_TRUE(io::write_safetensors(w.float_weights, twin).is_ok());
  io::Json j;
  EXPECT_TRUE(io::parse_json(testing::hf::read_text(dir + "/config.json"), &j).is_ok());
  w.float_config_json = j;
  w.float_config = dir + "/float_config.json";
  testing::hf::write_text(w.float_config, j.dump());
  io::Json q;
  EXPECT_TRUE(io::parse_json(quantization_config, &q).is_ok());
  j.set("quantization_config", q);
  w.config = dir + "/" + tag + "_config.json";
  testing::hf::write_text(w.config, j.dump());
  return w;
}

// Deterministic hidden states of a few magnitudes, for the quantized layers' tests.
inline std::vector<float> wavy_hidden_states(Index M, Index H) {
  std::vector<float> x(static_cast<std::size_t>(M * H));
  for (Index i = 0; i < M * H; ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) + 0.25f * std::cos(1.3f * static_cast<float>(i % 17));
  return x;
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

inline const char* quantization_config_of(Format f) {
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
inline Fp8Model write_fp8_model(const std::string& name, const io::HfLayerSpec& spec,
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
    std::vector<float>& v = floats.emplace_back(tensor_as_floats(t));
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
  const Written written = write_checkpoint_pair(m.dir, "fp8", fp8_tensors, float_tensors, quantization_config_of(format));
  m.fp8_weights = written.weights;
  m.float_weights = written.float_weights;
  m.fp8_config = written.config;
  m.float_config = written.float_config;
  m.float_config_json = written.float_config_json;
  return m;
}

}  // namespace moe::testing::quantized
