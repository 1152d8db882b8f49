// config.quantization_config: every recognised scheme is read into its layouts, anything else is
// refused naming the key and the value, and a checkpoint whose scheme this build cannot run is
// refused at load (its tensors never run as if they were unscaled floats).
#include <gtest/gtest.h>

#include <initializer_list>
#include <string>

#include "moe/io/json.h"
#include "moe/io/synthetic_checkpoint.h"
#include "moe/layer/model_config.h"
#include "moe/layer/moe_layer.h"
#include "moe/layer/quantization_config.h"
#include "testing/layer/hf_reference.h"

namespace moe::layer {
namespace {

io::Json parse(const std::string& text) {
  io::Json j;
  const Status s = io::parse_json(text, &j);
  EXPECT_TRUE(s.is_ok()) << s.to_string() << " in " << text;
  return j;
}

// The config {"quantization_config": <q>} read; `s` gets the status.
QuantizationConfig read(const std::string& q, Status* s) {
  QuantizationConfig out;
  out.quant_method = "untouched";
  *s = parse_quantization_config(parse("{\"quantization_config\": " + q + "}"), "config", &out);
  return out;
}

::testing::AssertionResult refused(const std::string& q, StatusCode code, std::initializer_list<std::string> parts) {
  Status s;
  const QuantizationConfig c = read(q, &s);
  if (s.is_ok()) return ::testing::AssertionFailure() << "accepted: " << q;
  if (s.code() != code) return ::testing::AssertionFailure() << "wrong code: " << s.to_string();
  for (const std::string& p : parts) {
    if (s.message().find(p) == std::string::npos) return ::testing::AssertionFailure() << "lacks \"" << p << "\": " << s.to_string();
  }
  if (c.quant_method != "untouched") return ::testing::AssertionFailure() << "output written on error";
  return ::testing::AssertionSuccess();
}

TEST(QuantizationConfig, AbsentOrNullIsUnquantized) {
  for (const char* text : {"{}", "{\"quantization_config\": null}"}) {
    QuantizationConfig c;
    c.method = QuantMethod::kFp8;
    ASSERT_TRUE(parse_quantization_config(parse(text), "config", &c).is_ok());
    EXPECT_EQ(c.method, QuantMethod::kNone);
    EXPECT_TRUE(c.runnable());
  }
}

TEST(QuantizationConfig, DeepSeekBlockFp8) {
  Status s;
  const QuantizationConfig c =
      read(R"({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]})", &s);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(c.method, QuantMethod::kFp8);
  EXPECT_EQ(c.weight_scale, WeightScaleLayout::kBlock);
  EXPECT_EQ(c.block_n, 128);
  EXPECT_EQ(c.block_k, 128);
  EXPECT_EQ(c.activation_scale, ActivationScaleLayout::kPerTokenGroup);
  EXPECT_TRUE(c.dynamic_activations);
  EXPECT_TRUE(c.runnable());
  EXPECT_NE(c.describe().find("block 128x128"), std::string::npos) << c.describe();
  Status s64;
  EXPECT_FALSE(read(R"({"quant_method": "fp8", "weight_block_size": [64, 128]})", &s64).runnable());
}

TEST(QuantizationConfig, PerTensorFp8StaticActivations) {
  Status s;
  const QuantizationConfig c = read(R"({"quant_method": "fp8", "activation_scheme": "static"})", &s);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(c.weight_scale, WeightScaleLayout::kPerTensor);
  EXPECT_EQ(c.activation_scale, ActivationScaleLayout::kPerTensor);
  EXPECT_FALSE(c.dynamic_activations);
  EXPECT_TRUE(c.runnable());
  // Dynamic per-tensor activations (one amax over all tokens) are not built.
  EXPECT_FALSE(read(R"({"quant_method": "fp8", "activation_scheme": "dynamic"})", &s).runnable());
}

TEST(QuantizationConfig, CompressedTensorsSchemes) {
  const auto ct = [](const std::string& weights, const std::string& acts) {
    const std::string format = acts == "null" ? "pack-quantized" : "float-quantized";
    return R"({"quant_method": "compressed-tensors", "format": ")" + format +
           R"(", "config_groups": {"group_0": {"targets": ["Linear"], "weights": )" + weights +
           R"(, "input_activations": )" + acts + "}}}";
  };
  struct Case {
    std::string q;
    QuantMethod method;
    WeightScaleLayout w;
    ActivationScaleLayout a;
    bool dynamic;
    bool runnable;  // a scheme the backends have (QuantizationConfig::runnable)
  };
  const Case cases[] = {
      {ct(R"({"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": false})",
          R"({"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true})"),
       QuantMethod::kFp8, WeightScaleLayout::kPerChannel, ActivationScaleLayout::kPerToken, true, true},
      {ct(R"({"num_bits": 8, "type": "float", "strategy": "tensor"})",
          R"({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": false})"),
       QuantMethod::kFp8, WeightScaleLayout::kPerTensor, ActivationScaleLayout::kPerTensor, false, true},
      {ct(R"({"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]})",
          R"({"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128, "dynamic": true})"),
       QuantMethod::kFp8, WeightScaleLayout::kBlock, ActivationScaleLayout::kPerTokenGroup, true, true},
      {ct(R"({"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": true})",
          R"({"num_bits": 8, "type": "int", "strategy": "token", "dynamic": true})"),
       QuantMethod::kInt8, WeightScaleLayout::kPerChannel, ActivationScaleLayout::kPerToken, true, true},
      {ct(R"({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128})", "null"),
       QuantMethod::kWeightOnly, WeightScaleLayout::kGroup, ActivationScaleLayout::kNone, false, true},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.q);
    Status s;
    const QuantizationConfig c = read(k.q, &s);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    EXPECT_EQ(c.method, k.method);
    EXPECT_EQ(c.weight_scale, k.w);
    EXPECT_EQ(c.activation_scale, k.a);
    EXPECT_EQ(c.dynamic_activations, k.dynamic);
    EXPECT_EQ(c.runnable(), k.runnable);
    EXPECT_NE(c.describe().find("compressed-tensors"), std::string::npos) << c.describe();
  }
  // INT8 with static per-tensor activations: vLLM refuses it, and so do we.
  EXPECT_TRUE(refused(ct(R"({"num_bits": 8, "type": "int", "strategy": "channel"})",
                         R"({"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": false})"),
                      StatusCode::kUnsupported, {"config.quantization_config.config_groups.group_0.input_activations", "INT8"}));
  EXPECT_TRUE(refused(ct(R"({"num_bits": 4, "type": "float", "strategy": "tensor"})",
                         R"({"num_bits": 4, "type": "float", "strategy": "tensor"})"),
                      StatusCode::kUnsupported, {"config_groups.group_0", "float4"}));
  EXPECT_TRUE(refused(ct(R"({"num_bits": 8, "type": "float", "strategy": "channel"})", R"({"num_bits": 8, "type": "float", "strategy": "token", "dynamic": false})"),
                      StatusCode::kUnsupported, {"input_activations", "token", "static"}));
}

