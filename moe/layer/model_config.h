// Hugging Face model configs -> the MoE layer's configuration.
//
// Supported `architectures`: MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM,
// DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, GptOssForCausalLM, Llama4ForCausalLM (also
// Llama4ForConditionalGeneration, whose text_config is read). The mapping of each model's
// routing and checkpoint layout follows its Hugging Face modeling code; see the comments in
// model_config.cc.
#pragma once

#include <string>

#include "moe/io/json.h"
#include "moe/layer/quantization_config.h"
#include "moe/layer/registry.h"
#include "moe/status.h"

namespace moe::layer {

enum class Architecture { kMixtral, kQwen2Moe, kQwen3Moe, kDeepseekV2, kDeepseekV3, kGptOss, kLlama4 };
std::string_view to_string(Architecture a);

// How a checkpoint stores the routed experts.
enum class ExpertLayout {
  kPerExpertLinear,  // experts.{e}.<gate|up|down>.weight, nn.Linear [out, in]
  kFusedGateUp,      // experts.gate_up_proj [E, H, 2I] (gate | up halves), experts.down_proj [E, I, H]
  kFusedInterleaved, // gpt-oss: experts.gate_up_proj [E, H, 2I] (gate, up interleaved) + biases;
                     // or its MXFP4 form experts.gate_up_proj_blocks / _scales
};

struct ModelConfig {
  Architecture architecture = Architecture::kMixtral;
  std::string architecture_name;
  Index hidden = 0;
  Index intermediate = 0;  // per routed expert, before tensor parallelism
  Index num_experts = 0;
  int top_k = 0;

  std::string routing = std::string(routing::SoftmaxTopK::kName);  // a BuiltRoutings kName
  RoutingParams routing_params;
  bool router_bias = false;      // gpt-oss: router Linear has a bias
  bool correction_bias = false;  // DeepSeek-V3: gate.e_score_correction_bias

  std::string activation = std::string(SiluAndMul::kName);  // an activation of BuiltExperts
  ActivationParams activation_params;
  bool weight_on_input = false;  // Llama-4
  bool expert_biases = false;    // gpt-oss

  // Zero experts (LongCat-Flash's "identity" type, config keys zero_expert_num/zero_expert_type):
  // routing covers num_experts + num_zero_experts; a slot routed to a zero expert adds
  // weight * x to the output and runs no GEMM. The router has num_experts + num_zero_experts rows.
  Index num_zero_experts = 0;

  Index shared_intermediate = 0;   // 0: no shared expert
  bool shared_expert_gate = false; // Qwen2-MoE: sigmoid(shared_expert_gate(x)) scales it

  // Checkpoint names, relative to the MoE block's prefix.
  std::string module;  // block name under a decoder layer: "block_sparse_moe", "mlp", "feed_forward"
  std::string router_weight;
  ExpertLayout expert_layout = ExpertLayout::kPerExpertLinear;
  std::string gate_name, up_name, down_name;  // kPerExpertLinear: "w1"/"w3"/"w2" or "gate_proj"/...
  std::string shared_prefix;                  // "shared_expert" / "shared_experts"

  QuantizationConfig quantization;  // config.quantization_config (absent: unquantized)
};

// Reads a parsed config.json. Errors name the key path (e.g. "config.num_experts_per_tok").
Status parse_model_config(const io::Json& config, ModelConfig* out);

// Reads and parses a config.json file.
Status load_model_config(const std::string& path, ModelConfig* out);

}  // namespace moe::layer
