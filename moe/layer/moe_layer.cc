#include "moe/layer/moe_layer.h"

#include <Eigen/Core>
#include <cmath>
#include <cstring>
#include <functional>
#include <set>
#include <sstream>

#include "moe/cpu/ops.h"
#include "moe/layer/weight_only_loader.h"
#include "moe/parallel/ep_all_to_all.h"

namespace moe::layer {
namespace {

// ---- element access on type-erased tensors ---------------------------------------------------

// Element i of a tensor as float. Through memcpy: a legal safetensors file may place a tensor at
// any byte offset (the header length need not be a multiple of 8), so the data can be misaligned.
float load_element(DType t, const void* base, Index i) {
  const auto* bytes = static_cast<const std::byte*>(base);
  switch (t) {
    case DType::kF32: {
      float v;
      std::memcpy(&v, bytes + i * 4, 4);
      return v;
    }
    case DType::kBF16:
    case DType::kF16: {
      std::uint16_t b;
      std::memcpy(&b, bytes + i * 2, 2);
      return t == DType::kBF16 ? bfloat16::to_float(b) : half::to_float(b);
    }
    default: return 0.0f;  // callers check the dtype first
  }
}

void store_element(Buffer& b, Index i, float v) {
  switch (b.dtype) {
    case DType::kF32: reinterpret_cast<float*>(b.bytes.data())[i] = v; break;
    case DType::kBF16: reinterpret_cast<bfloat16*>(b.bytes.data())[i] = bfloat16(v); break;
    case DType::kF16: reinterpret_cast<half*>(b.bytes.data())[i] = half(v); break;
    default: break;
  }
}

std::size_t element_size(DType t) {
  switch (t) {
    case DType::kF32:
    case DType::kI32: return 4;
    case DType::kBF16:
    case DType::kF16: return 2;
    case DType::kF8E4M3:
    case DType::kI8:
    case DType::kU8: return 1;
    default: return 0;  // the layer holds no other dtype
  }
}

Buffer make_buffer(DType dtype, std::vector<Index> shape) {
  Buffer b;
  b.dtype = dtype;
  Index n = 1;
  for (Index e : shape) n *= e;
  b.shape = std::move(shape);
  b.bytes.assign(static_cast<std::size_t>(n) * element_size(dtype), std::byte{0});
  return b;
}

std::string shape_string(const std::vector<Index>& s) { return detail::format_shape(s); }

// A checkpoint tensor of a float dtype and an exact shape, read element by element.
struct Source {
  AnyTensor t;
  std::vector<Index> stride;
  float operator()(Index i) const { return load_element(t.dtype, t.data, i); }
  float at(Index a, Index b) const { return (*this)(a * stride[0] + b); }
  float at(Index a, Index b, Index c) const { return (*this)(a * stride[0] + b * stride[1] + c); }
};

Status open_source(const io::Checkpoint& ckpt, const std::string& name, const std::vector<Index>& shape, Source* out,
                   bool allow_u8 = false) {
  AnyTensor t;
  MOE_RETURN_IF_ERROR(ckpt.tensor(name, &t));
  const bool float_type = t.dtype == DType::kF32 || t.dtype == DType::kBF16 || t.dtype == DType::kF16;
  if (!float_type && !(allow_u8 && t.dtype == DType::kU8)) {
    return invalid_argument("tensor ", name, ": expected dtype F32, BF16 or F16, got ", to_string(t.dtype));
  }
  if (t.extents != shape) {
    return invalid_argument("tensor ", name, ": expected shape ", shape_string(shape), ", got ", shape_string(t.extents));
  }
  out->t = t;
  out->stride.assign(shape.size(), 1);
  for (int d = static_cast<int>(shape.size()) - 2; d >= 0; --d) out->stride[d] = out->stride[d + 1] * shape[d + 1];
  return Status::ok();
}

// OCP MXFP4: 4-bit e2m1 codes, two per byte (low nibble = even element), one E8M0 scale per 32.
float mxfp4_value(const std::uint8_t* blocks, const std::uint8_t* scales, Index row, Index col, Index cols) {
  static constexpr float kLut[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  const Index group = col / 32, within = col % 32;
  const std::uint8_t byte = blocks[(row * (cols / 32) + group) * 16 + within / 2];
  const int code = (within % 2 == 0) ? (byte & 0x0f) : (byte >> 4);
  const int exponent = static_cast<int>(scales[row * (cols / 32) + group]) - 127;
  return std::ldexp(kLut[code], exponent);
}

// ---- W8A8 checkpoints ----------------------------------------------------------------------------
//
// How a quantized Linear `<name>` is stored (value = code * scale):
//   quant_method fp8 (DeepSeek-V3, Qwen3-FP8): `.weight` F8_E4M3 [N, K] and `.weight_scale_inv` f32
//     [ceil(N/128), ceil(K/128)], one scale per 128x128 block; without weight_block_size,
//     `.weight_scale` [1] and `.input_scale` [1] (static activations);
//   compressed-tensors: `.weight` F8_E4M3 or I8 [N, K] and `.weight_scale` [N, 1] (channel), [1]
//     (tensor) or [ceil(N/128), ceil(K/128)] (block), plus `.input_scale` [1] with static
//     activations.
// The codes are kept (half the bytes of bf16) and the scales repacked into the scheme's layout
// (moe/quant/w8a8.h). A tensor-parallel rank takes rows (gate, up) or columns (down) [i0, i0 + It)
// of the intermediate dimension: exact for channel and tensor scales, and for blocks when i0 is a
// multiple of 128 (refused otherwise). Per-tensor gate and up scales are merged as vLLM does: the
// larger one for both, the other half's codes re-quantized to it; static input scales are the
// largest over the rank's experts.
constexpr Index kScaleBlock = 128;

struct QuantFormat {
  DType codes = DType::kF8E4M3;
  const char* scale_suffix = ".weight_scale_inv";
  WeightScaleLayout layout = WeightScaleLayout::kBlock;
  bool static_inputs = false;
  std::string scheme;  // scheme_key of the CPU kernel
};

// The stored format and kernel of a runnable quantization_config (QuantizationConfig::runnable).
QuantFormat quant_format_of(const QuantizationConfig& q) {
  QuantFormat f;
  f.codes = q.method == QuantMethod::kInt8 ? DType::kI8 : DType::kF8E4M3;
  // vLLM's Fp8 method names block scales weight_scale_inv, others weight_scale (compressed-tensors too).
  f.scale_suffix = q.quant_method == "fp8" && q.weight_scale == WeightScaleLayout::kBlock ? ".weight_scale_inv" : ".weight_scale";
  f.layout = q.weight_scale;
  f.static_inputs = !q.dynamic_activations;
  if (q.method == QuantMethod::kInt8) f.scheme = scheme_key<quant::Int8PerTokenChannel>();
  else if (q.weight_scale == WeightScaleLayout::kBlock) f.scheme = scheme_key<quant::Fp8Block<128, 128>>();
  else if (q.weight_scale == WeightScaleLayout::kPerChannel) f.scheme = scheme_key<quant::Fp8PerTokenChannel>();
  else f.scheme = scheme_key<quant::Fp8PerTensor>();
  return f;
}

struct QuantLinear {
  AnyTensor codes;  // [N, K]
  Source scale;     // per QuantFormat::layout
  Source input_scale;
};

using OpenFloat = std::function<Status(const std::string&, const std::vector<Index>&, Source*)>;

Status open_quant_linear(const OpenFloat& open_float, std::set<std::string>& used, const io::Checkpoint& ckpt,
                         const QuantFormat& f, const std::string& name, Index N, Index K, QuantLinear* out) {
  used.insert(name + ".weight");
  MOE_RETURN_IF_ERROR(ckpt.tensor(name + ".weight", &out->codes));
  if (out->codes.dtype != f.codes) {
    return invalid_argument("tensor ", name, ".weight: expected dtype ", f.codes == DType::kI8 ? "I8" : "F8_E4M3",
                            " (quantization_config), got ", to_string(out->codes.dtype));
  }
  if (out->codes.extents != std::vector<Index>{N, K}) {
    return invalid_argument("tensor ", name, ".weight: expected shape ", shape_string({N, K}), ", got ",
                            shape_string(out->codes.extents));
  }
  std::vector<Index> scale_shape{1};
  if (f.layout == WeightScaleLayout::kBlock) {
    scale_shape = {(N + kScaleBlock - 1) / kScaleBlock, (K + kScaleBlock - 1) / kScaleBlock};
  } else if (f.layout == WeightScaleLayout::kPerChannel) {
    scale_shape = {N, 1};
  }
  MOE_RETURN_IF_ERROR(open_float(name + f.scale_suffix, scale_shape, &out->scale));
  Index scales = 1;
  for (Index e : scale_shape) scales *= e;
  for (Index i = 0; i < scales; ++i) {
    const float v = out->scale(i);
    if (!(v > 0.0f) || !std::isfinite(v)) {
      return invalid_argument("tensor ", name, f.scale_suffix, ": expected finite positive scales, got ", v, " at ", i);
    }
  }
  if (f.static_inputs) {
    MOE_RETURN_IF_ERROR(open_float(name + ".input_scale", {1}, &out->input_scale));
    const float v = out->input_scale(0);
    if (!(v > 0.0f) || !std::isfinite(v)) return invalid_argument("tensor ", name, ".input_scale: expected a finite positive scale, got ", v);
  }
  return Status::ok();
}

std::uint8_t code_at(const QuantLinear& l, Index r, Index c) {
  return static_cast<const std::uint8_t*>(l.codes.data)[r * l.codes.extents[1] + c];
}

// The scale tensors' shapes of `local` experts of n intermediate rows per rank.
std::vector<Index> w13_scale_shape(const QuantFormat& f, Index local, Index n, Index H) {
  if (f.layout == WeightScaleLayout::kBlock) return {local, 2 * ((n + kScaleBlock - 1) / kScaleBlock), (H + kScaleBlock - 1) / kScaleBlock};
  if (f.layout == WeightScaleLayout::kPerChannel) return {local, 2 * n, 1};
  return {local, 1, 1};
}
std::vector<Index> w2_scale_shape(const QuantFormat& f, Index local, Index n, Index H) {
  if (f.layout == WeightScaleLayout::kBlock) return {local, (H + kScaleBlock - 1) / kScaleBlock, (n + kScaleBlock - 1) / kScaleBlock};
  if (f.layout == WeightScaleLayout::kPerChannel) return {local, H, 1};
  return {local, 1, 1};
}

// One expert's slice [r0, r0 + n) of the intermediate dimension: gate and up rows into w13
// [2n, H] ([gate; up]), down columns into w2 [H, n], and their scales into s13 / s2 in the shapes
// above (a gated w13's blocks per half: quant::Fp8Block's layout).
void copy_quant_expert(const QuantFormat& f, const QuantLinear& gate, const QuantLinear& up, const QuantLinear& down,
                       Index r0, Index n, Index H, std::uint8_t* w13, std::uint8_t* w2, float* s13, float* s2) {
  // Per-tensor: one scale for both halves, the larger; the other half re-quantized to it.
  const float sg = gate.scale(0), su = up.scale(0), merged = std::max(sg, su);
  const bool per_tensor = f.layout == WeightScaleLayout::kPerTensor;
  const auto requantized = [&](std::uint8_t code, float from) {
    if (!per_tensor || from == merged) return code;
    return float8_e4m3::from_float(float8_e4m3::to_float(code) * (from / merged));
  };
  for (Index i = 0; i < n; ++i)
    for (Index h = 0; h < H; ++h) {
      w13[i * H + h] = requantized(code_at(gate, r0 + i, h), sg);
      w13[(n + i) * H + h] = requantized(code_at(up, r0 + i, h), su);
    }
  for (Index h = 0; h < H; ++h)
    for (Index i = 0; i < n; ++i) w2[h * n + i] = code_at(down, h, r0 + i);
  if (per_tensor) {
    s13[0] = merged;
    s2[0] = down.scale(0);
  } else if (f.layout == WeightScaleLayout::kPerChannel) {
    for (Index i = 0; i < n; ++i) {
      s13[i] = gate.scale.at(r0 + i, 0);
      s13[n + i] = up.scale.at(r0 + i, 0);
    }
    for (Index h = 0; h < H; ++h) s2[h] = down.scale.at(h, 0);
  } else {
    const Index nb = (n + kScaleBlock - 1) / kScaleBlock, nbH = (H + kScaleBlock - 1) / kScaleBlock, b0 = r0 / kScaleBlock;
    for (Index b = 0; b < nb; ++b)
      for (Index c = 0; c < nbH; ++c) {
        s13[b * nbH + c] = gate.scale.at(b0 + b, c);
        s13[(nb + b) * nbH + c] = up.scale.at(b0 + b, c);
      }
    for (Index r = 0; r < nbH; ++r)
      for (Index b = 0; b < nb; ++b) s2[r * nb + b] = down.scale.at(r, b0 + b);
  }
}

// ---- weight-only checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized) ------------------
//
// Each Linear is unpacked and repacked into moe/quant/weight_only.h's layout by
// moe/layer/weight_only_loader.h, which documents the stored formats. A tensor-parallel rank takes
// rows [i0, i0 + It) of gate and up and those columns of down: exact where the columns form whole
// groups (i0 a multiple of group_size without act-order), refused otherwise.
struct ExpertNames {
  std::string gate, up, down;
};

class WeightOnlyLoad {
 public:
  WeightOnlyLoad() = default;
  WeightOnlyLoad(const QuantizationConfig& q, const ParallelLayout& par) : q_(&q), par_(par) {}
  Index group_size() const { return q_->weight_scale == WeightScaleLayout::kGroup ? q_->group_size : 0; }
  // Without zero points the codes are stored two's complement (pack_weight_only_expert): the form
  // the Hopper prefill GEMM converts fastest.
  bool signed_codes() const { return !q_->zero_points; }
  std::string scheme() const { return q_->weight_bits == 4 ? scheme_key<quant::W4A16>() : scheme_key<quant::W8A16>(); }

  // The scheme's tensors for `L` experts of `m` intermediate rows.
  void allocate(Index L, Index m, Index H, MoeLayer::SchemeBuffers* b) const {
    const Index G = group_size();
    const Index g13 = quant::W4A16::groups(H, G), g2 = quant::W4A16::groups(m, G);
    b->w13_scale = make_buffer(DType::kF32, {L, 2 * m, g13});
    b->w2_scale = make_buffer(DType::kF32, {L, H, g2});
    if (q_->zero_points) {
      b->w13_zero = make_buffer(DType::kU8, {L, 2 * m, g13});
      b->w2_zero = make_buffer(DType::kU8, {L, H, g2});
    }
    if (q_->act_order) b->w13_k_order = make_buffer(DType::kI32, {L, H});
  }

  // The expert `prefix` ("...experts.3.") into slot `local` of the buffers: intermediate rows
  // [i0, i0 + m) of I.
  Status expert(const io::Checkpoint& ckpt, const std::string& prefix, const ExpertNames& names, Index I, Index H,
                Index i0, Index m, Index local, std::set<std::string>* used, Buffer* w13, Buffer* w2,
                MoeLayer::SchemeBuffers* b) {
    IntLinear gate, up, down;
    MOE_RETURN_IF_ERROR(read_int_linear(ckpt, *q_, prefix + names.gate, I, H, used, &gate));
    MOE_RETURN_IF_ERROR(read_int_linear(ckpt, *q_, prefix + names.up, I, H, used, &up));
    MOE_RETURN_IF_ERROR(read_int_linear(ckpt, *q_, prefix + names.down, H, I, used, &down));
    const Index pack = 8 / q_->weight_bits, G = group_size();
    const Index g13 = quant::W4A16::groups(H, G), g2 = quant::W4A16::groups(m, G);
    const auto at = [](Buffer& buf, Index offset) { return reinterpret_cast<std::uint8_t*>(buf.bytes.data()) + offset; };
    scratch_order_.resize(static_cast<std::size_t>(H));
    WeightOnlyExpertOut out{};
    out.w13 = at(*w13, local * 2 * m * (H / pack));
    out.w2 = at(*w2, local * H * (m / pack));
    out.s13 = reinterpret_cast<float*>(b->w13_scale.bytes.data()) + local * 2 * m * g13;
    out.s2 = reinterpret_cast<float*>(b->w2_scale.bytes.data()) + local * H * g2;
    if (q_->zero_points) {
      out.z13 = at(b->w13_zero, local * 2 * m * g13);
      out.z2 = at(b->w2_zero, local * H * g2);
    }
    out.k_order = q_->act_order ? reinterpret_cast<std::int32_t*>(b->w13_k_order.bytes.data()) + local * H
                                : scratch_order_.data();
    out.signed_codes = signed_codes();  // the one rule, also the layer's quant.signed_codes
    std::string what = prefix.substr(0, prefix.size() - 1);
    if (par_.tp_size > 1) what += " (tp_rank " + std::to_string(par_.tp_rank) + " of tp_size " + std::to_string(par_.tp_size) + ")";
    bool ordered = false;
    MOE_RETURN_IF_ERROR(pack_weight_only_expert(gate, up, down, i0, m, q_->weight_bits, G, what, out, &ordered));
    any_ordered_ = any_ordered_ || ordered;
    return Status::ok();
  }

  // Drops a K order that is the identity for every expert (no permutation pass at run time).
  void finish(MoeLayer::SchemeBuffers* b) const {
    if (!any_ordered_) b->w13_k_order = Buffer{};
  }

 private:
  const QuantizationConfig* q_ = nullptr;
  ParallelLayout par_;
  bool any_ordered_ = false;
  std::vector<std::int32_t> scratch_order_;
};

// gate/up/down of one expert as float, already sliced to this tensor-parallel rank.
struct ExpertWeights {
  std::vector<float> gate, up;  // [It, H]
  std::vector<float> down;      // [H, It]
  std::vector<float> gate_bias, up_bias, down_bias;  // [It], [It], [H] (gpt-oss)
};

// The EPLB placement a layout asks for, checked against the layer: vLLM's constraints (linear
// placement, physical experts divisible by the EP ranks) and no zero experts.
Status eplb_placement_for(const ParallelLayout& par, Index E, Index Z, parallel::EplbPlacement* out) {
  if (par.ep_size < 1) return invalid_argument("ep_size: expected >= 1, got ", par.ep_size);
  if (par.redundant_experts < 0) return invalid_argument("redundant_experts: expected >= 0, got ", par.redundant_experts);
  if (par.redundant_experts > E * 64) {
    return invalid_argument("redundant_experts: ", par.redundant_experts, " is more than 64 replicas per expert (", E, " experts)");
  }
  if (par.placement != ExpertPlacement::kLinear) {
    return invalid_argument("placement: EPLB places physical experts linearly (as vLLM); round_robin is not supported with it");
  }
  if (Z > 0) return unsupported("EPLB: a layer with zero experts (num_zero_experts ", Z, ") is not supported");
  const Index P = par.physical_to_logical.empty() ? E + par.redundant_experts : static_cast<Index>(par.physical_to_logical.size());
  if (P != E + par.redundant_experts) {
    return invalid_argument("physical_to_logical: expected num_experts + redundant_experts = ", E + par.redundant_experts,
                            " entries, got ", P);
  }
  if (P % par.ep_size != 0) {
    return invalid_argument("redundant_experts: the ", P, " physical experts must divide evenly over ep_size ", par.ep_size);
  }
  if (par.physical_to_logical.empty()) return parallel::EplbPlacement::initial(E, P, out);
  return parallel::EplbPlacement::from_physical_to_logical(E, par.physical_to_logical, out);
}

}  // namespace

Status MoeLayer::load(const ModelConfig& config, const ParallelLayout& par, DType dtype, const io::Checkpoint& ckpt,
                      const std::string& prefix, MoeLayer* out) {
  if (dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kF16) {
    return invalid_argument("dtype: expected f32, bf16 or f16, got ", to_string(dtype));
  }
  const QuantizationConfig& quant = config.quantization;
  if (!quant.runnable()) {
    return unsupported("config.quantization_config: ", quant.describe(),
                       " is not supported by this build yet (it runs unquantized, gpt-oss MXFP4, FP8 with 128x128 "
                       "blocks, per-channel or static per-tensor scales, and INT8 per-channel checkpoints); refused "
                       "rather than run the quantized tensors as if they were unscaled");
  }
  const bool w8a8 = quant.method == QuantMethod::kFp8 || quant.method == QuantMethod::kInt8;  // runnable() ones
  const bool weight_only = quant.method == QuantMethod::kWeightOnly;
  const QuantFormat qf = w8a8 ? quant_format_of(quant) : QuantFormat{};
  if ((w8a8 || weight_only) && (config.expert_layout != ExpertLayout::kPerExpertLinear || config.expert_biases)) {
    return unsupported("config.quantization_config: ", w8a8 ? "W8A8" : "weight-only",
                       " experts are read for per-expert Linear layouts (experts.{e}.<gate|up|down>_proj) without "
                       "biases; ", config.architecture_name, " stores them otherwise");
  }
  if (weight_only && dtype == DType::kF32) {
    return unsupported("dtype: weight-only checkpoints (", quant.describe(),
                       ") run with bf16 or f16 activations, as vLLM's; got f32");
  }
  if (par.tp_size < 1 || par.tp_rank < 0 || par.tp_rank >= par.tp_size) {
    return invalid_argument("tp_rank: expected 0 <= tp_rank < tp_size=", par.tp_size, ", got ", par.tp_rank);
  }
  const Index H = config.hidden, I = config.intermediate, E = config.num_experts;
  if (I % par.tp_size != 0) {
    return invalid_argument("tp_size: the expert intermediate size ", I, " is not divisible by tp_size=", par.tp_size);
  }
  if (config.shared_intermediate % par.tp_size != 0) {
    return invalid_argument("tp_size: the shared expert intermediate size ", config.shared_intermediate,
                            " is not divisible by tp_size=", par.tp_size);
  }
  if (w8a8 && qf.layout == WeightScaleLayout::kBlock && par.tp_size > 1 &&
      ((I / par.tp_size) % kScaleBlock != 0 || (config.shared_intermediate / par.tp_size) % kScaleBlock != 0)) {
    return unsupported("tp_size: ", par.tp_size, " splits the intermediate size ", I, " (shared ", config.shared_intermediate,
                       ") into slices that cut through the 128x128 scale blocks (weight_block_size); use a "
                       "tp_size whose slices are multiples of 128");
  }
  const Index pack = weight_only ? 8 / quant.weight_bits : 1;  // codes per stored byte along K
  if (weight_only && (H % pack != 0 || (I / par.tp_size) % pack != 0 || (config.shared_intermediate / par.tp_size) % pack != 0)) {
    return unsupported("config.quantization_config: ", quant.weight_bits, "-bit codes are stored ", pack,
                       " per byte along K; hidden size ", H, " and the per-rank intermediate sizes ", I / par.tp_size,
                       " (shared ", config.shared_intermediate / par.tp_size, ") must be multiples of ", pack);
  }
  const Index Z = config.num_zero_experts;
  if (Z < 0) return invalid_argument("num_zero_experts: expected >= 0, got ", Z);
  const bool all_to_all = par.dispatch != EpDispatch::kPartialSums;
  if (all_to_all) {  // ep_forward's ownership: rank r holds ids [r * n, (r + 1) * n)
    if (par.tp_size != 1) {
      return unsupported("dispatch: the all-to-all dispatch replaces tensor parallelism of the experts (as vLLM's all2all "
                         "backends); expected tp_size 1, got ", par.tp_size);
    }
    if (par.ep_size < 1 || par.ep_rank < 0 || par.ep_rank >= par.ep_size) {
      return invalid_argument("ep_rank: expected 0 <= ep_rank < ep_size=", par.ep_size, ", got ", par.ep_rank);
    }
    if (!par.eplb() && (par.placement != ExpertPlacement::kLinear || E % par.ep_size != 0)) {
      return invalid_argument("dispatch: the all-to-all dispatch needs every rank to own an equal contiguous range of experts: "
                              "linear placement with num_experts (", E, ") divisible by ep_size (", par.ep_size,
                              "), or EPLB; got ", par.placement == ExpertPlacement::kLinear ? "linear" : "round_robin",
                              " placement");
    }
  }
  // The experts this rank loads: (logical expert, local slot) pairs; the expert map is over the
  // ids the kernel sees (logical, or physical under EPLB).
  ExpertMap em;
  std::optional<Eplb> eplb;
  std::vector<std::pair<Index, Index>> slots;
  if (par.eplb()) {
    eplb.emplace();
    MOE_RETURN_IF_ERROR(eplb_placement_for(par, E, Z, &eplb->placement));
    const Index P = eplb->placement.num_physical;
    eplb->load.assign(static_cast<std::size_t>(P), 0);
    MOE_RETURN_IF_ERROR(determine_expert_map(par.ep_size, par.ep_rank, P, ExpertPlacement::kLinear, &em));
    if (em.map.empty()) {  // one rank: every physical expert is local
      for (Index q = 0; q < P; ++q) em.map.push_back(static_cast<std::int32_t>(q));
    }
    for (Index q = 0; q < P; ++q) {
      if (em.map[q] >= 0) slots.emplace_back(eplb->placement.physical_to_logical[q], em.map[q]);
    }
  } else {
    MOE_RETURN_IF_ERROR(determine_expert_map(par.ep_size, par.ep_rank, E, par.placement, &em));
    for (Index g = 0; g < E; ++g) {
      const Index local = em.map.empty() ? g : em.map[g];
      if (local >= 0) slots.emplace_back(g, local);
    }
  }

  MoeLayer l;
  l.config_ = config;
  l.parallel_ = par;
  l.dtype_ = dtype;
  l.local_experts_ = em.num_local_experts;
  l.expert_map_ = em.map;
  l.eplb_ = std::move(eplb);
  if (Z > 0) {  // routing covers E + Z experts; the zero experts never reach the kernel
    if (l.expert_map_.empty()) {
      for (Index g = 0; g < E; ++g) l.expert_map_.push_back(static_cast<std::int32_t>(g));
    }
    l.expert_map_.resize(static_cast<std::size_t>(E + Z), -1);
  }
  l.intermediate_tp_ = I / par.tp_size;
  const Index It = l.intermediate_tp_;
  const Index i0 = par.tp_rank * It;  // first intermediate index of this rank

  // The block prefix: "<prefix>.<module>" when the router lives there, else `prefix` itself.
  const std::string with_module = prefix + "." + config.module;
  l.block_prefix_ = ckpt.contains(prefix + "." + config.router_weight) ? prefix : with_module;
  const std::string& p = l.block_prefix_;
  // Every tensor opened, so that what the block holds but the config leaves unused is caught.
  std::set<std::string> used;
  const auto open = [&](const std::string& name, const std::vector<Index>& shape, Source* src, bool allow_u8 = false) {
    used.insert(name);
    return open_source(ckpt, name, shape, src, allow_u8);
  };

  // Router (fp32), router bias, correction bias.
  Source s;
  const Index ER = E + Z;  // router rows: real and zero experts
  MOE_RETURN_IF_ERROR(open(p + "." + config.router_weight, {ER, H}, &s));
  l.router_.resize(static_cast<std::size_t>(ER * H));
  for (Index i = 0; i < ER * H; ++i) l.router_[i] = s(i);
  if (config.router_bias) {
    MOE_RETURN_IF_ERROR(open(p + ".router.bias", {ER}, &s));
    for (Index i = 0; i < ER; ++i) l.router_bias_.push_back(s(i));
  }
  if (config.correction_bias) {
    MOE_RETURN_IF_ERROR(open(p + ".gate.e_score_correction_bias", {ER}, &s));
    for (Index i = 0; i < ER; ++i) l.correction_bias_.push_back(s(i));
  }

  // Routed experts.
  const bool interleaved = gate_up_layout(config.activation) == GateUpLayout::kInterleaved;
  const Index L = l.local_experts_;
  // gpt-oss's MXFP4 stays packed in bf16 and f16 layers (moe/quant/mxfp4.h: the checkpoint's blocks
  // and E8M0 scales as they are, this rank's rows and whole 32-blocks of columns); f32 layers widen it.
  const std::string fused = p + ".experts.";
  const bool mxfp4 = config.expert_layout == ExpertLayout::kFusedInterleaved && !ckpt.contains(fused + "gate_up_proj") &&
                     ckpt.contains(fused + "gate_up_proj_blocks");
  const bool packed_mxfp4 = mxfp4 && dtype != DType::kF32;
  if (packed_mxfp4 && !interleaved) {
    return unsupported("config: MXFP4 experts store gate and up rows interleaved; activation ", config.activation,
                       " takes them split");
  }
  if (packed_mxfp4 && It % quant::Mxfp4::kBlock != 0) {
    return unsupported("tp_size: MXFP4 experts are kept packed with one scale per 32 intermediate columns; the per-rank "
                       "intermediate size ", It, " must be a multiple of 32");
  }
  const Index code_pack = packed_mxfp4 ? quant::Mxfp4::kPack : pack;
  const DType weight_dtype = w8a8 ? qf.codes : (weight_only || packed_mxfp4) ? DType::kU8 : dtype;
  l.w13_ = make_buffer(weight_dtype, {L, 2 * It, H / code_pack});
  l.w2_ = make_buffer(weight_dtype, {L, H, It / code_pack});
  if (packed_mxfp4) {
    l.weight_scheme_ = scheme_key<quant::Mxfp4>();
    l.routed_quant_.w13_scale = make_buffer(DType::kU8, {L, 2 * It, H / quant::Mxfp4::kBlock});
    l.routed_quant_.w2_scale = make_buffer(DType::kU8, {L, H, It / quant::Mxfp4::kBlock});
  }
  const OpenFloat open_float = [&](const std::string& name, const std::vector<Index>& shape, Source* src) {
    return open(name, shape, src);
  };
  Index s13_per_expert = 0, s2_per_expert = 0;
  float a13 = 0.0f, a2 = 0.0f;  // static input scales: the largest over this rank's experts
  if (w8a8) {
    l.weight_scheme_ = qf.scheme;
    l.routed_quant_.w13_scale = make_buffer(DType::kF32, w13_scale_shape(qf, L, It, H));
    l.routed_quant_.w2_scale = make_buffer(DType::kF32, w2_scale_shape(qf, L, It, H));
    s13_per_expert = L > 0 ? static_cast<Index>(l.routed_quant_.w13_scale.bytes.size() / sizeof(float)) / L : 0;
    s2_per_expert = L > 0 ? static_cast<Index>(l.routed_quant_.w2_scale.bytes.size() / sizeof(float)) / L : 0;
  }
  WeightOnlyLoad wo;
  if (weight_only) {
    wo = WeightOnlyLoad(quant, par);
    l.weight_scheme_ = wo.scheme();
    l.group_size_ = wo.group_size();
    l.signed_codes_ = wo.signed_codes();
    wo.allocate(L, It, H, &l.routed_quant_);
  }
  if (config.expert_biases) {
    l.w13_bias_ = make_buffer(dtype, {L, 2 * It});
    if (par.tp_rank == 0) l.w2_bias_ = make_buffer(dtype, {L, H});  // added once across TP ranks
  }
  // Fused tensors are opened once.
  Source gate_up, down, gate_up_bias, down_bias, gu_blocks, gu_scales, dn_blocks, dn_scales;
  if (config.expert_layout != ExpertLayout::kPerExpertLinear) {
    const std::string& e = fused;
    if (mxfp4) {
      if (H % 32 != 0 || I % 32 != 0) return invalid_argument("MXFP4 experts need H and I divisible by 32");
      MOE_RETURN_IF_ERROR(open(e + "gate_up_proj_blocks", {E, 2 * I, H / 32, 16}, &gu_blocks, true));
      MOE_RETURN_IF_ERROR(open(e + "gate_up_proj_scales", {E, 2 * I, H / 32}, &gu_scales, true));
      MOE_RETURN_IF_ERROR(open(e + "down_proj_blocks", {E, H, I / 32, 16}, &dn_blocks, true));
      MOE_RETURN_IF_ERROR(open(e + "down_proj_scales", {E, H, I / 32}, &dn_scales, true));
      const std::pair<const Source*, const char*> u8s[] = {{&gu_blocks, "gate_up_proj_blocks"}, {&gu_scales, "gate_up_proj_scales"},
                                                           {&dn_blocks, "down_proj_blocks"}, {&dn_scales, "down_proj_scales"}};
      for (const auto& [src, name] : u8s) {
        if (src->t.dtype != DType::kU8) {
          return invalid_argument("tensor ", e, name, ": expected dtype U8 (MXFP4), got ", to_string(src->t.dtype));
        }
      }
    } else {
      MOE_RETURN_IF_ERROR(open(e + "gate_up_proj", {E, H, 2 * I}, &gate_up));
      MOE_RETURN_IF_ERROR(open(e + "down_proj", {E, I, H}, &down));
    }
    if (config.expert_biases) {
      MOE_RETURN_IF_ERROR(open(e + "gate_up_proj_bias", {E, 2 * I}, &gate_up_bias));
      MOE_RETURN_IF_ERROR(open(e + "down_proj_bias", {E, H}, &down_bias));
    }
  }

  // Expert g's biases ([E, 2I] interleaved in the checkpoint) into slot `local`, this rank's rows.
  const auto store_biases = [&](Index g, Index local) {
    if (!config.expert_biases) return;
    for (Index i = 0; i < It; ++i) {
      const Index gate_row = interleaved ? 2 * i : i, up_row = interleaved ? 2 * i + 1 : It + i;
      store_element(l.w13_bias_, local * 2 * It + gate_row, gate_up_bias.at(g, 2 * (i0 + i)));
      store_element(l.w13_bias_, local * 2 * It + up_row, gate_up_bias.at(g, 2 * (i0 + i) + 1));
    }
    if (par.tp_rank == 0) {
      for (Index h = 0; h < H; ++h) store_element(l.w2_bias_, local * H + h, down_bias.at(g, h));
    }
  };
  ExpertWeights w;
  std::vector<bool> loaded(static_cast<std::size_t>(E), false);
  for (const auto& [g, local] : slots) {
    loaded[static_cast<std::size_t>(g)] = true;
    if (weight_only) {  // codes unpacked, sliced and repacked into moe/quant/weight_only.h's layout
      const std::string e = p + ".experts." + std::to_string(g) + ".";
      MOE_RETURN_IF_ERROR(wo.expert(ckpt, e, {config.gate_name, config.up_name, config.down_name}, I, H, i0, It, local,
                                    &used, &l.w13_, &l.w2_, &l.routed_quant_));
      continue;
    }
    if (w8a8) {  // codes and scales kept, sliced to this rank
      const std::string e = p + ".experts." + std::to_string(g) + ".";
      QuantLinear gl, ul, dl;
      MOE_RETURN_IF_ERROR(open_quant_linear(open_float, used, ckpt, qf, e + config.gate_name, I, H, &gl));
      MOE_RETURN_IF_ERROR(open_quant_linear(open_float, used, ckpt, qf, e + config.up_name, I, H, &ul));
      MOE_RETURN_IF_ERROR(open_quant_linear(open_float, used, ckpt, qf, e + config.down_name, H, I, &dl));
      copy_quant_expert(qf, gl, ul, dl, i0, It, H, reinterpret_cast<std::uint8_t*>(l.w13_.bytes.data()) + local * 2 * It * H,
                        reinterpret_cast<std::uint8_t*>(l.w2_.bytes.data()) + local * H * It,
                        reinterpret_cast<float*>(l.routed_quant_.w13_scale.bytes.data()) + local * s13_per_expert,
                        reinterpret_cast<float*>(l.routed_quant_.w2_scale.bytes.data()) + local * s2_per_expert);
      if (qf.static_inputs) {
        a13 = std::max({a13, gl.input_scale(0), ul.input_scale(0)});
        a2 = std::max(a2, dl.input_scale(0));
      }
      continue;
    }
    if (packed_mxfp4) {  // rows [2 i0, 2 (i0 + It)) of gate_up (interleaved), columns [i0, i0 + It) of down
      const auto bytes = [](const Source& src) { return static_cast<const std::uint8_t*>(src.t.data); };
      const auto out = [](Buffer& b) { return reinterpret_cast<std::uint8_t*>(b.bytes.data()); };
      const Index row13 = H / 2, scales13 = H / 32, row2 = I / 2, scales2 = I / 32;
      std::memcpy(out(l.w13_) + local * 2 * It * row13, bytes(gu_blocks) + (g * 2 * I + 2 * i0) * row13, 2 * It * row13);
      std::memcpy(out(l.routed_quant_.w13_scale) + local * 2 * It * scales13, bytes(gu_scales) + (g * 2 * I + 2 * i0) * scales13,
                  2 * It * scales13);
      for (Index h = 0; h < H; ++h) {
        std::memcpy(out(l.w2_) + (local * H + h) * (It / 2), bytes(dn_blocks) + (g * H + h) * row2 + i0 / 2, It / 2);
        std::memcpy(out(l.routed_quant_.w2_scale) + (local * H + h) * (It / 32), bytes(dn_scales) + (g * H + h) * scales2 + i0 / 32,
                    It / 32);
      }
      store_biases(g, local);
      continue;
    }
    w.gate.assign(It * H, 0.0f);
    w.up.assign(It * H, 0.0f);
    w.down.assign(H * It, 0.0f);
    switch (config.expert_layout) {
      case ExpertLayout::kPerExpertLinear: {
        const std::string e = p + ".experts." + std::to_string(g) + ".";
        Source gs, us, ds;
        MOE_RETURN_IF_ERROR(open(e + config.gate_name + ".weight", {I, H}, &gs));
        MOE_RETURN_IF_ERROR(open(e + config.up_name + ".weight", {I, H}, &us));
        MOE_RETURN_IF_ERROR(open(e + config.down_name + ".weight", {H, I}, &ds));
        for (Index i = 0; i < It; ++i)
          for (Index h = 0; h < H; ++h) {
            w.gate[i * H + h] = gs.at(i0 + i, h);
            w.up[i * H + h] = us.at(i0 + i, h);
          }
        for (Index h = 0; h < H; ++h)
          for (Index i = 0; i < It; ++i) w.down[h * It + i] = ds.at(h, i0 + i);
        break;
      }
      case ExpertLayout::kFusedGateUp:  // [E, H, 2I]: gate = [..., :I], up = [..., I:]
        for (Index i = 0; i < It; ++i)
          for (Index h = 0; h < H; ++h) {
            w.gate[i * H + h] = gate_up.at(g, h, i0 + i);
            w.up[i * H + h] = gate_up.at(g, h, I + i0 + i);
          }
        for (Index h = 0; h < H; ++h)
          for (Index i = 0; i < It; ++i) w.down[h * It + i] = down.at(g, i0 + i, h);
        break;
      case ExpertLayout::kFusedInterleaved:  // gate = [..., 0::2], up = [..., 1::2]
        if (mxfp4) {
          const auto* gb = static_cast<const std::uint8_t*>(gu_blocks.t.data) + g * 2 * I * (H / 32) * 16;
          const auto* gsc = static_cast<const std::uint8_t*>(gu_scales.t.data) + g * 2 * I * (H / 32);
          const auto* db = static_cast<const std::uint8_t*>(dn_blocks.t.data) + g * H * (I / 32) * 16;
          const auto* dsc = static_cast<const std::uint8_t*>(dn_scales.t.data) + g * H * (I / 32);
          for (Index i = 0; i < It; ++i)
            for (Index h = 0; h < H; ++h) {
              w.gate[i * H + h] = mxfp4_value(gb, gsc, 2 * (i0 + i), h, H);
              w.up[i * H + h] = mxfp4_value(gb, gsc, 2 * (i0 + i) + 1, h, H);
            }
          for (Index h = 0; h < H; ++h)
            for (Index i = 0; i < It; ++i) w.down[h * It + i] = mxfp4_value(db, dsc, h, i0 + i, I);
        } else {
          for (Index i = 0; i < It; ++i)
            for (Index h = 0; h < H; ++h) {
              w.gate[i * H + h] = gate_up.at(g, h, 2 * (i0 + i));
              w.up[i * H + h] = gate_up.at(g, h, 2 * (i0 + i) + 1);
            }
          for (Index h = 0; h < H; ++h)
            for (Index i = 0; i < It; ++i) w.down[h * It + i] = down.at(g, i0 + i, h);
        }
        break;
    }
    // Pack into w13 ([gate; up] or interleaved) and w2.
    for (Index i = 0; i < It; ++i) {
      const Index gate_row = interleaved ? 2 * i : i, up_row = interleaved ? 2 * i + 1 : It + i;
      for (Index h = 0; h < H; ++h) {
        store_element(l.w13_, (local * 2 * It + gate_row) * H + h, w.gate[i * H + h]);
        store_element(l.w13_, (local * 2 * It + up_row) * H + h, w.up[i * H + h]);
      }
    }
    for (Index h = 0; h < H * It; ++h) store_element(l.w2_, local * H * It + h, w.down[h]);
    store_biases(g, local);
  }

  if (weight_only) wo.finish(&l.routed_quant_);
  if (w8a8 && qf.static_inputs) {
    l.routed_quant_.a13_scale = make_buffer(DType::kF32, {1});
    l.routed_quant_.a2_scale = make_buffer(DType::kF32, {1});
    store_element(l.routed_quant_.a13_scale, 0, L > 0 ? a13 : 1.0f);  // no local expert: never read
    store_element(l.routed_quant_.a2_scale, 0, L > 0 ? a2 : 1.0f);
  }

  // Shared expert(s): one dense gated MLP, split over TP like the experts; under EP on rank 0
  // only (partial sums), or on every rank for its own tokens (all-to-all).
  if (config.shared_intermediate > 0 && (par.ep_rank == 0 || all_to_all)) {
    const Index S = config.shared_intermediate, St = S / par.tp_size, s0 = par.tp_rank * St;
    const std::string e = p + "." + config.shared_prefix + ".";
    Source gs, us, ds;
    if (weight_only) {  // as the routed experts: one expert of St rows
      l.shared_tp_ = St;
      l.shared_w13_ = make_buffer(DType::kU8, {1, 2 * St, H / pack});
      l.shared_w2_ = make_buffer(DType::kU8, {1, H, St / pack});
      WeightOnlyLoad shared(quant, par);
      shared.allocate(1, St, H, &l.shared_quant_);
      MOE_RETURN_IF_ERROR(shared.expert(ckpt, e, {"gate_proj", "up_proj", "down_proj"}, S, H, s0, St, 0, &used,
                                        &l.shared_w13_, &l.shared_w2_, &l.shared_quant_));
      shared.finish(&l.shared_quant_);
    } else if (w8a8) {  // as the routed experts: one expert of St rows
      QuantLinear gl, ul, dl;
      MOE_RETURN_IF_ERROR(open_quant_linear(open_float, used, ckpt, qf, e + "gate_proj", S, H, &gl));
      MOE_RETURN_IF_ERROR(open_quant_linear(open_float, used, ckpt, qf, e + "up_proj", S, H, &ul));
      MOE_RETURN_IF_ERROR(open_quant_linear(open_float, used, ckpt, qf, e + "down_proj", H, S, &dl));
      l.shared_tp_ = St;
      l.shared_w13_ = make_buffer(qf.codes, {1, 2 * St, H});
      l.shared_w2_ = make_buffer(qf.codes, {1, H, St});
      l.shared_quant_.w13_scale = make_buffer(DType::kF32, w13_scale_shape(qf, 1, St, H));
      l.shared_quant_.w2_scale = make_buffer(DType::kF32, w2_scale_shape(qf, 1, St, H));
      copy_quant_expert(qf, gl, ul, dl, s0, St, H, reinterpret_cast<std::uint8_t*>(l.shared_w13_.bytes.data()),
                        reinterpret_cast<std::uint8_t*>(l.shared_w2_.bytes.data()),
                        reinterpret_cast<float*>(l.shared_quant_.w13_scale.bytes.data()),
                        reinterpret_cast<float*>(l.shared_quant_.w2_scale.bytes.data()));
      if (qf.static_inputs) {
        l.shared_quant_.a13_scale = make_buffer(DType::kF32, {1});
        l.shared_quant_.a2_scale = make_buffer(DType::kF32, {1});
        store_element(l.shared_quant_.a13_scale, 0, std::max(gl.input_scale(0), ul.input_scale(0)));
        store_element(l.shared_quant_.a2_scale, 0, dl.input_scale(0));
      }
    } else {
    MOE_RETURN_IF_ERROR(open(e + "gate_proj.weight", {S, H}, &gs));
    MOE_RETURN_IF_ERROR(open(e + "up_proj.weight", {S, H}, &us));
    MOE_RETURN_IF_ERROR(open(e + "down_proj.weight", {H, S}, &ds));
    l.shared_tp_ = St;
    l.shared_w13_ = make_buffer(dtype, {1, 2 * St, H});
    l.shared_w2_ = make_buffer(dtype, {1, H, St});
    for (Index i = 0; i < St; ++i)
      for (Index h = 0; h < H; ++h) {
        store_element(l.shared_w13_, i * H + h, gs.at(s0 + i, h));
        store_element(l.shared_w13_, (St + i) * H + h, us.at(s0 + i, h));
      }
    for (Index h = 0; h < H; ++h)
      for (Index i = 0; i < St; ++i) store_element(l.shared_w2_, h * St + i, ds.at(h, s0 + i));
    }
    if (config.shared_expert_gate) {
      MOE_RETURN_IF_ERROR(open(p + ".shared_expert_gate.weight", {1, H}, &gs));
      for (Index h = 0; h < H; ++h) l.shared_gate_.push_back(gs(h));
    }
  }
  // A tensor of the block that the config does not use (a shared expert with n_shared_experts 0,
  // say) would be ignored silently: an error naming it. Other ranks' experts are not ours to load.
  const std::string scope = p + ".";
  for (const std::string& name : ckpt.names()) {
    if (name.compare(0, scope.size(), scope) != 0 || used.count(name)) continue;
    const std::string rest = name.substr(scope.size());
    // The shared expert is the config's but computed on expert-parallel rank 0 only.
    const bool shared = config.shared_intermediate > 0 && (rest.rfind(config.shared_prefix + ".", 0) == 0 ||
                                                         (config.shared_expert_gate && rest == "shared_expert_gate.weight"));
    if (shared) continue;
    if (rest.rfind("experts.", 0) == 0) {
      const std::string idx = rest.substr(8, rest.find('.', 8) - 8);
      const bool numbered = !idx.empty() && idx.find_first_not_of("0123456789") == std::string::npos && idx.size() < 10;
      if (numbered) {
        const Index g = std::stoll(idx);
        const bool local = g < E && loaded[static_cast<std::size_t>(g)];
        if (!local) continue;
      }
    }
    return invalid_argument("tensor ", name, ": in the MoE block ", p, " but unused by the config (",
                            config.architecture_name, "); a tensor the layer would ignore is an error");
  }
  *out = std::move(l);
  return Status::ok();
}

namespace {

template <class Policy>
Status route(const RoutingParams& rp, HostView<const float, 2> logits, int top_k, const std::vector<float>& bias,
             HostView<std::int32_t, 2> ids, HostView<float, 2> weights) {
  const typename Policy::Arguments a = routing_arguments<Policy>(rp);
  std::optional<HostView<const float, 1>> b;
  if (!bias.empty()) b = HostView<const float, 1>(bias.data(), {static_cast<Index>(bias.size())});
  return cpu::select_experts<Policy>(logits, top_k, a, b, ids, weights);
}


// The checks of a forward's hidden states, and the router logits bound (copied when the file
// placed them at an odd offset).
Status bind_forward_inputs(const AnyTensor& hidden, const std::optional<AnyTensor>& router_logits, Index H, Index E,
                           HostView<const float, 2>* given_logits, std::vector<float>* aligned_logits) {
  if (hidden.extents.size() != 2 || hidden.extents[1] != H) {
    return invalid_argument("hidden_states: expected shape [M, H=", H, "], got ", shape_string(hidden.extents));
  }
  if (hidden.dtype != DType::kF32 && hidden.dtype != DType::kBF16 && hidden.dtype != DType::kF16) {
    return invalid_argument("hidden_states: expected dtype f32, bf16 or f16, got ", to_string(hidden.dtype));
  }
  if (!hidden.strides.empty()) return invalid_argument("hidden_states: expected a contiguous tensor");
  if (!router_logits) return Status::ok();
  AnyTensor lt = *router_logits;
  if (lt.dtype == DType::kF32 && lt.strides.empty() && reinterpret_cast<std::uintptr_t>(lt.data) % alignof(float) != 0) {
    Index n = 1;
    for (Index e : lt.extents) n *= e;
    aligned_logits->resize(static_cast<std::size_t>(n));
    std::memcpy(aligned_logits->data(), lt.data, aligned_logits->size() * sizeof(float));
    lt.data = aligned_logits->data();
  }
  MOE_RETURN_IF_ERROR(bind(lt, "router_logits", given_logits));
  if (given_logits->extent(0) != hidden.extents[0] || given_logits->extent(1) != E) {
    return invalid_argument("router_logits: expected shape [M=", hidden.extents[0], ", E=", E, "], got ",
                            shape_string(router_logits->extents));
  }
  return Status::ok();
}

// f.template operator()<IO>() for the IO type of `dtype` (f32, bf16 or f16).
template <class F>
Status visit_io(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32: return f.template operator()<float>();
    case DType::kBF16: return f.template operator()<bfloat16>();
    case DType::kF16: return f.template operator()<half>();
    default: return invalid_argument("dtype ", to_string(dtype), ": expected f32, bf16 or f16");
  }
}

}  // namespace

Status MoeLayer::forward(const AnyTensor& hidden, const std::optional<AnyTensor>& router_logits, Result* out,
                         const cpu::Options& options, KernelFinder find) const {
  const Index H = config_.hidden;
  const int k = config_.top_k;
  HostView<const float, 2> given_logits;
  std::vector<float> aligned_logits;
  MOE_RETURN_IF_ERROR(bind_forward_inputs(hidden, router_logits, H, routed_experts_total(), &given_logits, &aligned_logits));
  if (options.chunk_tokens < 1) return invalid_argument("options.chunk_tokens: expected >= 1, got ", options.chunk_tokens);
  if (parallel_.dispatch != EpDispatch::kPartialSums) {
    return invalid_argument("forward: this layer's layout dispatches by all-to-all; call forward_all_to_all with its EP group");
  }
  const Index M = hidden.extents[0];
  Result r;
  r.output = make_buffer(dtype_, {M, H});
  r.topk_ids.resize(static_cast<std::size_t>(M * k));
  r.topk_weights.resize(static_cast<std::size_t>(M * k));
  // Chunks of tokens bound the memory of the per-token temporaries (input copies, logits).
  for (Index m0 = 0; m0 < M; m0 += options.chunk_tokens) {
    const Index m1 = std::min(M, m0 + options.chunk_tokens);
    MOE_RETURN_IF_ERROR(forward_chunk(hidden, router_logits ? &given_logits : nullptr, m0, m1, &r, options, find));
  }
  *out = std::move(r);
  return Status::ok();
}

Status MoeLayer::forward_all_to_all(parallel::Communicator& comm, Index max_tokens_per_rank, const AnyTensor& hidden,
                                    const std::optional<AnyTensor>& router_logits, Result* out, const cpu::Options& options,
                                    KernelFinder find) const {
  if (parallel_.dispatch == EpDispatch::kPartialSums) {
    return invalid_argument("forward_all_to_all: this layer's layout dispatches by partial sums (ParallelLayout::dispatch); "
                            "call forward");
  }
  if (comm.size() != parallel_.ep_size || comm.rank() != parallel_.ep_rank) {
    return invalid_argument("forward_all_to_all: expected the group of the ", parallel_.ep_size,
                            " EP ranks with this layer as rank ", parallel_.ep_rank, ", got rank ", comm.rank(), " of ",
                            comm.size());
  }
  const Index H = config_.hidden;
  const int k = config_.top_k;
  HostView<const float, 2> given_logits;
  std::vector<float> aligned_logits;
  MOE_RETURN_IF_ERROR(bind_forward_inputs(hidden, router_logits, H, routed_experts_total(), &given_logits, &aligned_logits));
  const Index M = hidden.extents[0];
  if (max_tokens_per_rank < M) {
    return invalid_argument("max_tokens_per_rank: ", max_tokens_per_rank, " is below this rank's ", M,
                            " tokens; expected every rank's token count or more");
  }
  if (config_.weight_on_input && k != 1) {
    return invalid_argument("top_k: apply_router_weight_on_input is defined only for top_k == 1, got top_k=", k);
  }
  if (resident_) find = resident_->find;  // resident weights run on the device registry
  ForwardFn local = nullptr;
  MOE_RETURN_IF_ERROR(find({config_.activation, dtype_, false, weight_scheme_}, &local));
  parallel::EpConfig ep;
  ep.experts_per_rank = eplb_ ? eplb_->placement.num_physical / parallel_.ep_size : local_experts_;
  ep.mode = parallel_.dispatch == EpDispatch::kAllToAllLowLatency ? parallel::DispatchMode::kLowLatency
                                                                   : parallel::DispatchMode::kNormal;
  ep.max_tokens_per_rank = max_tokens_per_rank;

  // The rows the EP group sends here, grouped by local expert: one call of this rank's kernel with
  // each row as a token routed to its expert with weight 1, so that the kernel's finalize,
  // IO(IO(1 * y)), hands back the expert's output y unchanged for the combine to weight.
  const auto run_rows = [&]<class IO>(const ExpertRows<IO, HostSpace>& rows) -> Status {
    const Index total = rows.input.extent(0), experts = rows.seg_begin.extent(0);
    Index R = 0;
    for (Index e = 0; e < experts; ++e) R += rows.seg_count(e);
    if (R == 0) return Status::ok();
    // Compact segments (the normal mode) run in place; the low-latency layout's padding rows have
    // no expert, which the kernel's ids may not say, so its real rows are gathered first.
    const bool in_place = R == total;
    std::vector<IO> in, y;
    if (!in_place) {
      in.resize(static_cast<std::size_t>(R * H));
      y.resize(static_cast<std::size_t>(R * H));
    }
    std::vector<std::int32_t> ids(static_cast<std::size_t>(R));
    for (Index e = 0, i = 0; e < experts; ++e) {
      for (Index t = 0; t < rows.seg_count(e); ++t, ++i) {
        if (!in_place) std::memcpy(&in[i * H], &rows.input(rows.seg_begin(e) + t, 0), static_cast<std::size_t>(H) * sizeof(IO));
        ids[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(e);
      }
    }
    std::vector<float> ones(static_cast<std::size_t>(R), 1.0f);
    ForwardRequest req;
    req.hidden_states = AnyTensor{in_place ? const_cast<IO*>(rows.input.data()) : in.data(), dtype_, {R, H}, {}};  // read only
    req.topk_ids = AnyTensor{ids.data(), DType::kI32, {R, 1}, {}};
    req.topk_weights = AnyTensor{ones.data(), DType::kF32, {R, 1}, {}};
    req.top_k = 1;
    bind_routed_weights(&req, nullptr, /*with_expert_map=*/false);  // the ids are local
    req.activation = config_.activation_params;
    req.output = AnyTensor{in_place ? rows.output.data() : y.data(), dtype_, {R, H}, {}};
    req.options = options;
    MOE_RETURN_IF_ERROR(local(req));
    for (Index e = 0, i = 0; e < experts && !in_place; ++e) {
      for (Index t = 0; t < rows.seg_count(e); ++t, ++i) {
        std::memcpy(&rows.output(rows.seg_begin(e) + t, 0), &y[i * H], static_cast<std::size_t>(H) * sizeof(IO));
      }
    }
    return Status::ok();
  };
  // Ids past the routed experts (zero experts) are outside [0, ranks * n): ep_forward leaves them
  // here, and forward_chunk adds them.
  const RoutedExperts routed = [&](const Buffer& x, const std::int32_t* ids, const float* weights, Buffer* y) -> Status {
    return visit_io(dtype_, [&]<class IO>() -> Status {
      const IO* rows = reinterpret_cast<const IO*>(x.bytes.data());
      // apply_router_weight_on_input (top_k 1): the row is scaled here, before it travels, with
      // the kernel's own roundings (IO(x * IO(w)), moe/cpu/prepare_finalize_stage.h), and combined
      // with weight 1, so the expert's rank runs the plain kernel and the bits stay one rank's.
      std::vector<IO> scaled;
      std::vector<float> ones;
      if (config_.weight_on_input) {
        scaled.resize(static_cast<std::size_t>(M * H));
        for (Index m = 0; m < M; ++m) {
          const float w = round_to<IO>(weights[m]);
          for (Index c = 0; c < H; ++c) scaled[m * H + c] = from_float<IO>(to_float(rows[m * H + c]) * w);
        }
        rows = scaled.data();
        ones.assign(static_cast<std::size_t>(M), 1.0f);
        weights = ones.data();
      }
      parallel::EpTokens<IO> tokens;
      tokens.hidden = HostView<const IO, 2>(rows, {M, H});
      tokens.topk_ids = HostView<const std::int32_t, 2>(ids, {M, Index{k}});
      tokens.topk_weights = HostView<const float, 2>(weights, {M, Index{k}});
      const parallel::LocalExperts<IO> experts = [&](const ExpertRows<IO, HostSpace>& rows) { return run_rows(rows); };
      return parallel::ep_forward<IO>(comm, ep, tokens, experts, HostView<IO, 2>(reinterpret_cast<IO*>(y->bytes.data()), {M, H}));
    });
  };
  Result r;
  r.output = make_buffer(dtype_, {M, H});
  r.topk_ids.resize(static_cast<std::size_t>(M * k));
  r.topk_weights.resize(static_cast<std::size_t>(M * k));
  MOE_RETURN_IF_ERROR(forward_chunk(hidden, router_logits ? &given_logits : nullptr, 0, M, &r, options, find, &routed));
  *out = std::move(r);
  return Status::ok();
}

void MoeLayer::bind_routed_weights(ForwardRequest* req, std::vector<std::int32_t>* map_storage, bool with_expert_map) const {
  if (resident_) {
    req->w13 = resident_->w13;
    req->w2 = resident_->w2;
    req->w13_bias = resident_->w13_bias;
    req->w2_bias = resident_->w2_bias;
    if (with_expert_map) req->expert_map = resident_->expert_map;
    req->quant = resident_->quant;
    req->weights_on_device = true;
    return;
  }
  req->w13 = w13_.tensor();
  req->w2 = w2_.tensor();
  req->quant = routed_quant_.tensors(group_size_, signed_codes_);
  if (!w13_bias_.shape.empty()) req->w13_bias = w13_bias_.tensor();
  if (!w2_bias_.shape.empty()) req->w2_bias = w2_bias_.tensor();
  if (with_expert_map && !expert_map_.empty()) {
    *map_storage = expert_map_;  // AnyTensor holds a mutable pointer
    req->expert_map = AnyTensor{map_storage->data(), DType::kI32, {static_cast<Index>(map_storage->size())}, {}};
  }
}

Status MoeLayer::forward_chunk(const AnyTensor& hidden, const HostView<const float, 2>* given_logits, Index m0, Index m1,
                               Result* r, const cpu::Options& options, KernelFinder find,
                               const RoutedExperts* routed_override) const {
  if (resident_) find = resident_->find;  // resident weights run on the device registry
  const Index H = config_.hidden, E = routed_experts_total(), M = m1 - m0;
  const int k = config_.top_k;
  const std::size_t elem = element_size(dtype_);
  // Inputs: float (router) and compute-dtype (experts) copies.
  std::vector<float> xf(static_cast<std::size_t>(M * H));
  for (Index i = 0; i < M * H; ++i) xf[i] = load_element(hidden.dtype, hidden.data, m0 * H + i);
  Buffer x = make_buffer(dtype_, {M, H});
  for (Index i = 0; i < M * H; ++i) store_element(x, i, xf[i]);

  // Router logits in fp32.
  std::vector<float> logits(static_cast<std::size_t>(M * E));
  if (given_logits) {  // through the view's strides: a column slice of a wider buffer is fine
    for (Index m = 0; m < M; ++m)
      for (Index e = 0; e < E; ++e) logits[m * E + e] = (*given_logits)(m0 + m, e);
  } else if (M > 0) {
    using RM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    Eigen::Map<RM> lg(logits.data(), M, E);
    lg.noalias() = Eigen::Map<const RM>(xf.data(), M, H) * Eigen::Map<const RM>(router_.data(), E, H).transpose();
    if (!router_bias_.empty()) lg.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(router_bias_.data(), E);
  }

  std::int32_t* id_ptr = r->topk_ids.data() + m0 * k;
  float* w_ptr = r->topk_weights.data() + m0 * k;
  const HostView<const float, 2> lv(logits.data(), {M, E});
  const HostView<std::int32_t, 2> ids(id_ptr, {M, k});
  const HostView<float, 2> wts(w_ptr, {M, k});
  MOE_RETURN_IF_ERROR(visit_policy(BuiltRoutings{}, "routing", config_.routing, [&]<class R>() {
    return route<R>(config_.routing_params, lv, k, correction_bias_, ids, wts);
  }));

  // Routed experts: the ids the kernel sees are physical under EPLB, chosen per token and counted
  // per physical expert.
  std::vector<std::int32_t> physical;
  const std::int32_t* kernel_ids = id_ptr;
  if (eplb_) {
    const parallel::EplbPlacement& pl = eplb_->placement;
    physical.resize(static_cast<std::size_t>(M * k));
    MOE_RETURN_IF_ERROR(cpu::eplb_logical_to_physical(
        HostView<const std::int32_t, 2>(id_ptr, {M, k}),
        HostView<const std::int32_t, 2>(pl.logical_to_physical.data(), {pl.num_logical, pl.max_replicas}),
        HostView<const std::int32_t, 1>(pl.replica_count.data(), {pl.num_logical}), pl.num_physical, ReplicaChoice::kTokenHash,
        HostView<std::int32_t, 2>(physical.data(), {M, k}), HostView<std::int64_t, 1>(eplb_->load.data(), {pl.num_physical})));
    kernel_ids = physical.data();
  }
  Buffer y = make_buffer(dtype_, {M, H});
  if (routed_override) {
    MOE_RETURN_IF_ERROR((*routed_override)(x, kernel_ids, w_ptr, &y));
  } else {  // this rank's experts; zero experts and other ranks' experts map to -1
    ForwardFn routed = nullptr;
    MOE_RETURN_IF_ERROR(find({config_.activation, dtype_, config_.weight_on_input, weight_scheme_}, &routed));
    ForwardRequest req;
    req.hidden_states = x.tensor();
    req.topk_ids = AnyTensor{const_cast<std::int32_t*>(kernel_ids), DType::kI32, {M, k}, {}};
    req.topk_weights = AnyTensor{w_ptr, DType::kF32, {M, k}, {}};
    req.top_k = k;
    std::vector<std::int32_t> map;
    bind_routed_weights(&req, &map, /*with_expert_map=*/true);
    req.activation = config_.activation_params;
    req.output = y.tensor();
    req.options = options;
    MOE_RETURN_IF_ERROR(routed(req));
  }
  std::vector<float> total(static_cast<std::size_t>(M * H));
  for (Index i = 0; i < M * H; ++i) total[i] = load_element(dtype_, y.bytes.data(), i);

  // Shared expert: weight 1, or sigmoid(shared_expert_gate . x) (Qwen2-MoE).
  if (shared_tp_ > 0 && M > 0) {
    ForwardFn shared = nullptr;
    MOE_RETURN_IF_ERROR(find({std::string(SiluAndMul::kName), dtype_, false, weight_scheme_}, &shared));
    std::vector<std::int32_t> zero_ids(static_cast<std::size_t>(M), 0);
    std::vector<float> gate(static_cast<std::size_t>(M), 1.0f);
    if (!shared_gate_.empty()) {
      for (Index m = 0; m < M; ++m) {
        double s = 0;
        for (Index h = 0; h < H; ++h) s += static_cast<double>(xf[m * H + h]) * shared_gate_[h];
        gate[m] = static_cast<float>(1.0 / (1.0 + std::exp(-s)));
      }
    }
    Buffer so = make_buffer(dtype_, {M, H});
    ForwardRequest sr;
    sr.hidden_states = x.tensor();
    sr.topk_ids = AnyTensor{zero_ids.data(), DType::kI32, {M, 1}, {}};
    sr.topk_weights = AnyTensor{gate.data(), DType::kF32, {M, 1}, {}};
    sr.top_k = 1;
    sr.w13 = resident_ ? resident_->shared_w13 : shared_w13_.tensor();
    sr.w2 = resident_ ? resident_->shared_w2 : shared_w2_.tensor();
    sr.quant = resident_ ? resident_->shared_quant : shared_quant_.tensors(group_size_, signed_codes_);
    sr.weights_on_device = resident_ != nullptr;
    sr.output = so.tensor();
    sr.options = options;
    MOE_RETURN_IF_ERROR(shared(sr));
    for (Index i = 0; i < M * H; ++i) total[i] += load_element(dtype_, so.bytes.data(), i);
  }
  // Zero ("identity") experts: slot weight times the input, once (tp and ep rank 0; all-to-all:
  // every rank, for its own tokens).
  if (config_.num_zero_experts > 0 && parallel_.tp_rank == 0 &&
      (parallel_.ep_rank == 0 || parallel_.dispatch != EpDispatch::kPartialSums)) {
    for (Index m = 0; m < M; ++m) {
      for (int j = 0; j < k; ++j) {
        if (id_ptr[m * k + j] < config_.num_experts) continue;
        const float w = w_ptr[m * k + j];
        for (Index h = 0; h < H; ++h) total[m * H + h] += w * load_element(dtype_, x.bytes.data(), m * H + h);
      }
    }
  }
  // One rounding of the sum into the result rows [m0, m1).
  Buffer rows{dtype_, {M, H}, {}};
  rows.bytes.resize(static_cast<std::size_t>(M * H) * elem);
  for (Index i = 0; i < M * H; ++i) store_element(rows, i, total[i]);
  if (M > 0) {  // a rank with no tokens still comes here for the all-to-all's collectives
    std::memcpy(r->output.bytes.data() + static_cast<std::size_t>(m0 * H) * elem, rows.bytes.data(), rows.bytes.size());
  }
  return Status::ok();
}

SchemeTensors MoeLayer::SchemeBuffers::tensors(Index group_size, bool signed_codes) const {
  SchemeTensors t;
  t.group_size = group_size;
  t.signed_codes = signed_codes;
  const Buffer* held[SchemeTensors::kTensors];  // in SchemeTensors::each's order, as SchemeBuffers::each visits them
  int n = 0;
  SchemeBuffers::each(*this, [&](const Buffer& b) { held[n++] = &b; });
  int i = 0;
  SchemeTensors::each(t, [&](const char*, std::optional<AnyTensor>& v) {
    const Buffer* b = held[i++];
    if (!b->shape.empty()) v = b->tensor();
  });
  return t;
}

Status MoeLayer::make_resident(UploadFn upload, KernelFinder device_find) {
  {  // the device registry must run this layer's experts (a quantized f32 layer, say, it does not)
    ForwardFn fn = nullptr;
    MOE_RETURN_IF_ERROR(device_find({config_.activation, dtype_, config_.weight_on_input, weight_scheme_}, &fn));
  }
  auto r = std::make_shared<Resident>();
  auto put = [&](const void* data, std::size_t bytes, DType dtype, const std::vector<Index>& shape, AnyTensor* out) {
    std::shared_ptr<void> mem;
    MOE_RETURN_IF_ERROR(upload(data, bytes, &mem));
    *out = AnyTensor{mem.get(), dtype, shape, {}};
    r->memory.push_back(std::move(mem));
    return Status::ok();
  };
  auto put_buffer = [&](const Buffer& b, AnyTensor* out) { return put(b.bytes.data(), b.bytes.size(), b.dtype, b.shape, out); };
  MOE_RETURN_IF_ERROR(put_buffer(w13_, &r->w13));
  MOE_RETURN_IF_ERROR(put_buffer(w2_, &r->w2));
  if (!w13_bias_.shape.empty()) MOE_RETURN_IF_ERROR(put_buffer(w13_bias_, &r->w13_bias.emplace()));
  if (!w2_bias_.shape.empty()) MOE_RETURN_IF_ERROR(put_buffer(w2_bias_, &r->w2_bias.emplace()));
  if (!expert_map_.empty()) {
    MOE_RETURN_IF_ERROR(put(expert_map_.data(), expert_map_.size() * sizeof(std::int32_t), DType::kI32,
                            {static_cast<Index>(expert_map_.size())}, &r->expert_map.emplace()));
  }
  if (shared_tp_ > 0) {
    MOE_RETURN_IF_ERROR(put_buffer(shared_w13_, &r->shared_w13));
    MOE_RETURN_IF_ERROR(put_buffer(shared_w2_, &r->shared_w2));
  }
  // The scheme's tensors: the host views, each replaced by its device copy.
  const auto put_scheme = [&](const SchemeBuffers& b, SchemeTensors* out) {
    *out = b.tensors(group_size_, signed_codes_);
    Status st = Status::ok();
    SchemeTensors::each(*out, [&](const char*, std::optional<AnyTensor>& t) {
      if (!st.is_ok() || !t) return;
      const AnyTensor host = *t;
      Index n = 1;
      for (Index e : host.extents) n *= e;
      st = put(host.data, static_cast<std::size_t>(n) * element_size(host.dtype), host.dtype, host.extents, &*t);
    });
    return st;
  };
  MOE_RETURN_IF_ERROR(put_scheme(routed_quant_, &r->quant));
  if (shared_tp_ > 0) MOE_RETURN_IF_ERROR(put_scheme(shared_quant_, &r->shared_quant));
  r->find = device_find;
  resident_ = std::move(r);
  return Status::ok();
}

std::size_t MoeLayer::weight_bytes() const {
  std::size_t n = 0;
  for (const Buffer* b : {&w13_, &w2_, &w13_bias_, &w2_bias_, &shared_w13_, &shared_w2_}) n += b->bytes.size();
  for (const SchemeBuffers* q : {&routed_quant_, &shared_quant_}) {
    SchemeBuffers::each(*q, [&](const Buffer& b) { n += b.bytes.size(); });
  }
  return n;
}

std::string MoeLayer::describe() const {
  std::ostringstream os;
  const ModelConfig& c = config_;
  os << "architecture      " << c.architecture_name << "\n"
     << "block             " << block_prefix_ << "\n"
     << "dtype             " << to_string(dtype_) << "\n"
     << "quantization      " << c.quantization.describe() << "\n"
     << "expert weights    " << weight_bytes() << " bytes on this rank (as stored: codes and scales)\n"
     << "hidden            " << c.hidden << "\n"
     << "experts           " << c.num_experts << " (top_k " << c.top_k << ")\n"
     << "intermediate      " << c.intermediate << " per expert, " << intermediate_tp_ << " on this rank\n"
     << "routing           " << c.routing << " (renormalize " << (c.routing_params.renormalize ? "yes" : "no")
     << ", routed_scaling_factor " << c.routing_params.routed_scaling_factor;
  if (routes_by_group(c.routing)) {
    os << ", groups " << c.routing_params.num_expert_group << ", topk_group " << c.routing_params.topk_group;
  }
  os << (c.correction_bias ? ", correction bias" : "") << (c.router_bias ? ", router bias" : "") << ")\n"
     << "activation        " << c.activation
     << (c.activation == SwigluOai::kName ? " (alpha " + std::to_string(c.activation_params.swiglu_alpha) +
                                                          ", limit " + std::to_string(c.activation_params.swiglu_limit) + ")"
                                                    : std::string())
     << "\n"
     << "prepare/finalize  standard" << (c.weight_on_input ? ", router weight on input" : "") << "\n"
     << "expert biases     " << (c.expert_biases ? "yes" : "no") << "\n"
     << "zero experts      " << c.num_zero_experts << (c.num_zero_experts > 0 ? " (identity)" : "") << "\n"
     << "shared expert     ";
  if (c.shared_intermediate > 0) {
    os << c.shared_intermediate << " intermediate" << (c.shared_expert_gate ? ", sigmoid gate" : "")
       << (shared_tp_ > 0 ? ", computed on this rank" : ", on ep rank 0") << "\n";
  } else {
    os << "none\n";
  }
  os << "parallel          tp " << parallel_.tp_rank << "/" << parallel_.tp_size << ", ep " << parallel_.ep_rank << "/"
     << parallel_.ep_size << " ("
     << (parallel_.placement == ExpertPlacement::kLinear ? "linear" : "round_robin") << "), " << local_experts_
     << " local experts, "
     << (parallel_.dispatch == EpDispatch::kPartialSums ? "partial sums"
         : parallel_.dispatch == EpDispatch::kAllToAll  ? "all-to-all dispatch"
                                                        : "low-latency all-to-all dispatch")
     << "\n";
  if (eplb_) {
    os << "eplb              " << eplb_->placement.num_physical << " physical experts ("
       << eplb_->placement.num_physical - eplb_->placement.num_logical << " redundant), token-hash replicas\n";
  }
  os << "kernel            " << KernelKey{c.activation, dtype_, c.weight_on_input, weight_scheme_}.to_string()
     << "\n";
  return os.str();
}

Status MoeLayer::move_experts(parallel::Communicator& comm, const parallel::ExpertMoves& moves,
                              const parallel::EplbPlacement& next) {
  if (!eplb_) return invalid_argument("move_experts: this layer was loaded without EPLB (ParallelLayout::redundant_experts)");
  if (resident_) return unsupported("move_experts: the weights are resident on the device; rebalance before make_resident");
  if (!routed_quant_.a13_scale.shape.empty() || !routed_quant_.a2_scale.shape.empty()) {
    return unsupported("move_experts: static activation scales are the largest of the rank's experts; moving experts "
                       "would leave them stale");
  }
  const Index n = local_experts_;
  if (comm.size() != parallel_.ep_size || comm.rank() != parallel_.ep_rank) {
    return invalid_argument("move_experts: expected the group of the ", parallel_.ep_size, " EP ranks with this layer as rank ",
                            parallel_.ep_rank, ", got rank ", comm.rank(), " of ", comm.size());
  }
  if (next.num_logical != eplb_->placement.num_logical || next.num_physical != eplb_->placement.num_physical ||
      moves.ranks != parallel_.ep_size || moves.experts_per_rank != n) {
    return invalid_argument("move_experts: the new placement has ", next.num_logical, " logical and ", next.num_physical,
                            " physical experts over ", moves.ranks, " ranks; this layer has ", eplb_->placement.num_logical, ", ",
                            eplb_->placement.num_physical, " and ", parallel_.ep_size);
  }
  // Every per-expert buffer (leading dimension: the local experts), in one order on every rank.
  std::vector<Buffer*> per_expert = {&w13_, &w2_, &w13_bias_, &w2_bias_};
  SchemeBuffers::each(routed_quant_, [&](Buffer& b) { per_expert.push_back(&b); });
  std::vector<Buffer> moved;
  for (Buffer* b : per_expert) {
    if (b->shape.empty()) continue;
    if (b->shape[0] != n || b->bytes.size() % static_cast<std::size_t>(n) != 0) {
      return make_status(StatusCode::kInternal, "move_experts: a buffer of shape ", shape_string(b->shape), " is not per local expert (", n, ")");
    }
    Buffer next_buffer{b->dtype, b->shape, std::vector<std::byte>(b->bytes.size())};
    MOE_RETURN_IF_ERROR(parallel::move_expert_weights(comm, moves, b->bytes.size() / static_cast<std::size_t>(n), b->bytes,
                                                      next_buffer.bytes));
    moved.push_back(std::move(next_buffer));
  }
  // Every collective succeeded: commit.
  std::size_t i = 0;
  for (Buffer* b : per_expert) {
    if (!b->shape.empty()) *b = std::move(moved[i++]);
  }
  eplb_->placement = next;
  reset_expert_load();
  return Status::ok();
}

}  // namespace moe::layer
