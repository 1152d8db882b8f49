// Writes small random Hugging Face checkpoints (config.json + model.safetensors) of one MoE layer
// for every supported architecture, in each model's own tensor names and layouts: the demo's
// input (the README's main job), the layer's and the tool's tests, and a start for a user who
// wants to try the tool without downloading a model.
#pragma once

#include <cmath>
#include <cstring>
#include <optional>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "moe/io/json.h"
#include "moe/io/safetensors.h"
#include "moe/quant/numeric.h"

namespace moe::io {

struct HfLayerSpec {
  std::string architecture = "Qwen3MoeForCausalLM";
  Index hidden = 64, intermediate = 32, num_experts = 8;
  int top_k = 2;
  bool norm_topk_prob = true;
  Index shared_intermediate = 48;  // Qwen2-MoE shared_expert_intermediate_size
  int n_shared_experts = 1;        // DeepSeek
  int n_group = 4, topk_group = 2; // DeepSeek
  double routed_scaling_factor = 2.5;
  std::string topk_method = "group_limited_greedy";  // DeepSeek-V2
  bool mxfp4 = false;              // gpt-oss: write the MXFP4 blocks/scales form
  int layer = 3;                   // tensors live under model.layers.<layer>.
  DType dtype = DType::kBF16;      // storage of the float tensors
  std::uint64_t seed = 1;
};

class HfCheckpointWriter {
 public:
  explicit HfCheckpointWriter(HfLayerSpec spec) : s_(std::move(spec)), gen_(s_.seed) {}

  io::Json config() const {
    io::Json c = io::Json::object();
    io::Json archs = io::Json::array();
    archs.push_back(s_.architecture);
    c.set("architectures", archs);
    c.set("hidden_size", s_.hidden);
    c.set("num_experts_per_tok", s_.top_k);
    c.set("hidden_act", "silu");
    const std::string& a = s_.architecture;
    if (a == "MixtralForCausalLM") {
      c.set("num_local_experts", s_.num_experts);
      c.set("intermediate_size", s_.intermediate);
    } else if (a == "Qwen2MoeForCausalLM" || a == "Qwen3MoeForCausalLM") {
      c.set("num_experts", s_.num_experts);
      c.set("moe_intermediate_size", s_.intermediate);
      c.set("norm_topk_prob", s_.norm_topk_prob);
      if (a == "Qwen2MoeForCausalLM") c.set("shared_expert_intermediate_size", s_.shared_intermediate);
    } else if (a == "DeepseekV2ForCausalLM" || a == "DeepseekV3ForCausalLM") {
      c.set("n_routed_experts", s_.num_experts);
      c.set("moe_intermediate_size", s_.intermediate);
      c.set("n_shared_experts", s_.n_shared_experts);
      c.set("n_group", s_.n_group);
      c.set("topk_group", s_.topk_group);
      c.set("routed_scaling_factor", s_.routed_scaling_factor);
      c.set("norm_topk_prob", s_.norm_topk_prob);
      if (a == "DeepseekV2ForCausalLM") c.set("topk_method", s_.topk_method);
    } else if (a == "GptOssForCausalLM") {
      c.set("num_local_experts", s_.num_experts);
      c.set("intermediate_size", s_.intermediate);
      c.set("swiglu_limit", 7.0);
    } else if (a == "Llama4ForCausalLM") {
      c.set("num_local_experts", s_.num_experts);
      c.set("intermediate_size", s_.intermediate);
      c.set("intermediate_size_mlp", 2 * s_.intermediate);
    }
    return c;
  }

