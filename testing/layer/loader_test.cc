// Every bad input of the layer's loading path (config.json -> ModelConfig, safetensors ->
// Checkpoint, MoeLayer::load) and of MoeLayer::forward: each is an error, not a crash or a
// silently wrong layer, and its one-line message names what is wrong: the file, the tensor (with
// the expected and actual shape or dtype), or the config key path.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <functional>
#include <filesystem>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "moe/io/file.h"
#include "moe/io/json.h"
#include "moe/io/safetensors.h"
#include "moe/layer/model_config.h"
#include "moe/layer/moe_layer.h"
#include "testing/layer/hf_reference.h"
#include "moe/io/synthetic_checkpoint.h"
#include "testing/lib/random.h"

namespace moe {
namespace {

using layer::MoeLayer;
using layer::ParallelLayout;
using io::HfCheckpointWriter;
using io::HfLayerSpec;
using testing::hf::EditableTensor;

// The status is an error whose message is one line and contains every part.
::testing::AssertionResult is_error(const Status& s, std::initializer_list<std::string> parts) {
  if (s.is_ok()) return ::testing::AssertionFailure() << "expected an error, got ok";
  for (const std::string& p : parts) {
    if (s.message().find(p) == std::string::npos) {
      return ::testing::AssertionFailure() << "message lacks \"" << p << "\": " << s.to_string();
    }
  }
  if (s.message().find('\n') != std::string::npos) {
    return ::testing::AssertionFailure() << "message is not one line: " << s.to_string();
  }
  return ::testing::AssertionSuccess() << s.to_string();
}

HfLayerSpec spec_of(std::string arch) {
  HfLayerSpec s;
  s.architecture = std::move(arch);
  if (s.architecture == "Llama4ForCausalLM") s.top_k = 1;
  return s;
}

// A checkpoint directory written by HfCheckpointWriter.
struct Files {
  std::string dir, config, weights, prefix;
  HfLayerSpec spec;
};

Files write_model(const std::string& name, const HfLayerSpec& spec) {
  Files f;
  f.dir = testing::hf::make_test_dir("loader_" + name);
  HfCheckpointWriter w(spec);
  const Status s = w.write(f.dir);
  EXPECT_TRUE(s.is_ok()) << s.to_string();
  f.config = f.dir + "/config.json";
  f.weights = f.dir + "/model.safetensors";
  f.prefix = w.prefix();
  f.spec = spec;
  return f;
}

// Loads config + weights + layer as the tool does; the first error.
Status load_all(const std::string& config_path, const std::string& weights, const std::string& prefix,
                const ParallelLayout& par = {}, DType dtype = DType::kF32, MoeLayer* out = nullptr) {
  layer::ModelConfig c;
  MOE_RETURN_IF_ERROR(layer::load_model_config(config_path, &c));
  io::Checkpoint ckpt;
  MOE_RETURN_IF_ERROR(io::Checkpoint::open({weights}, &ckpt));
  MoeLayer l;
  MOE_RETURN_IF_ERROR(MoeLayer::load(c, par, dtype, ckpt, prefix, &l));
  if (out) *out = std::move(l);
  return Status::ok();
}

// The model's weights rewritten through `edit` into <dir>/edited.safetensors.
std::string edited(const Files& f, const std::function<void(EditableTensor&)>& edit) {
  const std::string path = f.dir + "/edited.safetensors";
  const Status s = testing::hf::rewrite_safetensors(f.weights, path, edit);
  EXPECT_TRUE(s.is_ok()) << s.to_string();
  return path;
}

io::Json config_of(const Files& f) {
  io::Json j;
  EXPECT_TRUE(io::parse_json(testing::hf::read_text(f.config), &j).is_ok());
  return j;
}

std::string write_config(const Files& f, const io::Json& j, const std::string& name = "edited_config.json") {
  const std::string path = f.dir + "/" + name;
  testing::hf::write_text(path, j.dump());
  return path;
}

// A copy of `j` without `key` (top level).
io::Json without(const io::Json& j, const std::string& key) {
  io::Json out = io::Json::object();
  for (const auto& [k, v] : j.members()) {
    if (k != key) out.set(k, v);
  }
  return out;
}

// ---- the checkpoint's tensors -------------------------------------------------------------------

struct TensorCase {
  std::string arch;
  std::string tensor;  // relative to the layer prefix
  bool mxfp4 = false;
};

std::vector<TensorCase> tensor_cases() {
  return {
      {"MixtralForCausalLM", "block_sparse_moe.gate.weight"},
      {"MixtralForCausalLM", "block_sparse_moe.experts.5.w3.weight"},
      {"MixtralForCausalLM", "block_sparse_moe.experts.0.w2.weight"},
      {"Qwen2MoeForCausalLM", "mlp.experts.7.gate_proj.weight"},
      {"Qwen2MoeForCausalLM", "mlp.shared_expert.down_proj.weight"},
      {"Qwen2MoeForCausalLM", "mlp.shared_expert_gate.weight"},
      {"Qwen3MoeForCausalLM", "mlp.experts.2.up_proj.weight"},
      {"DeepseekV2ForCausalLM", "mlp.shared_experts.up_proj.weight"},
      {"DeepseekV3ForCausalLM", "mlp.gate.e_score_correction_bias"},
      {"DeepseekV3ForCausalLM", "mlp.experts.4.down_proj.weight"},
      {"GptOssForCausalLM", "mlp.router.bias"},
      {"GptOssForCausalLM", "mlp.experts.gate_up_proj"},
      {"GptOssForCausalLM", "mlp.experts.down_proj"},
      {"GptOssForCausalLM", "mlp.experts.gate_up_proj_bias"},
      {"GptOssForCausalLM", "mlp.experts.down_proj_bias"},
      {"GptOssForCausalLM", "mlp.experts.down_proj_blocks", true},
      {"GptOssForCausalLM", "mlp.experts.down_proj_scales", true},
      {"GptOssForCausalLM", "mlp.experts.gate_up_proj_scales", true},
      {"Llama4ForCausalLM", "feed_forward.experts.gate_up_proj"},
      {"Llama4ForCausalLM", "feed_forward.experts.down_proj"},
      {"Llama4ForCausalLM", "feed_forward.shared_expert.gate_proj.weight"},
  };
}

class TensorTest : public ::testing::TestWithParam<TensorCase> {
 protected:
  void SetUp() override {
    HfLayerSpec spec = spec_of(GetParam().arch);
    spec.mxfp4 = GetParam().mxfp4;
    std::string name = GetParam().arch + "_" + GetParam().tensor;
    for (char& c : name) if (c == '.') c = '_';
    files_ = write_model(name, spec);
    name_ = files_.prefix + "." + GetParam().tensor;
    // The untouched checkpoint loads.
    const Status s = load_all(files_.config, files_.weights, files_.prefix);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
  }
  Files files_;
  std::string name_;
};

TEST_P(TensorTest, MissingTensorIsNamedWithTheFile) {
  bool found = false;
  const std::string path = edited(files_, [&](EditableTensor& t) {
    if (t.name == name_) t.drop = found = true;
  });
  ASSERT_TRUE(found) << name_;
  EXPECT_TRUE(is_error(load_all(files_.config, path, files_.prefix), {name_, path}));
}

// The same bytes under a transposed (or otherwise wrong) shape.
TEST_P(TensorTest, MisShapedTensorIsNamedWithBothShapes) {
  std::vector<std::int64_t> original, wrong;
  const std::string path = edited(files_, [&](EditableTensor& t) {
    if (t.name != name_) return;
    original = t.shape;
    wrong = t.shape;
    if (wrong.size() == 1) wrong = {1, wrong[0]};
    else std::swap(wrong[wrong.size() - 1], wrong[wrong.size() - 2]);
    if (wrong == original) wrong.insert(wrong.begin(), 1);  // [1, 64] -> [1, 1, 64]
    t.shape = wrong;
  });
  ASSERT_FALSE(original.empty()) << name_;
  auto fmt = [](const std::vector<std::int64_t>& s) {
    return moe::detail::format_shape(std::vector<Index>(s.begin(), s.end()));
  };
  EXPECT_TRUE(is_error(load_all(files_.config, path, files_.prefix), {name_, fmt(original), fmt(wrong)}));
}

// Integer data where floats are expected (and, for the MXFP4 tensors, I32 where U8 is expected).
TEST_P(TensorTest, WrongDtypeIsNamed) {
  bool found = false;
  const std::string path = edited(files_, [&](EditableTensor& t) {
    if (t.name != name_) return;
    found = true;
    std::int64_t n = 1;
    for (auto e : t.shape) n *= e;
    t.dtype = DType::kI32;
    t.bytes.assign(static_cast<std::size_t>(4 * n), 0);
  });
  ASSERT_TRUE(found);
  EXPECT_TRUE(is_error(load_all(files_.config, path, files_.prefix), {name_, "i32"}));
}

INSTANTIATE_TEST_SUITE_P(Tensors, TensorTest, ::testing::ValuesIn(tensor_cases()),
                         [](const ::testing::TestParamInfo<TensorCase>& i) {
                           std::string n = i.param.arch.substr(0, i.param.arch.find("For")) + "_" + i.param.tensor;
                           for (char& c : n) if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

// MXFP4 blocks stored as BF16 (a float type, but not the u8 codes): refused, naming the tensor.
TEST(Mxfp4, FloatBlocksAreRefusedNamingTheTensor) {
  HfLayerSpec spec = spec_of("GptOssForCausalLM");
  spec.mxfp4 = true;
  const Files f = write_model("mxfp4_float_blocks", spec);
  const std::string name = f.prefix + ".mlp.experts.gate_up_proj_blocks";
  const std::string path = edited(f, [&](EditableTensor& t) {
    if (t.name != name) return;
    t.dtype = DType::kBF16;
    t.bytes.resize(t.bytes.size() * 2);
  });
  const Status s = load_all(f.config, path, f.prefix);
  EXPECT_FALSE(s.is_ok());
  EXPECT_TRUE(is_error(s, {"U8", "bf16"})) << "the dtype expected";
}

// Regression test for a fixed bug: the MXFP4 u8 check's message ("MXFP4 tensors: expected
// dtype U8, got bf16") does not say which of the four tensors is wrong.
TEST(Mxfp4, FloatBlocksErrorNamesTheTensor) {
  HfLayerSpec spec = spec_of("GptOssForCausalLM");
  spec.mxfp4 = true;
  const Files f = write_model("mxfp4_float_blocks_name", spec);
  const std::string name = f.prefix + ".mlp.experts.gate_up_proj_blocks";
  const std::string path = edited(f, [&](EditableTensor& t) {
    if (t.name != name) return;
    t.dtype = DType::kBF16;
    t.bytes.resize(t.bytes.size() * 2);
  });
  EXPECT_TRUE(is_error(load_all(f.config, path, f.prefix), {name, "bf16"}));
}

TEST(Mxfp4, HiddenNotMultipleOf32) {
  HfLayerSpec spec = spec_of("GptOssForCausalLM");
  spec.mxfp4 = true;
  spec.hidden = 48;  // the writer's blocks are then inconsistent too; the loader refuses first
  const Files f = write_model("mxfp4_h48", spec);
  EXPECT_TRUE(is_error(load_all(f.config, f.weights, f.prefix), {"MXFP4", "32"}));
}

// A prefix that names no layer of the checkpoint: the router it looked for is named.
TEST(Prefix, WrongLayerPrefix) {
  const Files f = write_model("wrong_prefix", spec_of("Qwen3MoeForCausalLM"));
  EXPECT_TRUE(is_error(load_all(f.config, f.weights, "model.layers.4"), {"model.layers.4", "gate.weight", f.weights}));
}

// Regression test for a fixed bug: when the router tensor itself is missing, MoeLayer::load
// falls back to "<prefix>" as the block prefix and reports "model.layers.3.gate.weight" missing,
// a name no Qwen checkpoint has; the tensor actually missing is "model.layers.3.mlp.gate.weight".
TEST(Prefix, MissingRouterNamesTheModuleQualifiedTensor) {
  const Files f = write_model("missing_router", spec_of("Qwen3MoeForCausalLM"));
  const std::string name = f.prefix + ".mlp.gate.weight";
  const std::string path = edited(f, [&](EditableTensor& t) { t.drop = t.name == name; });
  EXPECT_TRUE(is_error(load_all(f.config, path, f.prefix), {name}));
}

// ---- config.json --------------------------------------------------------------------------------

TEST(Config, UnknownArchitecture) {
  const Files f = write_model("unknown_arch", spec_of("Qwen3MoeForCausalLM"));
  io::Json j = config_of(f);
  io::Json archs = io::Json::array();
  archs.push_back("FooMoeForCausalLM");
  j.set("architectures", archs);
  const std::string path = write_config(f, j);
  layer::ModelConfig c;
  const Status s = layer::load_model_config(path, &c);
  EXPECT_TRUE(is_error(s, {path, "config.architectures", "FooMoeForCausalLM"}));
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
}

TEST(Config, ArchitecturesMissingOrNotAnArray) {
  const Files f = write_model("archs_missing", spec_of("Qwen3MoeForCausalLM"));
  layer::ModelConfig c;
  const std::string p1 = write_config(f, without(config_of(f), "architectures"), "a.json");
  EXPECT_TRUE(is_error(layer::load_model_config(p1, &c), {p1, "architectures"}));
  io::Json j = config_of(f);
  j.set("architectures", "Qwen3MoeForCausalLM");
  const std::string p2 = write_config(f, j, "b.json");
  EXPECT_TRUE(is_error(layer::load_model_config(p2, &c), {p2, "config.architectures"}));
}

struct KeyCase {
  std::string arch, key;
  std::string topk_method = "group_limited_greedy";
};

class MissingKeyTest : public ::testing::TestWithParam<KeyCase> {};

// Every required key of every architecture: the error names the file, "config" and the key.
TEST_P(MissingKeyTest, NamesTheKey) {
  HfLayerSpec spec = spec_of(GetParam().arch);
  spec.topk_method = GetParam().topk_method;
  const Files f = write_model("key_" + GetParam().arch + "_" + GetParam().key, spec);
  ASSERT_TRUE(load_all(f.config, f.weights, f.prefix).is_ok());
  const std::string path = write_config(f, without(config_of(f), GetParam().key));
  layer::ModelConfig c;
  const Status s = layer::load_model_config(path, &c);
  EXPECT_TRUE(is_error(s, {path, "config", "\"" + GetParam().key + "\""}));
}

INSTANTIATE_TEST_SUITE_P(
    Keys, MissingKeyTest,
    ::testing::Values(KeyCase{"MixtralForCausalLM", "hidden_size"}, KeyCase{"DeepseekV2ForCausalLM", "num_experts_per_tok"},
                      KeyCase{"MixtralForCausalLM", "intermediate_size"},
                      KeyCase{"Qwen3MoeForCausalLM", "moe_intermediate_size"},
                      KeyCase{"DeepseekV2ForCausalLM", "n_group"}, KeyCase{"DeepseekV2ForCausalLM", "topk_group"},
                      KeyCase{"DeepseekV3ForCausalLM", "moe_intermediate_size"},
                      KeyCase{"Llama4ForCausalLM", "intermediate_size"}),
    [](const ::testing::TestParamInfo<KeyCase>& i) {
      return i.param.arch.substr(0, i.param.arch.find("For")) + "_" + i.param.key;
    });

// Wrong types and values name the full key path "config.<key>".
TEST(Config, WrongTypesAndValuesNameTheKeyPath) {
  const Files f = write_model("key_values", spec_of("DeepseekV2ForCausalLM"));
  struct Edit {
    std::string key;
    io::Json value;
    std::string expect;
  };
  const std::vector<Edit> edits = {
      {"hidden_size", io::Json("64"), "config.hidden_size"},
      {"hidden_size", io::Json(0), "config.hidden_size"},
      {"hidden_size", io::Json(-64), "config.hidden_size"},
      {"hidden_size", io::Json(64.5), "config.hidden_size"},
      {"num_experts_per_tok", io::Json(9), "config.num_experts_per_tok"},  // > num_experts = 8
      {"num_experts_per_tok", io::Json(0), "config.num_experts_per_tok"},
      {"n_routed_experts", io::Json(true), "config.n_routed_experts"},
      {"routed_scaling_factor", io::Json("2.5"), "config.routed_scaling_factor"},
      {"topk_method", io::Json("noaux_tc_v9"), "config.topk_method"},
      {"topk_method", io::Json(3), "config.topk_method"},
      {"hidden_act", io::Json("gelu"), "config.hidden_act"},
      {"n_shared_experts", io::Json("one"), "config.n_shared_experts"},
      // Out of range: refused, never narrowed to int (4294967298 is 2 mod 2^32) or dropped.
      {"num_experts_per_tok", io::Json(std::int64_t{4294967298}), "config.num_experts_per_tok"},
      {"n_shared_experts", io::Json(-1), "config.n_shared_experts"},
      {"n_shared_experts", io::Json(std::int64_t{4294967297}), "config.n_shared_experts"},
      {"hidden_size", io::Json(std::int64_t{1} << 40), "config.hidden_size"},
      {"n_routed_experts", io::Json(std::int64_t{4294967304}), "config.n_routed_experts"},
      {"routed_scaling_factor", io::Json(1e308), "config.routed_scaling_factor"},
      {"routed_scaling_factor", io::Json(0.0), "config.routed_scaling_factor"},
      {"routed_scaling_factor", io::Json(-2.5), "config.routed_scaling_factor"},
      {"zero_expert_num", io::Json(-3), "config.zero_expert_num"},
  };
  for (const Edit& e : edits) {
    SCOPED_TRACE(e.key + " = " + e.value.dump());
    io::Json j = config_of(f);
    j.set(e.key, e.value);
    const std::string path = write_config(f, j);
    layer::ModelConfig c;
    EXPECT_TRUE(is_error(layer::load_model_config(path, &c), {path, e.expect}));
  }
}

// Llama4ForConditionalGeneration reads text_config; a key missing there is named under it.
TEST(Config, Llama4TextConfigMissingKey) {
  const Files f = write_model("llama4_text_config", spec_of("Llama4ForCausalLM"));
  io::Json outer = io::Json::object();
  io::Json archs = io::Json::array();
  archs.push_back("Llama4ForConditionalGeneration");
  outer.set("architectures", archs);
  outer.set("text_config", without(config_of(f), "intermediate_size"));
  const std::string path = write_config(f, outer);
  layer::ModelConfig c;
  EXPECT_TRUE(is_error(layer::load_model_config(path, &c), {path, "intermediate_size"}));
}

// Regression test for a fixed bug: the key path of a text_config member is reported as
// "config" ("config: missing required key \"intermediate_size\"", likewise
// "config.intermediate_size: expected ..."), not "config.text_config", contrary to
// model_config.h's "Errors name the key path".
TEST(Config, Llama4TextConfigKeyPathNamesTextConfig) {
  const Files f = write_model("llama4_text_config_path", spec_of("Llama4ForCausalLM"));
  io::Json outer = io::Json::object();
  io::Json archs = io::Json::array();
  archs.push_back("Llama4ForConditionalGeneration");
  outer.set("architectures", archs);
  io::Json text = config_of(f);
  text.set("intermediate_size", "32");
  outer.set("text_config", text);
  const std::string path = write_config(f, outer);
  layer::ModelConfig c;
  EXPECT_TRUE(is_error(layer::load_model_config(path, &c), {"config.text_config.intermediate_size"}));
  outer.set("text_config", without(config_of(f), "intermediate_size"));
  testing::hf::write_text(path, outer.dump());
  EXPECT_TRUE(is_error(layer::load_model_config(path, &c), {"config.text_config"}));
}

TEST(Config, BadJson) {
  const Files f = write_model("bad_json", spec_of("MixtralForCausalLM"));
  layer::ModelConfig c;
  for (const std::string& text : {std::string("{\"architectures\": [\"MixtralForCausalLM\"], \"hidden_size\": 64,"),
                                 std::string("{\"architectures\": [\"MixtralForCausalLM\"]] }"), std::string(""),
                                 std::string("\xff\xfe{}"), std::string("[1, 2, 3]")}) {
    SCOPED_TRACE(text);
    const std::string path = f.dir + "/bad.json";
    testing::hf::write_text(path, text);
    EXPECT_TRUE(is_error(layer::load_model_config(path, &c), {path}));
  }
  // A syntax error gives the position.
  testing::hf::write_text(f.dir + "/bad.json", "{\n  \"hidden_size\": 64,\n  \"x\": ]\n}");
  EXPECT_TRUE(is_error(layer::load_model_config(f.dir + "/bad.json", &c), {f.dir + "/bad.json", "line 3"}));
}

TEST(Config, MissingFile) {
  const std::string path = testing::hf::make_test_dir("missing_config") + "/nope.json";
  layer::ModelConfig c;
  EXPECT_TRUE(is_error(layer::load_model_config(path, &c), {path}));
}

// ---- the safetensors file -----------------------------------------------------------------------

TEST(Safetensors, TruncatedFile) {
  const Files f = write_model("truncated", spec_of("Qwen3MoeForCausalLM"));
  const auto size = std::filesystem::file_size(f.weights);
  for (std::uintmax_t keep : {size - 1, size / 2, std::uintmax_t{100}, std::uintmax_t{12}, std::uintmax_t{5},
                              std::uintmax_t{0}}) {
    SCOPED_TRACE("kept " + std::to_string(keep) + " of " + std::to_string(size) + " bytes");
    const std::string path = f.dir + "/truncated.safetensors";
    std::filesystem::copy_file(f.weights, path, std::filesystem::copy_options::overwrite_existing);
    std::filesystem::resize_file(path, keep);
    EXPECT_TRUE(is_error(load_all(f.config, path, f.prefix), {path}));
  }
  const std::string missing = f.dir + "/absent.safetensors";
  EXPECT_TRUE(is_error(load_all(f.config, missing, f.prefix), {missing}));
}

// ---- the parallel layout and dtype --------------------------------------------------------------

TEST(Layout, TensorParallelMustDivideIntermediate) {
  const Files f = write_model("tp_divide", spec_of("Qwen3MoeForCausalLM"));  // I = 32
  for (int tp : {3, 5, 64}) {
    ParallelLayout par;
    par.tp_size = tp;
    EXPECT_TRUE(is_error(load_all(f.config, f.weights, f.prefix, par), {"tp_size", "32", std::to_string(tp)}));
  }
}

TEST(Layout, TensorParallelMustDivideSharedIntermediate) {
  HfLayerSpec spec = spec_of("Qwen2MoeForCausalLM");
  spec.shared_intermediate = 36;  // I = 32: tp 8 divides I but not 36
  const Files f = write_model("tp_divide_shared", spec);
  ParallelLayout par;
  par.tp_size = 8;
  EXPECT_TRUE(is_error(load_all(f.config, f.weights, f.prefix, par), {"tp_size", "shared", "36"}));
  par.tp_size = 4;
  EXPECT_TRUE(load_all(f.config, f.weights, f.prefix, par).is_ok());
}

TEST(Layout, RanksOutOfRange) {
  const Files f = write_model("ranks", spec_of("MixtralForCausalLM"));
  struct Bad {
    ParallelLayout par;
    std::string expect;
  };
  std::vector<Bad> bad;
  for (auto [size, rank] : {std::pair{2, 2}, {3, 7}, {1, 1}, {2, -1}}) {
    ParallelLayout p;
    p.ep_size = size;
    p.ep_rank = rank;
    bad.push_back({p, "ep_rank"});
    ParallelLayout q;
    q.tp_size = size;
    q.tp_rank = rank;
    bad.push_back({q, "tp_rank"});
  }
  ParallelLayout zero_ep;
  zero_ep.ep_size = 0;
  bad.push_back({zero_ep, "ep_size"});
  ParallelLayout zero_tp;
  zero_tp.tp_size = 0;
  zero_tp.tp_rank = 0;
  bad.push_back({zero_tp, "tp_"});
  ParallelLayout too_many;  // 8 experts over 9 ranks
  too_many.ep_size = 9;
  bad.push_back({too_many, "ep_size"});
  for (const Bad& b : bad) {
    SCOPED_TRACE("tp " + std::to_string(b.par.tp_rank) + "/" + std::to_string(b.par.tp_size) + " ep " +
                 std::to_string(b.par.ep_rank) + "/" + std::to_string(b.par.ep_size));
    EXPECT_TRUE(is_error(load_all(f.config, f.weights, f.prefix, b.par), {b.expect}));
  }
}

TEST(Layout, ComputeDtypeMustBeFloat) {
  const Files f = write_model("dtype", spec_of("MixtralForCausalLM"));
  for (DType d : {DType::kI32, DType::kU8, DType::kF8E4M3}) {
    EXPECT_TRUE(is_error(load_all(f.config, f.weights, f.prefix, {}, d), {"dtype", std::string(to_string(d))}));
  }
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16}) EXPECT_TRUE(load_all(f.config, f.weights, f.prefix, {}, d).is_ok());
}

// A failed load leaves the destination layer as it was.
TEST(Layout, FailedLoadLeavesTheLayerUnchanged) {
  const Files f = write_model("unchanged", spec_of("MixtralForCausalLM"));
  MoeLayer l;
  ASSERT_TRUE(load_all(f.config, f.weights, f.prefix, {}, DType::kF32, &l).is_ok());
  layer::ModelConfig c;
  ASSERT_TRUE(layer::load_model_config(f.config, &c).is_ok());
  io::Checkpoint ckpt;
  ASSERT_TRUE(io::Checkpoint::open({f.weights}, &ckpt).is_ok());
  ParallelLayout bad;
  bad.tp_size = 3;
  EXPECT_FALSE(MoeLayer::load(c, bad, DType::kBF16, ckpt, f.prefix, &l).is_ok());
  EXPECT_EQ(l.dtype(), DType::kF32);
  EXPECT_EQ(l.parallel().tp_size, 1);
  std::vector<float> x(4 * 64, 0.5f);
  MoeLayer::Result r;
  EXPECT_TRUE(l.forward(AnyTensor{x.data(), DType::kF32, {4, 64}, {}}, std::nullopt, &r).is_ok());
}

// ---- grouped routing parameters ----------------------------------------------------------------

struct GroupCase {
  int n_group, topk_group, top_k;
  std::string key;  // the config key at fault
};
const GroupCase kBadGroups[] = {{3, 1, 2, "n_group"},    {0, 1, 2, "n_group"},    {-1, 1, 2, "n_group"},
                                {4, 0, 2, "topk_group"}, {4, 5, 2, "topk_group"}, {4, 1, 4, "num_experts_per_tok"},
                                {8, 1, 2, "num_experts_per_tok"}};

// n_group not dividing the experts, topk_group out of [1, n_group], or fewer experts in the kept
// groups than top_k: refused (today only by the first forward, see the disabled test below).
// The same for the keys of the other architectures: grouped routing's group counts (DeepSeek-V3
// defaults them; 2^32 + 8 must not become 8) and Qwen2-MoE's shared expert size.
TEST(Config, OutOfRangeIntegersOfOtherArchitecturesAreRefused) {
  struct Edit {
    std::string arch, key;
    io::Json value;
  };
  const std::vector<Edit> edits = {
      {"DeepseekV3ForCausalLM", "n_group", io::Json(std::int64_t{4294967304})},
      {"DeepseekV3ForCausalLM", "topk_group", io::Json(-1)},
      {"Qwen2MoeForCausalLM", "shared_expert_intermediate_size", io::Json(-64)},
      {"Qwen2MoeForCausalLM", "shared_expert_intermediate_size", io::Json(std::int64_t{1} << 40)},
      {"GptOssForCausalLM", "swiglu_limit", io::Json(1e300)},
  };
  for (const Edit& e : edits) {
    SCOPED_TRACE(e.arch + " " + e.key + " = " + e.value.dump());
    const Files f = write_model("range_" + e.key, spec_of(e.arch));
    io::Json j = config_of(f);
    j.set(e.key, e.value);
    const std::string path = write_config(f, j);
    layer::ModelConfig c;
    EXPECT_TRUE(is_error(layer::load_model_config(path, &c), {path, "config." + e.key}));
  }
}

// Every spelling of the expert count that transformers writes loads the same layer: Hub
// checkpoints and transformers < 5.1 write num_experts for Qwen3-MoE, 5.1+ writes
// num_local_experts (its attribute_map); Mixtral the reverse; DeepSeek-V3 reads num_local_experts
// for n_routed_experts; transformers 5.17 reads num_experts for DeepSeek-V2 and gpt-oss. Both spellings with different values are refused, naming both.
TEST(Config, ExpertCountSpellings) {
  struct Case {
    std::string arch, written, other;
  };
  for (const Case& k : {Case{"Qwen3MoeForCausalLM", "num_experts", "num_local_experts"},
                        Case{"MixtralForCausalLM", "num_local_experts", "num_experts"},
                        Case{"DeepseekV3ForCausalLM", "n_routed_experts", "num_local_experts"},
                        Case{"DeepseekV2ForCausalLM", "n_routed_experts", "num_experts"},
                        Case{"GptOssForCausalLM", "num_local_experts", "num_experts"}}) {
    SCOPED_TRACE(k.arch);
    const Files f = write_model("spelling_" + k.other, spec_of(k.arch));
    const io::Json original = config_of(f);
    layer::ModelConfig want;
    ASSERT_TRUE(layer::load_model_config(write_config(f, original), &want).is_ok());
    const io::Json* n = original.find(k.written);
    ASSERT_NE(n, nullptr);
    io::Json renamed = without(original, k.written);
    renamed.set(k.other, *n);
    layer::ModelConfig got;
    const Status s = layer::load_model_config(write_config(f, renamed), &got);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    EXPECT_EQ(got.num_experts, want.num_experts);
    io::Json both = original;
    both.set(k.other, *n);
    EXPECT_TRUE(layer::load_model_config(write_config(f, both), &got).is_ok());
    both.set(k.other, io::Json(n->as_int() + 1));
    const std::string path = write_config(f, both);
    EXPECT_TRUE(is_error(layer::load_model_config(path, &got), {"config." + k.written, "config." + k.other,
                                                                "name the same setting with different values"}));
  }
}

// Keys a config may leave out take Hugging Face's defaults (transformers 5.1's config classes):
// the parsed config equals the one with the default written out, per architecture.
TEST(Config, OmittedKeysTakeHuggingFaceDefaults) {
  struct Default {
    std::string arch, key;
    io::Json value;
  };
  const std::vector<Default> defaults = {
      {"MixtralForCausalLM", "num_experts_per_tok", io::Json(2)},
      {"Qwen2MoeForCausalLM", "num_experts_per_tok", io::Json(4)},
      {"Qwen2MoeForCausalLM", "norm_topk_prob", io::Json(false)},
      {"Qwen2MoeForCausalLM", "shared_expert_intermediate_size", io::Json(5632)},
      {"Qwen3MoeForCausalLM", "num_experts_per_tok", io::Json(8)},
      {"Qwen3MoeForCausalLM", "norm_topk_prob", io::Json(false)},
      {"DeepseekV2ForCausalLM", "n_shared_experts", io::Json(2)},
      {"DeepseekV2ForCausalLM", "routed_scaling_factor", io::Json(1.0)},
      {"DeepseekV2ForCausalLM", "topk_method", io::Json("greedy")},
      {"DeepseekV3ForCausalLM", "num_experts_per_tok", io::Json(8)},
      {"DeepseekV3ForCausalLM", "n_shared_experts", io::Json(1)},
      {"DeepseekV3ForCausalLM", "routed_scaling_factor", io::Json(2.5)},
      {"DeepseekV3ForCausalLM", "norm_topk_prob", io::Json(true)},
      {"DeepseekV3ForCausalLM", "n_group", io::Json(8)},
      {"DeepseekV3ForCausalLM", "topk_group", io::Json(4)},
      {"GptOssForCausalLM", "num_experts_per_tok", io::Json(4)},
      {"GptOssForCausalLM", "swiglu_limit", io::Json(7.0)},
      {"Llama4ForCausalLM", "num_experts_per_tok", io::Json(1)},
      // The expert counts (the checkpoint's shapes must then agree with them at load).
      {"MixtralForCausalLM", "num_local_experts", io::Json(8)},
      {"Qwen2MoeForCausalLM", "num_experts", io::Json(60)},
      {"Qwen3MoeForCausalLM", "num_experts", io::Json(128)},
      {"DeepseekV2ForCausalLM", "n_routed_experts", io::Json(64)},
      {"DeepseekV3ForCausalLM", "n_routed_experts", io::Json(256)},
      {"GptOssForCausalLM", "num_local_experts", io::Json(128)},
      {"Llama4ForCausalLM", "num_local_experts", io::Json(16)},
  };
  const auto same = [](const layer::ModelConfig& a, const layer::ModelConfig& b) {
    return a.top_k == b.top_k && a.num_experts == b.num_experts && a.shared_intermediate == b.shared_intermediate &&
           a.routing == b.routing && a.routing_params.renormalize == b.routing_params.renormalize &&
           a.routing_params.routed_scaling_factor == b.routing_params.routed_scaling_factor &&
           a.routing_params.num_expert_group == b.routing_params.num_expert_group &&
           a.routing_params.topk_group == b.routing_params.topk_group &&
           a.activation_params.swiglu_limit == b.activation_params.swiglu_limit;
  };
  for (const Default& d : defaults) {
    SCOPED_TRACE(d.arch + " " + d.key);
    HfLayerSpec spec = spec_of(d.arch);
    if (d.arch == "DeepseekV3ForCausalLM") spec.num_experts = 16;  // n_group 8 must divide it
    const Files f = write_model("default_" + d.key, spec);
    io::Json explicit_config = config_of(f);
    explicit_config.set(d.key, d.value);
    layer::ModelConfig want, got;
    ASSERT_TRUE(layer::load_model_config(write_config(f, explicit_config), &want).is_ok());
    const Status s = layer::load_model_config(write_config(f, without(explicit_config, d.key)), &got);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    EXPECT_TRUE(same(want, got));
  }
}

TEST(Config, BadGroupedRoutingIsRefused) {
  for (const char* arch : {"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}) {
    const Files f = write_model(std::string("groups_") + arch, spec_of(arch));
    for (const GroupCase& g : kBadGroups) {
      SCOPED_TRACE(std::string(arch) + " n_group " + std::to_string(g.n_group) + " topk_group " +
                   std::to_string(g.topk_group) + " top_k " + std::to_string(g.top_k));
      io::Json j = config_of(f);
      j.set("n_group", g.n_group);
      j.set("topk_group", g.topk_group);
      j.set("num_experts_per_tok", g.top_k);
      MoeLayer l;
      Status s = load_all(write_config(f, j), f.weights, f.prefix, {}, DType::kF32, &l);
      if (s.is_ok()) {
        std::vector<float> x(4 * 64, 0.25f);
        MoeLayer::Result r;
        s = l.forward(AnyTensor{x.data(), DType::kF32, {4, 64}, {}}, std::nullopt, &r);
      }
      EXPECT_TRUE(is_error(s, {}));
    }
  }
}

// Regression test for a fixed bug: the configs above pass load_model_config and
// MoeLayer::load (so `moe info` accepts them); the first forward then fails with the routing
// policy's argument names ("routing.num_expert_group: expected a divisor of num_experts=8, got 3"),
// not the config key. Expected: load_model_config refuses them, naming config.<key>.
TEST(Config, BadGroupedRoutingIsRefusedAtConfigTime) {
  for (const char* arch : {"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}) {
    const Files f = write_model(std::string("groups_cfg_") + arch, spec_of(arch));
    for (const GroupCase& g : kBadGroups) {
      SCOPED_TRACE(std::string(arch) + " n_group " + std::to_string(g.n_group) + " topk_group " +
                   std::to_string(g.topk_group) + " top_k " + std::to_string(g.top_k));
      io::Json j = config_of(f);
      j.set("n_group", g.n_group);
      j.set("topk_group", g.topk_group);
      j.set("num_experts_per_tok", g.top_k);
      const std::string path = write_config(f, j);
      layer::ModelConfig c;
      EXPECT_TRUE(is_error(layer::load_model_config(path, &c), {path, "config." + g.key}));
    }
  }
}

// ---- forward ------------------------------------------------------------------------------------

class ForwardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    files_ = write_model("forward", spec_of("GptOssForCausalLM"));
    ASSERT_TRUE(load_all(files_.config, files_.weights, files_.prefix, {}, DType::kF32, &layer_).is_ok());
  }
  Files files_;
  MoeLayer layer_;
};

TEST_F(ForwardTest, HiddenStatesOfWrongWidth) {
  for (Index h : {63, 65, 32, 0}) {
    std::vector<float> x(static_cast<std::size_t>(4 * std::max<Index>(h, 1)));
    MoeLayer::Result r;
    EXPECT_TRUE(is_error(layer_.forward(AnyTensor{x.data(), DType::kF32, {4, h}, {}}, std::nullopt, &r),
                         {"hidden_states", "64", "[4, " + std::to_string(h) + "]"}));
  }
}

TEST_F(ForwardTest, HiddenStatesOfWrongRank) {
  std::vector<float> x(4 * 64);
  MoeLayer::Result r;
  EXPECT_TRUE(is_error(layer_.forward(AnyTensor{x.data(), DType::kF32, {4 * 64}, {}}, std::nullopt, &r), {"hidden_states"}));
  EXPECT_TRUE(is_error(layer_.forward(AnyTensor{x.data(), DType::kF32, {2, 2, 64}, {}}, std::nullopt, &r), {"hidden_states"}));
}

TEST_F(ForwardTest, HiddenStatesOfWrongDtype) {
  std::vector<std::int32_t> x(4 * 64);
  MoeLayer::Result r;
  for (DType d : {DType::kI32, DType::kI8, DType::kU8, DType::kF8E4M3, DType::kI64}) {
    EXPECT_TRUE(is_error(layer_.forward(AnyTensor{x.data(), d, {4, 64}, {}}, std::nullopt, &r),
                         {"hidden_states", std::string(to_string(d))}));
  }
}

TEST_F(ForwardTest, NonContiguousHiddenStates) {
  std::vector<float> x(4 * 128);
  MoeLayer::Result r;
  EXPECT_TRUE(is_error(layer_.forward(AnyTensor{x.data(), DType::kF32, {4, 64}, {128, 1}}, std::nullopt, &r),
                       {"hidden_states"}));
}

TEST_F(ForwardTest, RouterLogitsOfWrongShapeOrDtype) {
  std::vector<float> x(4 * 64), logits(4 * 16);
  const AnyTensor hidden{x.data(), DType::kF32, {4, 64}, {}};
  MoeLayer::Result r;
  EXPECT_TRUE(is_error(layer_.forward(hidden, AnyTensor{logits.data(), DType::kF32, {4, 7}, {}}, &r), {"router_logits", "[4, 7]"}));
  EXPECT_TRUE(is_error(layer_.forward(hidden, AnyTensor{logits.data(), DType::kF32, {3, 8}, {}}, &r), {"router_logits", "[3, 8]"}));
  EXPECT_TRUE(is_error(layer_.forward(hidden, AnyTensor{logits.data(), DType::kF32, {32}, {}}, &r), {"router_logits"}));
  EXPECT_TRUE(is_error(layer_.forward(hidden, AnyTensor{logits.data(), DType::kBF16, {4, 8}, {}}, &r), {"router_logits", "bf16"}));
}

}  // namespace
}  // namespace moe

