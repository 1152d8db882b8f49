// A checkpoint's `quantization_config` (config.json), read into what the loader needs to know:
// which scheme the routed experts' weights are stored in, and whether this build can run it.
//
// Recognised (the layouts follow vLLM's loaders, ../shared/reference/vllm-semantics.md section 3):
//   absent                         unquantized (the tensors' dtype: bf16, f16 or f32)
//   quant_method "mxfp4"           gpt-oss: E2M1 values, E8M0 scales per 32 along K (widened at load)
//   quant_method "fp8"             F8_E4M3 weights with `weight_scale_inv`: 128x128 blocks when
//                                  `weight_block_size` is given (DeepSeek-V3, Qwen3-FP8), else one
//                                  scale per tensor; `activation_scheme` dynamic or static
//   quant_method "compressed-tensors"  the config_groups' weights / input_activations: FP8 or INT8
//                                  with tensor, channel or block weight scales, token or tensor
//                                  activation scales (dynamic or static), or the pack-quantized
//                                  4/8-bit weight-only formats (group or channel scales, symmetric
//                                  or with zero points, actorder "group" or "weight")
//   quant_method "gptq"            4/8-bit weight-only: bits, group_size (-1: per channel), sym,
//                                  desc_act (act-order), checkpoint_format gptq or gptq_v2
//   quant_method "awq"             4-bit weight-only (version gemm): bits / w_bit, group_size /
//                                  q_group_size, zero_point
// Anything else (bitsandbytes, modelopt, AWQ gemv or marlin, a variant outside the list)
// is refused with an error that names it. A recognised scheme that this build cannot run yet is
// also refused at load, naming the scheme, so quantized tensors never run as if they were float.
#pragma once

#include <string>

#include "moe/io/json.h"
#include "moe/status.h"

namespace moe::layer {

enum class QuantMethod {
  kNone,
  kMxfp4,            // gpt-oss
  kFp8,              // W8A8 FP8 E4M3 (block, channel or tensor weight scales)
  kInt8,             // W8A8 INT8 (channel weight scales, per-token dynamic activations)
  kWeightOnly,       // W4A16 / W8A16: compressed-tensors pack-quantized, GPTQ, AWQ
};

enum class WeightScaleLayout { kNone, kPerTensor, kPerChannel, kBlock, kGroup };
enum class ActivationScaleLayout { kNone, kPerTensor, kPerToken, kPerTokenGroup };

struct QuantizationConfig {
  QuantMethod method = QuantMethod::kNone;
  std::string quant_method;  // as the config writes it ("" when absent)
  WeightScaleLayout weight_scale = WeightScaleLayout::kNone;
  int block_n = 0, block_k = 0;  // kBlock: weight scale block (rows of the output, K)
  int group_size = 0;            // kGroup
  int weight_bits = 16;
  ActivationScaleLayout activation_scale = ActivationScaleLayout::kNone;
  bool dynamic_activations = false;
  // Weight-only: zero points stored (asymmetric), GPTQ act-order (g_idx), GPTQ's v1 zero points
  // (stored minus one).
  bool zero_points = false, act_order = false, gptq_zeros_minus_one = false;

  // One line for `moe info`: the scheme and its scale layouts.
  std::string describe() const;
  // Whether this build runs the routed experts of such a checkpoint (the W8A8 schemes of
  // moe/layer/built_policies.h' BuiltSchemes, on the CPU backend): unquantized; gpt-oss MXFP4
  // (widened at load); FP8 with 128x128 weight blocks and dynamic per-token-group(128) activations;
  // FP8 per-channel weights with dynamic per-token activations; FP8 per-tensor weights with static
  // per-tensor activations; INT8 per-channel weights with dynamic per-token activations;
  // weight-only 4/8-bit with groups of a multiple of 32 or per channel (moe/quant/weight_only.h,
  // bf16/f16 activations).
  bool runnable() const {
    if (method == QuantMethod::kNone || method == QuantMethod::kMxfp4) return true;
    if (method == QuantMethod::kWeightOnly) {
      return (weight_bits == 4 || weight_bits == 8) &&
             (weight_scale == WeightScaleLayout::kPerChannel || (weight_scale == WeightScaleLayout::kGroup && group_size % 32 == 0));
    }
    if (method == QuantMethod::kFp8 && weight_scale == WeightScaleLayout::kBlock) {
      return block_n == 128 && block_k == 128 && activation_scale == ActivationScaleLayout::kPerTokenGroup;
    }
    if (method == QuantMethod::kFp8 && weight_scale == WeightScaleLayout::kPerChannel) {
      return activation_scale == ActivationScaleLayout::kPerToken && dynamic_activations;
    }
    if (method == QuantMethod::kFp8 && weight_scale == WeightScaleLayout::kPerTensor) {
      return activation_scale == ActivationScaleLayout::kPerTensor && !dynamic_activations;
    }
    return method == QuantMethod::kInt8 && weight_scale == WeightScaleLayout::kPerChannel &&
           activation_scale == ActivationScaleLayout::kPerToken;
  }
};

// Reads config.quantization_config (absent: unquantized). `where` prefixes key paths in errors.
// Structural errors are kInvalidArgument; schemes outside the list are kUnsupported.
Status parse_quantization_config(const io::Json& config, std::string_view where, QuantizationConfig* out);

}  // namespace moe::layer
