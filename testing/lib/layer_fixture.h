// Shared by the layer tests that compare backends: a synthetic Hugging Face checkpoint of one MoE
// block per architecture (moe/io/synthetic_checkpoint.h), loaded back as a config and a checkpoint;
// layer outputs as floats; the per-dtype tolerance of the differential test.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "moe/io/synthetic_checkpoint.h"
#include "moe/layer/model_config.h"
#include "moe/layer/moe_layer.h"
#include "testing/layer/quantized_checkpoint.h"
#include "testing/layer/weight_only_model.h"
#include "testing/lib/compare.h"

namespace moe::testing {

struct SyntheticLayer {
  io::HfLayerSpec spec;
  layer::ModelConfig config;
  io::Checkpoint ckpt;
  std::string prefix;
};

// Writes the checkpoint under $TEST_TMPDIR/<tag>_<arch>[_mxfp4] and opens it (fatal failures on
// error: call through ASSERT_NO_FATAL_FAILURE).
inline void load_synthetic_layer(const std::string& tag, const std::string& arch, bool mxfp4, SyntheticLayer* l) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::filesystem::path dir =
      std::filesystem::path(tmp ? tmp : "/tmp") / (tag + "_" + arch + (mxfp4 ? "_mxfp4" : ""));
  std::filesystem::create_directories(dir);
  l->spec.architecture = arch;
  l->spec.mxfp4 = mxfp4;
  l->spec.top_k = arch == "Llama4ForCausalLM" ? 1 : 2;
  io::HfCheckpointWriter writer(l->spec);
  ASSERT_TRUE(writer.write(dir.string()).is_ok());
  l->prefix = writer.prefix();
  ASSERT_TRUE(layer::load_model_config((dir / "config.json").string(), &l->config).is_ok());
  ASSERT_TRUE(io::Checkpoint::open({(dir / "model.safetensors").string()}, &l->ckpt).is_ok());
}

inline std::vector<float> floats(const layer::Buffer& b) {
  std::vector<float> v(b.bytes.size() / (b.dtype == DType::kF32 ? 4 : 2));
  for (std::size_t i = 0; i < v.size(); ++i) {
    v[i] = b.dtype == DType::kF32    ? reinterpret_cast<const float*>(b.bytes.data())[i]
           : b.dtype == DType::kBF16 ? to_float(reinterpret_cast<const bfloat16*>(b.bytes.data())[i])
                                     : to_float(reinterpret_cast<const half*>(b.bytes.data())[i]);
  }
  return v;
}

// A DeepSeek-V3 block (H = 256, I = 192: ragged against the 128-wide scale blocks; 8 experts,
// top-2, one shared expert), routed and shared experts stored in quantized format `f`, loaded as a
// layer computing in `dtype` (fatal failures on error: call through ASSERT_NO_FATAL_FAILURE).
struct QuantizedLayer {
  // DeepSeek-V3's shape, small: H and I multiples of 32 (the CUDA weight-only GEMM), I = 128 + 64.
  static io::HfLayerSpec deepseek_spec() {
    io::HfLayerSpec s;
    s.architecture = "DeepseekV3ForCausalLM";
    s.hidden = 256;
    s.intermediate = 192;
    s.num_experts = 8;
    s.top_k = 2;
    s.n_shared_experts = 1;
    s.dtype = DType::kF32;
    return s;
  }
  io::HfLayerSpec spec;
  layer::ModelConfig config;
  io::Checkpoint ckpt;
  std::string prefix;
};
inline void load_quantized_layer(const std::string& tag, quantized::Format f, QuantizedLayer* q) {
  q->spec = QuantizedLayer::deepseek_spec();
  const auto m = quantized::write_fp8_model(tag + "_" + std::to_string(static_cast<int>(f)), q->spec, nullptr, f);
  q->prefix = m.prefix;
  ASSERT_TRUE(layer::load_model_config(m.fp8_config, &q->config).is_ok());
  ASSERT_TRUE(io::Checkpoint::open({m.fp8_weights}, &q->ckpt).is_ok());
}

// A weight-only checkpoint (GPTQ, AWQ, compressed-tensors; testing/layer/weight_only_model.h) of
// the same shape.
inline void load_weight_only_layer(const std::string& tag, const weight_only::IntFormat& f, QuantizedLayer* q) {
  q->spec = QuantizedLayer::deepseek_spec();
  const char* kind = f.kind == weight_only::Kind::kGptq ? "gptq" : f.kind == weight_only::Kind::kAwq ? "awq" : "ct";
  const std::string name = tag + "_" + kind + std::to_string(f.bits) + "_g" + std::to_string(f.group) +
                           (f.act_order ? "_act_order" : "") + (f.zero_points ? "_zp" : "");
  const auto m = weight_only::write_model(name, q->spec, f);
  q->prefix = m.prefix;
  ASSERT_TRUE(layer::load_model_config(m.config, &q->config).is_ok());
  ASSERT_TRUE(io::Checkpoint::open({m.weights}, &q->ckpt).is_ok());
}

// The weight-only formats the GPU tests run: every reader, 4 and 8 bits, groups and per channel,
// zero points and act-order.
inline std::vector<weight_only::IntFormat> weight_only_formats() {
  using weight_only::Kind;
  return {{Kind::kGptq, 4, 128, false, true}, {Kind::kAwq, 4, 64, true, false},
          {Kind::kCompressedTensors, 4, 32, true, false}, {Kind::kCompressedTensors, 8, 0, false, false}};
}

// sqrt(sum (got - want)^2 / sum want^2); infinity where `got` has a non-finite value.
inline double relative_rms(const std::vector<float>& got, const std::vector<float>& want) {
  double err = 0, mag = 0;
  for (std::size_t i = 0; i < want.size() && i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    err += (got[i] - want[i]) * (got[i] - want[i]);
    mag += static_cast<double>(want[i]) * want[i];
  }
  return mag > 0 ? std::sqrt(err / mag) : (err > 0 ? INFINITY : 0.0);
}

// Same rounding points on both backends, GEMM summation order differs (testing/cuda/differential_test.cu).
inline Tolerance layer_tolerance(DType dtype) { return dtype == DType::kF32 ? Tolerance{1e-4, 5e-3} : Tolerance{1e-3, 2e-2}; }

}  // namespace moe::testing
