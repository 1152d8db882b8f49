#include "moe/layer/weight_only_loader.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "moe/quant/numeric.h"

namespace moe::layer {
namespace {

std::string shape_string(const std::vector<Index>& s) { return detail::format_shape(s); }

// A checkpoint tensor of one of `dtypes` and an exact shape; its name joins `used`.
Status open_exact(const io::Checkpoint& ckpt, const std::string& name, std::initializer_list<DType> dtypes,
                  const std::vector<Index>& shape, std::set<std::string>* used, AnyTensor* out) {
  used->insert(name);
  MOE_RETURN_IF_ERROR(ckpt.tensor(name, out));
  if (std::find(dtypes.begin(), dtypes.end(), out->dtype) == dtypes.end()) {
    std::string expected;
    for (DType d : dtypes) expected += (expected.empty() ? "" : " or ") + std::string(to_string(d));
    return invalid_argument("tensor ", name, ": expected dtype ", expected, ", got ", to_string(out->dtype));
  }
  if (out->extents != shape) {
    return invalid_argument("tensor ", name, ": expected shape ", shape_string(shape), ", got ", shape_string(out->extents));
  }
  return Status::ok();
}

// Element i of a row-major tensor, through memcpy: safetensors data may sit at any byte offset.
std::uint32_t word_at(const AnyTensor& t, Index i) {
  std::uint32_t w;
  std::memcpy(&w, static_cast<const std::byte*>(t.data) + i * 4, 4);
  return w;
}
float float_at(const AnyTensor& t, Index i) {
  const auto* b = static_cast<const std::byte*>(t.data);
  if (t.dtype == DType::kF32) {
    float v;
    std::memcpy(&v, b + i * 4, 4);
    return v;
  }
  std::uint16_t h;
  std::memcpy(&h, b + i * 2, 2);
  return t.dtype == DType::kBF16 ? bfloat16::to_float(h) : half::to_float(h);
}
std::int64_t integer_at(const AnyTensor& t, Index i) {
  if (t.dtype == DType::kI64) {
    std::int64_t v;
    std::memcpy(&v, static_cast<const std::byte*>(t.data) + i * 8, 8);
    return v;
  }
  return static_cast<std::int32_t>(word_at(t, i));
}

constexpr std::initializer_list<DType> kFloat = {DType::kF32, DType::kBF16, DType::kF16};

// Scales [rows, cols] (transposed: stored [cols, rows]) into out->scales [n, groups]; finite ones only.
Status read_scales(const AnyTensor& t, const std::string& name, bool transposed, IntLinear* out) {
  const Index G = out->groups();
  out->scales.resize(static_cast<std::size_t>(out->n * G));
  for (Index r = 0; r < out->n; ++r)
    for (Index g = 0; g < G; ++g) {
      const float v = float_at(t, transposed ? g * out->n + r : r * G + g);
      if (!std::isfinite(v)) return invalid_argument("tensor ", name, ": expected finite scales, got ", v, " at row ", r, ", group ", g);
      out->scales[static_cast<std::size_t>(r * G + g)] = v;
    }
  return Status::ok();
}

Status read_g_idx(const AnyTensor& t, const std::string& name, IntLinear* out) {
  out->g_idx.resize(static_cast<std::size_t>(out->k));
  for (Index c = 0; c < out->k; ++c) {
    const std::int64_t g = integer_at(t, c);
    if (g < 0 || g >= out->groups()) {
      return invalid_argument("tensor ", name, ": expected groups in [0, ", out->groups(), "), got ", g, " at ", c);
    }
    out->g_idx[static_cast<std::size_t>(c)] = static_cast<std::int32_t>(g);
  }
  return Status::ok();
}

// compressed-tensors pack-quantized (compressed_tensors' PackedQuantizationCompressor):
//   <name>.weight_packed      I32 [n, ceil(k / pf)]  pf = 32 / bits codes per word along K, the
//                             first in the low bits; a code is the signed value + 2^(bits-1)
//   <name>.weight_shape       I32 or I64 [2] = [n, k]
//   <name>.weight_scale       float [n, groups] (groups 1 per channel)
//   <name>.weight_zero_point  I32 [ceil(n / pf), groups], asymmetric only: packed along N, the
//                             same offset as the codes
//   <name>.weight_g_idx       I32 [k], actorder "group" only: the group of each K element
Status read_compressed_tensors(const io::Checkpoint& ckpt, const QuantizationConfig& q, const std::string& name,
                               int bits, std::set<std::string>* used, IntLinear* out) {
  const Index pf = 32 / bits, n = out->n, k = out->k, mask = (1 << bits) - 1;
  AnyTensor packed, shape, scale, zero, g_idx;
  MOE_RETURN_IF_ERROR(open_exact(ckpt, name + ".weight_packed", {DType::kI32}, {n, (k + pf - 1) / pf}, used, &packed));
  MOE_RETURN_IF_ERROR(open_exact(ckpt, name + ".weight_shape", {DType::kI32, DType::kI64}, {2}, used, &shape));
  if (integer_at(shape, 0) != n || integer_at(shape, 1) != k) {
    return invalid_argument("tensor ", name, ".weight_shape: expected [", n, ", ", k, "], got [", integer_at(shape, 0), ", ",
                            integer_at(shape, 1), "]");
  }
  MOE_RETURN_IF_ERROR(open_exact(ckpt, name + ".weight_scale", kFloat, {n, out->groups()}, used, &scale));
  MOE_RETURN_IF_ERROR(read_scales(scale, name + ".weight_scale", false, out));
  out->codes.resize(static_cast<std::size_t>(n * k));
  for (Index r = 0; r < n; ++r)
    for (Index c = 0; c < k; ++c) {
      out->codes[static_cast<std::size_t>(r * k + c)] =
          static_cast<std::uint8_t>((word_at(packed, r * ((k + pf - 1) / pf) + c / pf) >> (bits * (c % pf))) & mask);
    }
  if (q.zero_points) {
    const Index G = out->groups();
    MOE_RETURN_IF_ERROR(open_exact(ckpt, name + ".weight_zero_point", {DType::kI32}, {(n + pf - 1) / pf, G}, used, &zero));
    out->zeros.resize(static_cast<std::size_t>(n * G));
    for (Index r = 0; r < n; ++r)
      for (Index g = 0; g < G; ++g) {
        out->zeros[static_cast<std::size_t>(r * G + g)] =
            static_cast<std::uint8_t>((word_at(zero, (r / pf) * G + g) >> (bits * (r % pf))) & mask);
      }
  }
  if (q.act_order) {
    MOE_RETURN_IF_ERROR(open_exact(ckpt, name + ".weight_g_idx", {DType::kI32, DType::kI64}, {k}, used, &g_idx));
    MOE_RETURN_IF_ERROR(read_g_idx(g_idx, name + ".weight_g_idx", out));
  }
  return Status::ok();
}

// GPTQ (AutoGPTQ / GPTQModel):
//   <name>.qweight  I32 [k / pf, n]       pf = 32 / bits codes per word along K, the first in the
//                                         low bits (unsigned codes)
//   <name>.qzeros   I32 [groups, n / pf]  zero points packed along N; checkpoint_format "gptq"
//                                         stores zero - 1 (read back modulo 2^bits), "gptq_v2"
//                                         the zero itself; ignored when sym (the default zero)
//   <name>.scales   float [groups, n]
//   <name>.g_idx    I32 [k]               the group of each K element (act-order), optional
Status read_gptq(const io::Checkpoint& ckpt, const QuantizationConfig& q, const std::string& name, int bits,
                 std::set<std::string>* used, IntLinear* out) {
  const Index pf = 32 / bits, n = out->n, k = out->k, mask = (1 << bits) - 1, G = out->groups();
  if (k % pf != 0 || n % pf != 0) {
    return invalid_argument("tensor ", name, ".qweight: GPTQ packs ", pf, " codes per word; [", n, ", ", k,
                            "] is not a multiple of ", pf, " in both dimensions");
  }
  AnyTensor qweight, qzeros, scales, g_idx;
  MOE_RETURN_IF_ERROR(open_exact(ckpt, name + ".qweight", {DType::kI32}, {k / pf, n}, used, &qweight));
  MOE_RETURN_IF_ERROR(open_exact(ckpt, name + ".scales", kFloat, {G, n}, used, &scales));
  MOE_RETURN_IF_ERROR(read_scales(scales, name + ".scales", true, out));
  out->codes.resize(static_cast<std::size_t>(n * k));
  for (Index c = 0; c < k; ++c)
    for (Index r = 0; r < n; ++r) {
      out->codes[static_cast<std::size_t>(r * k + c)] =
          static_cast<std::uint8_t>((word_at(qweight, (c / pf) * n + r) >> (bits * (c % pf))) & mask);
    }
  const bool has_zeros = ckpt.contains(name + ".qzeros");
  if (q.zero_points || has_zeros) {
    MOE_RETURN_IF_ERROR(open_exact(ckpt, name + ".qzeros", {DType::kI32}, {G, n / pf}, used, &qzeros));
  }
  if (q.zero_points) {
    const unsigned plus = q.gptq_zeros_minus_one ? 1u : 0u;
    out->zeros.resize(static_cast<std::size_t>(n * G));
    for (Index g = 0; g < G; ++g)
      for (Index r = 0; r < n; ++r) {
        const unsigned stored = (word_at(qzeros, g * (n / pf) + r / pf) >> (bits * (r % pf))) & mask;
        out->zeros[static_cast<std::size_t>(r * G + g)] = static_cast<std::uint8_t>((stored + plus) & mask);
      }
  }
  if (ckpt.contains(name + ".g_idx") || q.act_order) {
    MOE_RETURN_IF_ERROR(open_exact(ckpt, name + ".g_idx", {DType::kI32, DType::kI64}, {k}, used, &g_idx));
    MOE_RETURN_IF_ERROR(read_g_idx(g_idx, name + ".g_idx", out));
  }
  return Status::ok();
}

// AWQ (AutoAWQ, version gemm), 4-bit only:
//   <name>.qweight  I32 [k, n / 8]       8 codes per word along N, output column 8 w + j in bits
//                                        4 kAwqSlot[j] .. 4 kAwqSlot[j] + 3 (AutoAWQ's interleave)
//   <name>.qzeros   I32 [groups, n / 8]  zero points, packed the same way (zero_point true)
//   <name>.scales   float [groups, n]
constexpr int kAwqSlot[8] = {0, 4, 1, 5, 2, 6, 3, 7};

Status read_awq(const io::Checkpoint& ckpt, const QuantizationConfig& q, const std::string& name,
                std::set<std::string>* used, IntLinear* out) {
  const Index n = out->n, k = out->k, G = out->groups();
  if (n % 8 != 0) return invalid_argument("tensor ", name, ".qweight: AWQ packs 8 output columns per word; n = ", n);
  AnyTensor qweight, qzeros, scales;
  MOE_RETURN_IF_ERROR(open_exact(ckpt, name + ".qweight", {DType::kI32}, {k, n / 8}, used, &qweight));
  MOE_RETURN_IF_ERROR(open_exact(ckpt, name + ".scales", kFloat, {G, n}, used, &scales));
  MOE_RETURN_IF_ERROR(read_scales(scales, name + ".scales", true, out));
  const auto nibble = [](std::uint32_t word, Index r) { return static_cast<std::uint8_t>((word >> (4 * kAwqSlot[r % 8])) & 0xF); };
  out->codes.resize(static_cast<std::size_t>(n * k));
  for (Index c = 0; c < k; ++c)
    for (Index r = 0; r < n; ++r) out->codes[static_cast<std::size_t>(r * k + c)] = nibble(word_at(qweight, c * (n / 8) + r / 8), r);
  if (q.zero_points) {
    MOE_RETURN_IF_ERROR(open_exact(ckpt, name + ".qzeros", {DType::kI32}, {G, n / 8}, used, &qzeros));
    out->zeros.resize(static_cast<std::size_t>(n * G));
    for (Index g = 0; g < G; ++g)
      for (Index r = 0; r < n; ++r) out->zeros[static_cast<std::size_t>(r * G + g)] = nibble(word_at(qzeros, g * (n / 8) + r / 8), r);
  }
  return Status::ok();
}

// Columns [c0, c0 + m) of `l` sorted by group (stable), and the group of each run of `group`
// sorted columns (0: one run). Fails where a run would mix groups.
Status sorted_groups(const IntLinear& l, Index c0, Index m, Index group, std::vector<Index>* order,
                     std::vector<Index>* run_group) {
  order->resize(static_cast<std::size_t>(m));
  std::iota(order->begin(), order->end(), Index{0});
  std::stable_sort(order->begin(), order->end(), [&](Index a, Index b) { return l.group_of(c0 + a) < l.group_of(c0 + b); });
  const Index run = group > 0 ? group : m;
  run_group->clear();
  for (Index b = 0; b * run < m; ++b) {
    const Index g = l.group_of(c0 + (*order)[static_cast<std::size_t>(b * run)]);
    for (Index x = b * run; x < std::min(m, (b + 1) * run); ++x) {
      if (l.group_of(c0 + (*order)[static_cast<std::size_t>(x)]) != g) {
        return invalid_argument("columns [", c0, ", ", c0 + m, ") do not form whole groups of ", run,
                                " (a tensor-parallel slice that cuts a group, or groups of other sizes)");
      }
    }
    run_group->push_back(g);
  }
  return Status::ok();
}

void put_code(std::uint8_t* row, Index c, unsigned code, int bits) {
  const Index pack = 8 / bits;
  row[c / pack] = static_cast<std::uint8_t>(row[c / pack] | (code << (bits * (c % pack))));
}

}  // namespace

Status read_int_linear(const io::Checkpoint& ckpt, const QuantizationConfig& q, const std::string& name, Index n, Index k,
                       std::set<std::string>* used, IntLinear* out) {
  IntLinear l;
  l.n = n;
  l.k = k;
  l.group = q.weight_scale == WeightScaleLayout::kGroup ? q.group_size : k;
  if (n < 1 || k < 1 || l.group < 1) return invalid_argument("tensor ", name, ": empty weight [", n, ", ", k, "]");
  const int bits = q.weight_bits;
  Status s = Status::ok();
  if (q.quant_method == "gptq") s = read_gptq(ckpt, q, name, bits, used, &l);
  else if (q.quant_method == "awq") s = read_awq(ckpt, q, name, used, &l);
  else s = read_compressed_tensors(ckpt, q, name, bits, used, &l);
  MOE_RETURN_IF_ERROR(s);
  *out = std::move(l);
  return Status::ok();
}

Status pack_weight_only_expert(const IntLinear& gate, const IntLinear& up, const IntLinear& down, Index i0, Index m,
                               int bits, Index group_size, const std::string& what, const WeightOnlyExpertOut& out,
                               bool* ordered) {
  const Index H = gate.k, I = down.k, pack = 8 / bits;
  if (out.signed_codes && out.z13) return invalid_argument(what, ": two's-complement codes take no zero points");
  // Two's-complement codes are the offset codes with the top bit flipped (moe/quant/weight_only.h).
  const unsigned flip = out.signed_codes ? 1u << (bits - 1) : 0u;
  std::vector<Index> order13, runs13, up_order, up_runs, order2, runs2;
  const auto context = [&](const Status& s, const char* tensor) {
    return s.is_ok() ? s : invalid_argument(what, ".", tensor, ": ", s.message());
  };
  MOE_RETURN_IF_ERROR(context(sorted_groups(gate, 0, H, group_size, &order13, &runs13), "gate"));
  MOE_RETURN_IF_ERROR(context(sorted_groups(up, 0, H, group_size, &up_order, &up_runs), "up"));
  if (up_order != order13 || up_runs != runs13) {
    return invalid_argument(what, ": gate and up have different act-order groups (g_idx); w13 shares one K order");
  }
  MOE_RETURN_IF_ERROR(context(sorted_groups(down, i0, m, group_size, &order2, &runs2), "down"));
  const Index g13 = static_cast<Index>(runs13.size()), g2 = static_cast<Index>(runs2.size());
  // Intermediate j of this slice is the checkpoint's i0 + order2[j]: w13's rows follow w2's K order.
  for (Index j = 0; j < m; ++j) {
    const Index src = i0 + order2[static_cast<std::size_t>(j)];
    for (int half = 0; half < 2; ++half) {
      const IntLinear& l = half == 0 ? gate : up;
      const Index row = half * m + j;
      for (Index c = 0; c < H; ++c) {
        put_code(out.w13 + row * (H / pack), c, l.codes[static_cast<std::size_t>(src * H + order13[static_cast<std::size_t>(c)])] ^ flip, bits);
      }
      for (Index b = 0; b < g13; ++b) {
        const std::size_t from = static_cast<std::size_t>(src * l.groups() + runs13[static_cast<std::size_t>(b)]);
        out.s13[row * g13 + b] = l.scales[from];
        if (out.z13) out.z13[row * g13 + b] = l.zeros[from];
      }
    }
  }
  for (Index h = 0; h < down.n; ++h) {
    for (Index j = 0; j < m; ++j) {
      put_code(out.w2 + h * (m / pack), j, down.codes[static_cast<std::size_t>(h * I + i0 + order2[static_cast<std::size_t>(j)])] ^ flip, bits);
    }
    for (Index b = 0; b < g2; ++b) {
      const std::size_t from = static_cast<std::size_t>(h * down.groups() + runs2[static_cast<std::size_t>(b)]);
      out.s2[h * g2 + b] = down.scales[from];
      if (out.z2) out.z2[h * g2 + b] = down.zeros[from];
    }
  }
  *ordered = false;
  for (Index c = 0; c < H; ++c) {
    out.k_order[c] = static_cast<std::int32_t>(order13[static_cast<std::size_t>(c)]);
    *ordered = *ordered || order13[static_cast<std::size_t>(c)] != c;
  }
  return Status::ok();
}

}  // namespace moe::layer
