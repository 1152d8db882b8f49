#include "moe/layer/quantization_config.h"

#include <cctype>
#include <cstdint>
#include <initializer_list>
#include <sstream>

namespace moe::layer {

namespace {

constexpr std::int64_t kMaxBlock = 4096;  // scale blocks and groups: released models use 32..128

std::string key_path(std::string_view where, std::string_view key) { return std::string(where) + "." + std::string(key); }

// `quant_method: fp8` (transformers' FineGrainedFP8Config / vLLM's Fp8Config).
Status parse_fp8(const io::Json& q, std::string_view where, QuantizationConfig* out) {
  std::string fmt;
  MOE_RETURN_IF_ERROR(io::get_string_or(q, "fmt", "e4m3", &fmt, where));
  if (fmt != "e4m3") return unsupported(where, ".fmt: \"", fmt, "\" is not supported (e4m3)");
  std::string scheme;
  MOE_RETURN_IF_ERROR(io::get_string_or(q, "activation_scheme", "dynamic", &scheme, where));
  if (scheme != "dynamic" && scheme != "static") {
    return invalid_argument(where, ".activation_scheme: expected \"dynamic\" or \"static\", got \"", scheme, "\"");
  }
  out->method = QuantMethod::kFp8;
  out->weight_bits = 8;
  out->dynamic_activations = scheme == "dynamic";
  const io::Json* block = q.find("weight_block_size");
  if (block == nullptr || block->is_null()) {
    out->weight_scale = WeightScaleLayout::kPerTensor;
    out->activation_scale = ActivationScaleLayout::kPerTensor;
    return Status::ok();
  }
  if (!block->is_array() || block->size() != 2 || !(*block)[0].is_integer() || !(*block)[1].is_integer()) {
    return invalid_argument(where, ".weight_block_size: expected two integers [block_n, block_k], got ", block->dump());
  }
  const std::int64_t bn = (*block)[0].as_int(), bk = (*block)[1].as_int();
  if (bn < 1 || bn > kMaxBlock || bk < 1 || bk > kMaxBlock) {
    return invalid_argument(where, ".weight_block_size: expected integers in [1, ", kMaxBlock, "], got ", block->dump());
  }
  if (!out->dynamic_activations) {
    return unsupported(where, ".activation_scheme: \"static\" with weight_block_size is not supported (block-scaled "
                              "FP8 quantizes activations dynamically per 1 x block_k group)");
  }
  out->weight_scale = WeightScaleLayout::kBlock;
  out->block_n = static_cast<int>(bn);
  out->block_k = static_cast<int>(bk);
  out->activation_scale = ActivationScaleLayout::kPerTokenGroup;
  return Status::ok();
}

// One compressed-tensors quantization args object ("weights" or "input_activations").
struct CtArgs {
  std::int64_t num_bits = 0;
  std::string type, strategy;
  bool dynamic = false;
  std::int64_t group_size = 0;
  const io::Json* block_structure = nullptr;
};

Status parse_ct_args(const io::Json& a, const std::string& where, CtArgs* out) {
  if (!a.is_object()) return invalid_argument(where, ": expected an object, got ", a.dump());
  MOE_RETURN_IF_ERROR(io::get_int(a, "num_bits", &out->num_bits, where));
  MOE_RETURN_IF_ERROR(io::get_string_or(a, "type", "int", &out->type, where));
  MOE_RETURN_IF_ERROR(io::get_string_or(a, "strategy", "tensor", &out->strategy, where));
  const io::Json* dyn = a.find("dynamic");
  if (dyn != nullptr && dyn->is_string()) {
    out->dynamic = true;  // "local": dynamic with a static global scale (NVFP4); refused below by num_bits/type
  } else {
    MOE_RETURN_IF_ERROR(io::get_bool_or(a, "dynamic", false, &out->dynamic, where));
  }
  const io::Json* g = a.find("group_size");
  if (g != nullptr && !g->is_null()) {
    if (!g->is_integer() || g->as_int() < 1 || g->as_int() > kMaxBlock) {
      return invalid_argument(where, ".group_size: expected an integer in [1, ", kMaxBlock, "] or null, got ", g->dump());
    }
    out->group_size = g->as_int();
  }
  const io::Json* b = a.find("block_structure");
  if (b != nullptr && !b->is_null()) out->block_structure = b;
  if (out->type != "int" && out->type != "float") {
    return unsupported(where, ".type: \"", out->type, "\" is not supported (int, float)");
  }
  return Status::ok();
}

// `quant_method: compressed-tensors`: one scheme for the Linear layers (the experts among them).
Status parse_compressed_tensors(const io::Json& q, std::string_view where, QuantizationConfig* out) {
  const io::Json* groups = nullptr;
  MOE_RETURN_IF_ERROR(io::get_object(q, "config_groups", &groups, where));
  if (groups->members().size() != 1) {
    return unsupported(where, ".config_groups: ", groups->members().size(),
                       " groups; only checkpoints with one quantization scheme for every Linear layer are supported");
  }
  const std::string gw = key_path(where, "config_groups." + groups->members().front().first);
  const io::Json& group = groups->members().front().second;
  if (!group.is_object()) return invalid_argument(gw, ": expected an object, got ", group.dump());
  const io::Json* weights = group.find("weights");
  if (weights == nullptr || weights->is_null()) return invalid_argument(gw, ".weights: required");
  CtArgs w;
  MOE_RETURN_IF_ERROR(parse_ct_args(*weights, gw + ".weights", &w));
  const io::Json* acts = group.find("input_activations");
  const bool weight_only = acts == nullptr || acts->is_null();
  CtArgs a;
  if (!weight_only) MOE_RETURN_IF_ERROR(parse_ct_args(*acts, gw + ".input_activations", &a));
  // `format` (float-quantized, int-quantized, naive-quantized, pack-quantized) follows from the
  // args above and is not read.
  out->weight_bits = static_cast<int>(w.num_bits);

  if (weight_only) {  // W4A16 / W8A16, pack-quantized
    if (w.type != "int" || (w.num_bits != 4 && w.num_bits != 8)) {
      return unsupported(gw, ".weights: weight-only ", w.type, w.num_bits, " is not supported (int4, int8)");
    }
    std::string format;
    MOE_RETURN_IF_ERROR(io::get_string_or(q, "format", "pack-quantized", &format, where));
    if (format != "pack-quantized") {
      return unsupported(where, ".format: \"", format, "\" is not supported for weight-only checkpoints (pack-quantized)");
    }
    bool symmetric = true;
    MOE_RETURN_IF_ERROR(io::get_bool_or(*weights, "symmetric", true, &symmetric, gw + ".weights"));
    out->zero_points = !symmetric;
    const io::Json* actorder = weights->find("actorder");
    if (actorder != nullptr && !actorder->is_null()) {
      // "group": g_idx stored (act-order); "weight": columns reordered at quantization time only,
      // the groups stay contiguous and nothing is stored; a boolean true is "group".
      if (actorder->is_bool()) {
        out->act_order = actorder->as_bool();
      } else if (actorder->is_string() && (actorder->as_string() == "group" || actorder->as_string() == "weight")) {
        out->act_order = actorder->as_string() == "group";
      } else {
        return unsupported(gw, ".weights.actorder: ", actorder->dump(), " is not supported (\"group\", \"weight\", null)");
      }
    }
    out->method = QuantMethod::kWeightOnly;
    if (w.strategy == "group") {
      if (w.group_size < 1) return invalid_argument(gw, ".weights.group_size: required by strategy \"group\"");
      out->weight_scale = WeightScaleLayout::kGroup;
      out->group_size = static_cast<int>(w.group_size);
    } else if (w.strategy == "channel") {
      out->weight_scale = WeightScaleLayout::kPerChannel;
    } else {
      return unsupported(gw, ".weights.strategy: \"", w.strategy, "\" is not supported for weight-only (group, channel)");
    }
    return Status::ok();
  }

  if (w.num_bits != 8 || a.num_bits != 8 || w.type != a.type) {
    return unsupported(gw, ": weights ", w.type, w.num_bits, " with activations ", a.type, a.num_bits,
                       " is not supported (fp8 x fp8 or int8 x int8)");
  }
  out->method = w.type == "float" ? QuantMethod::kFp8 : QuantMethod::kInt8;
  if (w.dynamic) return unsupported(gw, ".weights.dynamic: true is not supported (weights carry static scales)");
  if (w.strategy == "tensor") {
    out->weight_scale = WeightScaleLayout::kPerTensor;
  } else if (w.strategy == "channel") {
    out->weight_scale = WeightScaleLayout::kPerChannel;
  } else if (w.strategy == "block" && w.block_structure != nullptr) {
    const io::Json& b = *w.block_structure;
    if (!b.is_array() || b.size() != 2 || !b[0].is_integer() || !b[1].is_integer() || b[0].as_int() < 1 ||
        b[0].as_int() > kMaxBlock || b[1].as_int() < 1 || b[1].as_int() > kMaxBlock) {
      return invalid_argument(gw, ".weights.block_structure: expected [block_n, block_k] in [1, ", kMaxBlock, "], got ",
                              b.dump());
    }
    out->weight_scale = WeightScaleLayout::kBlock;
    out->block_n = static_cast<int>(b[0].as_int());
    out->block_k = static_cast<int>(b[1].as_int());
  } else {
    return unsupported(gw, ".weights.strategy: \"", w.strategy, "\" is not supported (tensor, channel, block)");
  }
  out->dynamic_activations = a.dynamic;
  if (a.strategy == "token" && a.dynamic) {
    out->activation_scale = ActivationScaleLayout::kPerToken;
  } else if (a.strategy == "tensor") {
    out->activation_scale = ActivationScaleLayout::kPerTensor;
  } else if (a.strategy == "group" && a.dynamic && a.group_size > 0) {
    out->activation_scale = ActivationScaleLayout::kPerTokenGroup;
    out->block_k = static_cast<int>(a.group_size);
  } else {
    return unsupported(gw, ".input_activations: strategy \"", a.strategy, "\"", a.dynamic ? " (dynamic)" : " (static)",
                       " is not supported (dynamic token, dynamic group, static or dynamic tensor)");
  }
  if (out->method == QuantMethod::kInt8 && out->activation_scale != ActivationScaleLayout::kPerToken) {
    return unsupported(gw, ".input_activations: INT8 W8A8 runs with dynamic per-token activations only (as vLLM)");
  }
  return Status::ok();
}

// Weight-only group sizes: a positive count, or -1 (GPTQ, AWQ) / absent for one group per row.
Status read_group_size(const io::Json& q, std::initializer_list<const char*> keys, std::string_view where,
                       QuantizationConfig* out) {
  for (const char* key : keys) {
    const io::Json* g = q.find(key);
    if (g == nullptr || g->is_null()) continue;
    if (!g->is_integer() || g->as_int() == 0 || g->as_int() < -1 || g->as_int() > kMaxBlock) {
      return invalid_argument(where, ".", key, ": expected -1 (per channel) or an integer in [1, ", kMaxBlock, "], got ", g->dump());
    }
    if (g->as_int() == -1) {
      out->weight_scale = WeightScaleLayout::kPerChannel;
    } else {
      out->weight_scale = WeightScaleLayout::kGroup;
      out->group_size = static_cast<int>(g->as_int());
    }
    return Status::ok();
  }
  out->weight_scale = WeightScaleLayout::kPerChannel;
  return Status::ok();
}

// The first of `keys` present, one of `allowed`.
Status read_bits(const io::Json& q, std::initializer_list<const char*> keys, std::string_view where,
                 std::initializer_list<int> allowed, QuantizationConfig* out) {
  for (const char* key : keys) {
    const io::Json* b = q.find(key);
    if (b == nullptr || b->is_null()) continue;
    for (int a : allowed) {
      if (b->is_integer() && b->as_int() == a) {
        out->weight_bits = a;
        return Status::ok();
      }
    }
    return unsupported(where, ".", key, ": ", b->dump(), " bits are not supported");
  }
  return invalid_argument(where, ".", *keys.begin(), ": required");
}

// `quant_method: gptq` (AutoGPTQ / GPTQModel; vLLM's GPTQConfig).
Status parse_gptq(const io::Json& q, std::string_view where, QuantizationConfig* out) {
  out->method = QuantMethod::kWeightOnly;
  MOE_RETURN_IF_ERROR(read_bits(q, {"bits"}, where, {4, 8}, out));
  MOE_RETURN_IF_ERROR(read_group_size(q, {"group_size"}, where, out));
  bool sym = true;
  MOE_RETURN_IF_ERROR(io::get_bool_or(q, "sym", true, &sym, where));
  MOE_RETURN_IF_ERROR(io::get_bool_or(q, "desc_act", false, &out->act_order, where));
  std::string format;
  MOE_RETURN_IF_ERROR(io::get_string_or(q, "checkpoint_format", "gptq", &format, where));
  if (format != "gptq" && format != "gptq_v2") {
    return unsupported(where, ".checkpoint_format: \"", format, "\" is not supported (gptq, gptq_v2)");
  }
  out->zero_points = !sym;
  out->gptq_zeros_minus_one = format == "gptq";
  return Status::ok();
}

// `quant_method: awq` (AutoAWQ's GEMM packing; vLLM's AWQConfig).
Status parse_awq(const io::Json& q, std::string_view where, QuantizationConfig* out) {
  out->method = QuantMethod::kWeightOnly;
  MOE_RETURN_IF_ERROR(read_bits(q, {"bits", "w_bit"}, where, {4}, out));
  MOE_RETURN_IF_ERROR(read_group_size(q, {"group_size", "q_group_size"}, where, out));
  MOE_RETURN_IF_ERROR(io::get_bool_or(q, "zero_point", true, &out->zero_points, where));
  std::string version;
  MOE_RETURN_IF_ERROR(io::get_string_or(q, "version", "gemm", &version, where));
  for (char& c : version) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (version != "gemm") return unsupported(where, ".version: \"", version, "\" is not supported (gemm packing)");
  return Status::ok();
}

const char* name(WeightScaleLayout l) {
  switch (l) {
    case WeightScaleLayout::kNone: return "none";
    case WeightScaleLayout::kPerTensor: return "per-tensor";
    case WeightScaleLayout::kPerChannel: return "per-channel";
    case WeightScaleLayout::kBlock: return "block";
    case WeightScaleLayout::kGroup: return "group";
  }
  return "?";
}

const char* name(ActivationScaleLayout l) {
  switch (l) {
    case ActivationScaleLayout::kNone: return "none";
    case ActivationScaleLayout::kPerTensor: return "per-tensor";
    case ActivationScaleLayout::kPerToken: return "per-token";
    case ActivationScaleLayout::kPerTokenGroup: return "per-token-group";
  }
  return "?";
}

}  // namespace

std::string QuantizationConfig::describe() const {
  std::ostringstream s;
  switch (method) {
    case QuantMethod::kNone: return "none (weights as stored)";
    case QuantMethod::kMxfp4: return "mxfp4 (E2M1, E8M0 scale per 32 along K; kept packed in bf16/f16, widened for f32)";
    case QuantMethod::kFp8: s << "fp8 e4m3 W8A8"; break;
    case QuantMethod::kInt8: s << "int8 W8A8"; break;
    case QuantMethod::kWeightOnly:
      s << "int" << weight_bits << " weight-only W" << weight_bits << "A16" << (zero_points ? " with zero points" : "")
        << (act_order ? ", act-order" : "");
      break;
  }
  s << " [" << quant_method << "], weight scales " << name(weight_scale);
  if (weight_scale == WeightScaleLayout::kBlock) s << " " << block_n << "x" << block_k;
  if (weight_scale == WeightScaleLayout::kGroup) s << " of " << group_size;
  if (method == QuantMethod::kFp8 || method == QuantMethod::kInt8) {
    s << ", activations " << (dynamic_activations ? "dynamic " : "static ") << name(activation_scale);
    if (activation_scale == ActivationScaleLayout::kPerTokenGroup) s << " of " << block_k;
  }
  return s.str();
}

Status parse_quantization_config(const io::Json& config, std::string_view where, QuantizationConfig* out) {
  QuantizationConfig q;
  const io::Json* qc = config.find("quantization_config");
  if (qc == nullptr || qc->is_null()) {
    *out = q;
    return Status::ok();
  }
  const std::string w = key_path(where, "quantization_config");
  if (!qc->is_object()) return invalid_argument(w, ": expected an object, got ", qc->dump());
  MOE_RETURN_IF_ERROR(io::get_string(*qc, "quant_method", &q.quant_method, w));
  if (q.quant_method == "mxfp4") {
    q.method = QuantMethod::kMxfp4;
    q.weight_bits = 4;
    q.weight_scale = WeightScaleLayout::kGroup;
    q.group_size = 32;
  } else if (q.quant_method == "fp8") {
    MOE_RETURN_IF_ERROR(parse_fp8(*qc, w, &q));
  } else if (q.quant_method == "compressed-tensors") {
    MOE_RETURN_IF_ERROR(parse_compressed_tensors(*qc, w, &q));
  } else if (q.quant_method == "gptq") {
    MOE_RETURN_IF_ERROR(parse_gptq(*qc, w, &q));
  } else if (q.quant_method == "awq") {
    MOE_RETURN_IF_ERROR(parse_awq(*qc, w, &q));
  } else {
    return unsupported(w, ".quant_method: \"", q.quant_method,
                       "\" is not supported (fp8, compressed-tensors, gptq, awq, mxfp4, or no quantization_config)");
  }
  *out = std::move(q);
  return Status::ok();
}

}  // namespace moe::layer
