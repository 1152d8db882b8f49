#include "moe/layer/model_config.h"

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

#include "moe/io/file.h"

namespace moe::layer {

std::string_view to_string(Architecture a) {
  switch (a) {
    case Architecture::kMixtral: return "MixtralForCausalLM";
    case Architecture::kQwen2Moe: return "Qwen2MoeForCausalLM";
    case Architecture::kQwen3Moe: return "Qwen3MoeForCausalLM";
    case Architecture::kDeepseekV2: return "DeepseekV2ForCausalLM";
    case Architecture::kDeepseekV3: return "DeepseekV3ForCausalLM";
    case Architecture::kGptOss: return "GptOssForCausalLM";
    case Architecture::kLlama4: return "Llama4ForCausalLM";
  }
  return "?";
}

namespace {

// Largest values accepted from a config: far above any released model, small enough that every
// product of them the layer forms (E * 2I * H elements, say) stays well inside int64.
constexpr std::int64_t kMaxDimension = std::int64_t{1} << 20;  // hidden, intermediate sizes
constexpr std::int64_t kMaxExperts = std::int64_t{1} << 16;    // routed, zero, shared experts, groups
constexpr double kMaxScale = 1e6;                              // scaling factors, activation limits

// An integer key within [lo, hi] (absent: `def` when given, else an error). `where` prefixes key
// paths in messages: "config", or "config.text_config" (Llama-4's nested keys).
Status get_int_in(const io::Json& c, std::string_view where, std::string_view key, std::optional<std::int64_t> def,
                  std::int64_t lo, std::int64_t hi, std::int64_t* out) {
  std::int64_t v = 0;
  if (def) {
    MOE_RETURN_IF_ERROR(io::get_int_or(c, key, *def, &v, where));
  } else {
    MOE_RETURN_IF_ERROR(io::get_int(c, key, &v, where));
  }
  if (v < lo || v > hi) return invalid_argument(where, ".", key, ": expected an integer in [", lo, ", ", hi, "], got ", v);
  *out = v;
  return Status::ok();
}

Status get_index(const io::Json& c, std::string_view where, std::string_view key, Index* out,
                 std::int64_t hi = kMaxDimension) {
  std::int64_t v = 0;
  MOE_RETURN_IF_ERROR(io::get_int(c, key, &v, where));
  if (v < 1) return invalid_argument(where, ".", key, ": expected a positive integer, got ", v);
  if (v > hi) return invalid_argument(where, ".", key, ": expected at most ", hi, ", got ", v);
  *out = v;
  return Status::ok();
}

// The expert count under whichever of `keys` the config has: transformers' attribute maps let one
// setting be written under two names (Qwen3-MoE and Mixtral write num_local_experts since 5.1 and
// read num_experts, as Hub checkpoints have it; DeepSeek-V3 writes n_routed_experts and reads
// num_local_experts; 5.17 adds num_experts for DeepSeek-V2 and gpt-oss). Both present with
// different values is an error naming both. Absent, the count is transformers' default for the
// architecture (the router's and experts' shapes are then checked against it at load).
Status get_experts(const io::Json& c, std::string_view where, std::initializer_list<std::string_view> keys,
                   Index default_count, Index* out) {
  std::string_view found;
  for (std::string_view key : keys) {
    if (c.find(key) == nullptr) continue;
    Index v = 0;
    MOE_RETURN_IF_ERROR(get_index(c, where, key, &v, kMaxExperts));
    if (!found.empty() && v != *out) {
      return invalid_argument(where, ".", found, " = ", *out, " and ", where, ".", key, " = ", v,
                              " name the same setting with different values");
    }
    if (found.empty()) *out = v;
    found = key;
  }
  if (found.empty()) *out = default_count;  // transformers' default; the tensors' shapes must agree
  return Status::ok();
}

// A positive, finite number of sensible size (a float that overflows, or 1e308, would make every
// output infinite).
Status get_float_or(const io::Json& c, std::string_view where, std::string_view key, double def, float* out) {
  double v = 0;
  MOE_RETURN_IF_ERROR(io::get_double_or(c, key, def, &v, where));
  if (!(v > 0.0 && v <= kMaxScale)) {
    return invalid_argument(where, ".", key, ": expected a number in (0, ", kMaxScale, "], got ", v);
  }
  *out = static_cast<float>(v);
  return Status::ok();
}

void per_expert_names(ModelConfig& m, std::string gate, std::string up, std::string down) {
  m.expert_layout = ExpertLayout::kPerExpertLinear;
  m.gate_name = std::move(gate);
  m.up_name = std::move(up);
  m.down_name = std::move(down);
}

}  // namespace

Status parse_model_config(const io::Json& root, ModelConfig* out) {
  const io::Json* archs = nullptr;
  MOE_RETURN_IF_ERROR(io::get_array(root, "architectures", &archs, "config"));
  ModelConfig m;
  bool found = false;
  for (const io::Json& a : archs->as_array()) {
    if (!a.is_string()) continue;
    const std::string& n = a.as_string();
    static const std::pair<std::string_view, Architecture> kKnown[] = {
        {"MixtralForCausalLM", Architecture::kMixtral},       {"Qwen2MoeForCausalLM", Architecture::kQwen2Moe},
        {"Qwen3MoeForCausalLM", Architecture::kQwen3Moe},     {"DeepseekV2ForCausalLM", Architecture::kDeepseekV2},
        {"DeepseekV3ForCausalLM", Architecture::kDeepseekV3}, {"GptOssForCausalLM", Architecture::kGptOss},
        {"Llama4ForCausalLM", Architecture::kLlama4},         {"Llama4ForConditionalGeneration", Architecture::kLlama4}};
    for (const auto& [name, arch] : kKnown) {
      if (n == name) {
        m.architecture = arch;
        m.architecture_name = n;
        found = true;
      }
    }
    if (found) break;
  }
  if (!found) {
    return unsupported("config.architectures: ", archs->dump(),
                       " names no supported architecture (MixtralForCausalLM, Qwen2MoeForCausalLM, "
                       "Qwen3MoeForCausalLM, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, GptOssForCausalLM, "
                       "Llama4ForCausalLM)");
  }
  // Llama-4's multimodal config nests the text model's keys.
  const bool nested = m.architecture == Architecture::kLlama4 && root.find("text_config");
  const io::Json& c = nested ? *root.find("text_config") : root;
  const std::string w = nested ? "config.text_config" : "config";
  MOE_RETURN_IF_ERROR(get_index(c, w, "hidden_size", &m.hidden));
  // Keys a config may omit take Hugging Face's defaults (transformers 5.1's config classes), so a
  // config that leaves one out loads the layer transformers would build.
  std::optional<std::int64_t> default_top_k;  // DeepSeek-V2 has none: the key is required
  switch (m.architecture) {
    case Architecture::kMixtral: default_top_k = 2; break;
    case Architecture::kQwen2Moe: default_top_k = 4; break;
    case Architecture::kQwen3Moe: default_top_k = 8; break;
    case Architecture::kDeepseekV2: break;
    case Architecture::kDeepseekV3: default_top_k = 8; break;
    case Architecture::kGptOss: default_top_k = 4; break;
    case Architecture::kLlama4: default_top_k = 1; break;
  }
  std::int64_t top_k = 0;
  MOE_RETURN_IF_ERROR(get_int_in(c, w, "num_experts_per_tok", default_top_k, 1, kMaxExperts, &top_k));
  m.top_k = static_cast<int>(top_k);
  std::int64_t n_shared = 0;

  switch (m.architecture) {
    case Architecture::kMixtral:
      // softmax (fp32) -> top-k -> renormalize; experts w2(silu(w1 x) * w3 x).
      MOE_RETURN_IF_ERROR(get_experts(c, w, {"num_local_experts", "num_experts"}, 8, &m.num_experts));
      MOE_RETURN_IF_ERROR(get_index(c, w, "intermediate_size", &m.intermediate));
      m.routing = routing::SoftmaxTopK::kName;
      m.routing_params.renormalize = true;
      m.module = "block_sparse_moe";
      m.router_weight = "gate.weight";
      per_expert_names(m, "w1", "w3", "w2");
      break;
    case Architecture::kQwen2Moe:
    case Architecture::kQwen3Moe:
      // softmax -> top-k -> renormalize iff norm_topk_prob. Qwen2-MoE adds
      // sigmoid(shared_expert_gate(x)) * shared_expert(x).
      MOE_RETURN_IF_ERROR(get_experts(c, w, {"num_experts", "num_local_experts"},
                                      m.architecture == Architecture::kQwen2Moe ? 60 : 128, &m.num_experts));
      MOE_RETURN_IF_ERROR(get_index(c, w, "moe_intermediate_size", &m.intermediate));
      MOE_RETURN_IF_ERROR(io::get_bool_or(c, "norm_topk_prob", false, &m.routing_params.renormalize, w));
      m.routing = routing::SoftmaxTopK::kName;
      m.module = "mlp";
      m.router_weight = "gate.weight";
      per_expert_names(m, "gate_proj", "up_proj", "down_proj");
      if (m.architecture == Architecture::kQwen2Moe) {
        std::int64_t s = 0;
        MOE_RETURN_IF_ERROR(get_int_in(c, w, "shared_expert_intermediate_size", 5632, 0, kMaxDimension, &s));
        m.shared_intermediate = s;
        m.shared_expert_gate = s > 0;
        m.shared_prefix = "shared_expert";
      }
      break;
    case Architecture::kDeepseekV2: {
      // HF DeepseekV2: fp32 softmax scores; greedy top-k, or group_limited_greedy (group score =
      // max); weights never renormalized, always times routed_scaling_factor.
      MOE_RETURN_IF_ERROR(get_experts(c, w, {"n_routed_experts", "num_experts"}, 64, &m.num_experts));
      MOE_RETURN_IF_ERROR(get_index(c, w, "moe_intermediate_size", &m.intermediate));
      MOE_RETURN_IF_ERROR(get_float_or(c, w, "routed_scaling_factor", 1.0, &m.routing_params.routed_scaling_factor));
      std::string method;
      MOE_RETURN_IF_ERROR(io::get_string_or(c, "topk_method", "greedy", &method, w));
      if (method == "group_limited_greedy") {
        std::int64_t g = 1, tg = 1;
        MOE_RETURN_IF_ERROR(get_int_in(c, w, "n_group", std::nullopt, 1, kMaxExperts, &g));
        MOE_RETURN_IF_ERROR(get_int_in(c, w, "topk_group", std::nullopt, 1, kMaxExperts, &tg));
        m.routing = routing::GroupedTopK<routing::Softmax>::kName;
        m.routing_params.num_expert_group = static_cast<int>(g);
        m.routing_params.topk_group = static_cast<int>(tg);
      } else if (method == "greedy") {
        m.routing = routing::SoftmaxTopK::kName;
      } else {
        return unsupported("config.topk_method: \"", method, "\" is not supported (greedy, group_limited_greedy)");
      }
      MOE_RETURN_IF_ERROR(get_int_in(c, w, "n_shared_experts", 2, 0, kMaxExperts, &n_shared));
      break;
    }
    case Architecture::kDeepseekV3: {
      // HF DeepseekV3 (noaux_tc): fp32 sigmoid scores; selection on scores + correction bias,
      // groups ranked by their top-2 biased sum, others masked; weights = unbiased scores,
      // renormalized iff norm_topk_prob, then times routed_scaling_factor.
      MOE_RETURN_IF_ERROR(get_experts(c, w, {"n_routed_experts", "num_local_experts"}, 256, &m.num_experts));
      MOE_RETURN_IF_ERROR(get_index(c, w, "moe_intermediate_size", &m.intermediate));
      MOE_RETURN_IF_ERROR(get_float_or(c, w, "routed_scaling_factor", 2.5, &m.routing_params.routed_scaling_factor));
      MOE_RETURN_IF_ERROR(io::get_bool_or(c, "norm_topk_prob", true, &m.routing_params.renormalize, w));
      std::int64_t g = 8, tg = 4;  // Hugging Face's DeepseekV3Config defaults
      MOE_RETURN_IF_ERROR(get_int_in(c, w, "n_group", 8, 1, kMaxExperts, &g));
      MOE_RETURN_IF_ERROR(get_int_in(c, w, "topk_group", 4, 1, kMaxExperts, &tg));
      m.routing = routing::GroupedTopK<routing::Sigmoid>::kName;
      m.routing_params.num_expert_group = static_cast<int>(g);
      m.routing_params.topk_group = static_cast<int>(tg);
      m.correction_bias = true;
      MOE_RETURN_IF_ERROR(get_int_in(c, w, "n_shared_experts", 1, 0, kMaxExperts, &n_shared));
      break;
    }
    case Architecture::kGptOss:
      // Router Linear with bias; softmax over the top-k logits (= softmax, top-k, renormalize);
      // swigluoai on interleaved gate/up, biases on both GEMMs.
      MOE_RETURN_IF_ERROR(get_experts(c, w, {"num_local_experts", "num_experts"}, 128, &m.num_experts));
      MOE_RETURN_IF_ERROR(get_index(c, w, "intermediate_size", &m.intermediate));
      MOE_RETURN_IF_ERROR(get_float_or(c, w, "swiglu_limit", 7.0, &m.activation_params.swiglu_limit));
      MOE_RETURN_IF_ERROR(get_float_or(c, w, "swiglu_alpha", 1.702, &m.activation_params.swiglu_alpha));
      m.routing = routing::SoftmaxTopK::kName;
      m.routing_params.renormalize = true;
      m.router_bias = true;
      m.activation = SwigluOai::kName;
      m.expert_biases = true;
      m.module = "mlp";
      m.router_weight = "router.weight";
      m.expert_layout = ExpertLayout::kFusedInterleaved;
      break;
    case Architecture::kLlama4:
      // top-k (1) of the raw logits, sigmoid of the chosen logit scales the expert INPUT; the
      // shared expert (same I) is added unweighted.
      MOE_RETURN_IF_ERROR(get_experts(c, w, {"num_local_experts"}, 16, &m.num_experts));
      MOE_RETURN_IF_ERROR(get_index(c, w, "intermediate_size", &m.intermediate));
      m.routing = routing::Llama4TopK::kName;
      m.weight_on_input = true;
      m.module = "feed_forward";
      m.router_weight = "router.weight";
      m.expert_layout = ExpertLayout::kFusedGateUp;
      m.shared_intermediate = m.intermediate;
      m.shared_prefix = "shared_expert";
      break;
  }
  if (m.architecture == Architecture::kDeepseekV2 || m.architecture == Architecture::kDeepseekV3) {
    m.module = "mlp";
    m.router_weight = "gate.weight";
    per_expert_names(m, "gate_proj", "up_proj", "down_proj");
    m.shared_intermediate = n_shared * m.intermediate;
    m.shared_prefix = "shared_experts";
  }
  std::int64_t zero = 0;
  MOE_RETURN_IF_ERROR(get_int_in(c, w, "zero_expert_num", 0, 0, kMaxExperts, &zero));
  if (zero > 0) {
    std::string type;
    MOE_RETURN_IF_ERROR(io::get_string_or(c, "zero_expert_type", "identity", &type, w));
    if (type != "identity") return unsupported(w, ".zero_expert_type: \"", type, "\" is not supported (identity)");
  }
  m.num_zero_experts = zero;
  if (routes_by_group(m.routing)) {
    const int g = m.routing_params.num_expert_group, tg = m.routing_params.topk_group;
    const Index routed = m.num_experts + m.num_zero_experts;  // routing covers the zero experts too
    if (g < 1 || routed % g != 0) {
      return invalid_argument(w, ".n_group: expected a divisor of the routed expert count ", routed, ", got ", g);
    }
    if (tg < 1 || tg > g) return invalid_argument(w, ".topk_group: expected 1 <= topk_group <= n_group=", g, ", got ", tg);
    if (m.top_k > tg * (routed / g)) {
      return invalid_argument(w, ".num_experts_per_tok: expected <= topk_group * experts per group = ",
                              tg * (routed / g), ", got ", m.top_k);
    }
  }
  std::string act;
  MOE_RETURN_IF_ERROR(io::get_string_or(c, "hidden_act", "silu", &act, w));
  if (m.architecture != Architecture::kGptOss && act != "silu") {
    return unsupported("config.hidden_act: \"", act, "\" is not supported for ", m.architecture_name, " (silu)");
  }
  // quantization_config sits at the top level, also for Llama-4's nested text_config.
  MOE_RETURN_IF_ERROR(parse_quantization_config(root, "config", &m.quantization));
  if (m.quantization.method == QuantMethod::kMxfp4 && m.architecture != Architecture::kGptOss) {
    return unsupported("config.quantization_config.quant_method: \"mxfp4\" is supported for GptOssForCausalLM only, "
                       "not ", m.architecture_name);
  }
  if (m.top_k < 1 || m.top_k > m.num_experts + m.num_zero_experts) {
    return invalid_argument(w, ".num_experts_per_tok: expected 1 <= top_k <= num_experts=", m.num_experts, ", got ",
                            m.top_k);
  }
  *out = std::move(m);
  return Status::ok();
}

Status load_model_config(const std::string& path, ModelConfig* out) {
  std::string text;
  MOE_RETURN_IF_ERROR(io::read_text_file(path, "--model-config", io::kMaxJsonFileBytes, &text));
  io::Json j;
  const Status s = io::parse_json(text, &j);
  if (!s.is_ok()) return make_status(s.code(), path, ": ", s.message());
  const Status p = parse_model_config(j, out);
  if (!p.is_ok()) return make_status(p.code(), path, ": ", p.message());
  return Status::ok();
}

}  // namespace moe::layer