  // Writes <dir>/config.json and <dir>/model.safetensors.
  Status write(const std::string& dir) {
    tensors_.clear();
    const Index H = s_.hidden, I = s_.intermediate, E = s_.num_experts;
    const std::string& a = s_.architecture;
    const std::string L = "model.layers." + std::to_string(s_.layer) + ".";
    const float wh = 1.0f / std::sqrt(static_cast<float>(H)), wi = 1.0f / std::sqrt(static_cast<float>(I));
    auto per_expert = [&](const std::string& p, const std::string& g, const std::string& u, const std::string& d) {
      for (Index e = 0; e < E; ++e) {
        const std::string n = p + "experts." + std::to_string(e) + ".";
        add(n + g + ".weight", {I, H}, wh);
        add(n + u + ".weight", {I, H}, wh);
        add(n + d + ".weight", {H, I}, wi);
      }
    };
    auto shared = [&](const std::string& p, Index S) {
      add(p + "gate_proj.weight", {S, H}, wh);
      add(p + "up_proj.weight", {S, H}, wh);
      add(p + "down_proj.weight", {H, S}, 1.0f / std::sqrt(static_cast<float>(S)));
    };
    if (a == "MixtralForCausalLM") {
      const std::string p = L + "block_sparse_moe.";
      add(p + "gate.weight", {E, H}, 1.0f);
      per_expert(p, "w1", "w3", "w2");
    } else if (a == "Qwen2MoeForCausalLM" || a == "Qwen3MoeForCausalLM") {
      const std::string p = L + "mlp.";
      add(p + "gate.weight", {E, H}, 1.0f);
      per_expert(p, "gate_proj", "up_proj", "down_proj");
      if (a == "Qwen2MoeForCausalLM") {
        shared(p + "shared_expert.", s_.shared_intermediate);
        add(p + "shared_expert_gate.weight", {1, H}, wh);
      }
    } else if (a == "DeepseekV2ForCausalLM" || a == "DeepseekV3ForCausalLM") {
      const std::string p = L + "mlp.";
      add(p + "gate.weight", {E, H}, 1.0f);
      if (a == "DeepseekV3ForCausalLM") add(p + "gate.e_score_correction_bias", {E}, 0.2f, DType::kF32);
      per_expert(p, "gate_proj", "up_proj", "down_proj");
      if (s_.n_shared_experts > 0) shared(p + "shared_experts.", I * s_.n_shared_experts);
    } else if (a == "GptOssForCausalLM") {
      const std::string p = L + "mlp.";
      add(p + "router.weight", {E, H}, 1.0f);
      add(p + "router.bias", {E}, 0.5f);
      if (s_.mxfp4) {
        add_mxfp4(p + "experts.gate_up_proj", E, 2 * I, H);
        add_mxfp4(p + "experts.down_proj", E, H, I);
      } else {
        add(p + "experts.gate_up_proj", {E, H, 2 * I}, wh);
        add(p + "experts.down_proj", {E, I, H}, wi);
      }
      add(p + "experts.gate_up_proj_bias", {E, 2 * I}, 0.5f);
      add(p + "experts.down_proj_bias", {E, H}, 0.5f);
    } else if (a == "Llama4ForCausalLM") {
      const std::string p = L + "feed_forward.";
      add(p + "router.weight", {E, H}, 1.0f);
      add(p + "experts.gate_up_proj", {E, H, 2 * I}, wh);
      add(p + "experts.down_proj", {E, I, H}, wi);
      shared(p + "shared_expert.", I);
    } else {
      return invalid_argument("HfCheckpointWriter: unknown architecture ", a);
    }
    std::vector<io::NamedTensor> named;
    for (const auto& [name, t] : tensors_) named.push_back({name, t.dtype, t.shape, t.bytes.data()});
    MOE_RETURN_IF_ERROR(io::write_safetensors(dir + "/model.safetensors", named));
    std::ofstream f(dir + "/config.json");
    f << config().dump();
    if (!f) return invalid_argument("cannot write ", dir, "/config.json");
    return Status::ok();
  }

  std::string prefix() const { return "model.layers." + std::to_string(s_.layer); }
  const HfLayerSpec& spec() const { return s_; }

 private:
  struct Stored {
    DType dtype;
    std::vector<Index> shape;
    std::vector<std::uint8_t> bytes;
  };

  void add(const std::string& name, std::vector<Index> shape, float scale, std::optional<DType> dtype = {}) {
    Stored t;
    t.dtype = dtype.value_or(s_.dtype);
    t.shape = shape;
    Index n = 1;
    for (Index e : shape) n *= e;
    std::normal_distribution<float> d(0.0f, scale);
    if (t.dtype == DType::kF32) {
      t.bytes.resize(n * 4);
      for (Index i = 0; i < n; ++i) {
        const float v = d(gen_);
        std::memcpy(&t.bytes[i * 4], &v, 4);
      }
    } else {
      t.bytes.resize(n * 2);
      for (Index i = 0; i < n; ++i) {
        const std::uint16_t b = t.dtype == DType::kBF16 ? bfloat16(d(gen_)).bits : half(d(gen_)).bits;
        std::memcpy(&t.bytes[i * 2], &b, 2);
      }
    }
    tensors_[name] = std::move(t);
  }

  // gpt-oss MXFP4: <name>_blocks [E, R, C/32, 16] u8 (two e2m1 codes per byte, low nibble first)
  // and <name>_scales [E, R, C/32] u8 (E8M0, bias 127).
  void add_mxfp4(const std::string& name, Index E, Index R, Index C) {
    Stored b{DType::kU8, {E, R, C / 32, 16}, {}}, s{DType::kU8, {E, R, C / 32}, {}};
    std::uniform_int_distribution<int> code(0, 255), exp(120, 124);
    b.bytes.resize(E * R * C / 2);
    for (auto& x : b.bytes) x = static_cast<std::uint8_t>(code(gen_));
    s.bytes.resize(E * R * C / 32);
    for (auto& x : s.bytes) x = static_cast<std::uint8_t>(exp(gen_));
    tensors_[name + "_blocks"] = std::move(b);
    tensors_[name + "_scales"] = std::move(s);
  }

  HfLayerSpec s_;
  std::mt19937_64 gen_;
  std::map<std::string, Stored> tensors_;
};

}  // namespace moe::io