namespace {

// --model-config from a stranger: a FIFO or a device is refused without blocking, a huge file by
// its size, before any of it is parsed.
TEST(ModelConfigFile, NonRegularAndOversizedRefused) {
  const std::string dir = moe::testing::hf::make_test_dir("loader_config_files");
  const std::string fifo = dir + "/config.json";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  moe::layer::ModelConfig c;
  EXPECT_EQ(moe::layer::load_model_config(fifo, &c).message(),
            "--model-config " + fifo + ": expected a regular file, found a FIFO");
  EXPECT_EQ(moe::layer::load_model_config("/dev/zero", &c).message(),
            "--model-config /dev/zero: expected a regular file, found a character device");
  const std::string big = dir + "/big.json";
  {
    std::FILE* f = std::fopen(big.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    ASSERT_EQ(std::fseek(f, static_cast<long>(moe::io::kMaxJsonFileBytes), SEEK_SET), 0);  // sparse
    ASSERT_EQ(std::fputc(' ', f), ' ');
    std::fclose(f);
  }
  EXPECT_EQ(moe::layer::load_model_config(big, &c).message(),
            "--model-config " + big + ": " + std::to_string(moe::io::kMaxJsonFileBytes + 1) +
                " bytes, more than the " + std::to_string(moe::io::kMaxJsonFileBytes) + " accepted");
}

}  // namespace

namespace moe {
namespace {

// A checkpoint whose block holds tensors the config does not use (its shared expert, with the
// config saying there is none) is refused naming a tensor, never run without it.
TEST(Config, TensorsTheConfigLeavesUnusedAreRefused) {
  struct Case {
    std::string arch, key, tensor;
  };
  for (const Case& k : {Case{"Qwen2MoeForCausalLM", "shared_expert_intermediate_size", "shared_expert."},
                        Case{"DeepseekV3ForCausalLM", "n_shared_experts", "shared_experts."}}) {
    SCOPED_TRACE(k.arch);
    HfLayerSpec spec = spec_of(k.arch);
    if (k.arch == "DeepseekV3ForCausalLM") spec.num_experts = 16;
    const Files f = write_model("unused_" + k.key, spec);
    ASSERT_TRUE(load_all(f.config, f.weights, f.prefix).is_ok());
    io::Json j = config_of(f);
    j.set(k.key, io::Json(0));
    const std::string path = write_config(f, j);
    const Status s = load_all(path, f.weights, f.prefix);
    EXPECT_TRUE(is_error(s, {k.tensor, "unused by the config"}));
  }
}

}  // namespace
}  // namespace moe