// GPTQ and AWQ (weight-only): bits, groups, zero points, act-order and GPTQ's zero-point
// convention read from their configs.
TEST(QuantizationConfig, GptqAndAwq) {
  Status s;
  QuantizationConfig c = read(R"({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true, "sym": true})", &s);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(c.method, QuantMethod::kWeightOnly);
  EXPECT_EQ(c.weight_bits, 4);
  EXPECT_EQ(c.weight_scale, WeightScaleLayout::kGroup);
  EXPECT_EQ(c.group_size, 128);
  EXPECT_TRUE(c.act_order);
  EXPECT_FALSE(c.zero_points);
  EXPECT_TRUE(c.gptq_zeros_minus_one);
  EXPECT_TRUE(c.runnable());
  EXPECT_NE(c.describe().find("int4 weight-only W4A16, act-order [gptq], weight scales group of 128"), std::string::npos)
      << c.describe();
  c = read(R"({"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": false, "checkpoint_format": "gptq_v2"})", &s);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(c.weight_scale, WeightScaleLayout::kPerChannel);
  EXPECT_TRUE(c.zero_points);
  EXPECT_FALSE(c.gptq_zeros_minus_one);
  EXPECT_TRUE(c.runnable());
  c = read(R"({"quant_method": "gptq", "bits": 4, "group_size": 48})", &s);  // parses, but no kernel takes 48
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_FALSE(c.runnable());
  c = read(R"({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": true, "version": "GEMM"})", &s);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(c.method, QuantMethod::kWeightOnly);
  EXPECT_EQ(c.group_size, 64);
  EXPECT_TRUE(c.zero_points);
  EXPECT_FALSE(c.act_order);
  EXPECT_TRUE(c.runnable());
  EXPECT_TRUE(refused(R"({"quant_method": "gptq", "bits": 4, "group_size": 0})", StatusCode::kInvalidArgument,
                      {"config.quantization_config.group_size", "-1"}));
  EXPECT_TRUE(refused(R"({"quant_method": "gptq", "group_size": 128})", StatusCode::kInvalidArgument, {"bits", "required"}));
}

