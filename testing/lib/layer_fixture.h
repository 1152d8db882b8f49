// Shared by the layer tests that compare backends: a synthetic Hugging Face checkpoint of one MoE
// block per architecture (moe/io/synthetic_checkpoint.h), loaded back as a config and a checkpoint;
// layer outputs as floats; the per-dtype tolerance of the differential test.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "moe/io/synthetic_checkpoint.h"
#include "moe/layer/moe_layer.h"
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

// Same rounding points on both backends, GEMM summation order differs (testing/cuda/differential_test.cu).
inline Tolerance layer_tolerance(DType dtype) { return dtype == DType::kF32 ? Tolerance{1e-4, 5e-3} : Tolerance{1e-3, 2e-2}; }

}  // namespace moe::testing