TEST(QuantizationConfig, UnknownMethodsAndVariantsAreRefusedByName) {
  EXPECT_TRUE(refused(R"({"quant_method": "gptq", "bits": 3})", StatusCode::kUnsupported, {"config.quantization_config.bits", "3"}));
  EXPECT_TRUE(refused(R"({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"})", StatusCode::kUnsupported,
                      {"checkpoint_format", "marlin"}));
  EXPECT_TRUE(refused(R"({"quant_method": "awq", "bits": 4, "version": "gemv"})", StatusCode::kUnsupported, {"version", "gemv"}));
  EXPECT_TRUE(refused(R"({"quant_method": "awq", "bits": 8})", StatusCode::kUnsupported, {"bits", "8"}));
  EXPECT_TRUE(refused(R"({"quant_method": "hqq"})", StatusCode::kUnsupported, {"config.quantization_config.quant_method", "hqq"}));
  EXPECT_TRUE(refused(R"({"quant_method": "bitsandbytes"})", StatusCode::kUnsupported, {"bitsandbytes"}));
  EXPECT_TRUE(refused(R"({"quant_method": "fp8", "fmt": "e5m2"})", StatusCode::kUnsupported, {"config.quantization_config.fmt", "e5m2"}));
  EXPECT_TRUE(refused(R"({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]})",
                      StatusCode::kUnsupported, {"activation_scheme", "static"}));
  EXPECT_TRUE(refused(R"({"quant_method": "compressed-tensors", "config_groups": {"a": {"weights": {"num_bits": 8}}, "b": {"weights": {"num_bits": 4}}}})",
                      StatusCode::kUnsupported, {"config_groups", "2 groups"}));
}

TEST(QuantizationConfig, MalformedValuesNameTheKeyPath) {
  EXPECT_TRUE(refused("[1, 2]", StatusCode::kInvalidArgument, {"config.quantization_config", "object"}));
  EXPECT_TRUE(refused(R"({"bits": 8})", StatusCode::kInvalidArgument, {"config.quantization_config", "quant_method"}));
  EXPECT_TRUE(refused(R"({"quant_method": 8})", StatusCode::kInvalidArgument, {"quant_method"}));
  for (const char* block : {"[128]", "[128, 0]", "[128, 1.5]", "[128, 1000000000]", "\"128x128\"", "[128, 128, 1]"}) {
    EXPECT_TRUE(refused(std::string(R"({"quant_method": "fp8", "weight_block_size": )") + block + "}",
                        StatusCode::kInvalidArgument, {"config.quantization_config.weight_block_size"}))
        << block;
  }
  EXPECT_TRUE(refused(R"({"quant_method": "fp8", "activation_scheme": "sometimes"})", StatusCode::kInvalidArgument,
                      {"activation_scheme", "sometimes"}));
  EXPECT_TRUE(refused(R"({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": -1}}}})",
                      StatusCode::kInvalidArgument, {"config.quantization_config.config_groups.g.weights.group_size"}));
}

// A model config with a quantization_config whose scheme does not run here: the config parses (so
// the scheme can be named), the layer refuses to load. MXFP4 is accepted for gpt-oss only.
TEST(QuantizationConfig, UnrunnableSchemeIsRefusedAtLoad) {
  const std::string dir = testing::hf::make_test_dir("quantization_config_load");
  io::HfLayerSpec spec;
  spec.architecture = "DeepseekV3ForCausalLM";
  io::HfCheckpointWriter w(spec);
  ASSERT_TRUE(w.write(dir).is_ok());
  io::Json j = parse(testing::hf::read_text(dir + "/config.json"));
  j.set("quantization_config", parse(R"({"quant_method": "fp8", "activation_scheme": "dynamic"})"));  // per-tensor dynamic
  testing::hf::write_text(dir + "/config.json", j.dump());
  ModelConfig c;
  ASSERT_TRUE(load_model_config(dir + "/config.json", &c).is_ok());
  EXPECT_EQ(c.quantization.method, QuantMethod::kFp8);
  io::Checkpoint ckpt;
  ASSERT_TRUE(io::Checkpoint::open({dir + "/model.safetensors"}, &ckpt).is_ok());
  MoeLayer l;
  const Status s = MoeLayer::load(c, {}, DType::kF32, ckpt, w.prefix(), &l);
  ASSERT_FALSE(s.is_ok());
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("quantization_config"), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("per-tensor"), std::string::npos) << s.to_string();

  j.set("quantization_config", parse(R"({"quant_method": "mxfp4"})"));
  testing::hf::write_text(dir + "/config.json", j.dump());
  const Status m = load_model_config(dir + "/config.json", &c);
  EXPECT_EQ(m.code(), StatusCode::kUnsupported) << m.to_string();
  EXPECT_NE(m.message().find("GptOssForCausalLM"), std::string::npos) << m.to_string();
}

}  // namespace
}  // namespace moe::layer
