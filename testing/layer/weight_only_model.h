// Weight-only checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized) made from the synthetic
// float ones (moe/io/synthetic_checkpoint.h) for the layer's tests, with the tests' own quantizer
// and packers, written from the formats' descriptions independently of the library's reader:
// every routed and shared expert Linear quantized per group along K (act-order: groups of columns
// in a random order, as GPTQ's desc_act leaves them), its magnitudes made to differ by up to 8x
// across rows and groups so a scale, zero point or code from the wrong place is far off, and a float
// twin holding the value each code stands for, as the layer's bf16 arithmetic forms it:
// bf16(float(q - z) * bf16(scale)).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "moe/io/json.h"
#include "moe/io/safetensors.h"
#include "moe/io/synthetic_checkpoint.h"
#include "moe/quant/numeric.h"
#include "testing/layer/hf_reference.h"
#include "testing/layer/quantized_checkpoint.h"

namespace moe::testing::weight_only {

enum class Kind { kCompressedTensors, kGptq, kAwq };

struct IntFormat {
  Kind kind = Kind::kGptq;
  int bits = 4;
  Index group = 32;  // 0: per channel
  bool zero_points = false;
  bool act_order = false;
};

inline std::string quantization_config_of(const IntFormat& f) {
  const std::string bits = std::to_string(f.bits), group = f.group > 0 ? std::to_string(f.group) : "-1";
  const std::string sym = f.zero_points ? "false" : "true";
  switch (f.kind) {
    case Kind::kGptq:
      return R"({"quant_method": "gptq", "bits": )" + bits + R"(, "group_size": )" + group + R"(, "desc_act": )" +
             (f.act_order ? "true" : "false") + R"(, "sym": )" + sym + R"(, "checkpoint_format": "gptq"})";
    case Kind::kAwq:
      return R"({"quant_method": "awq", "bits": 4, "group_size": )" + group + R"(, "zero_point": )" +
             (f.zero_points ? "true" : "false") + R"(, "version": "gemm"})";
    case Kind::kCompressedTensors: {
      const std::string strategy = f.group > 0 ? R"("strategy": "group", "group_size": )" + group : R"("strategy": "channel")";
      return R"({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {"targets": ["Linear"],
        "weights": {"num_bits": )" + bits + R"(, "type": "int", )" + strategy + R"(, "symmetric": )" + sym +
             R"(, "actorder": )" + (f.act_order ? R"("group")" : "null") + R"(}, "input_activations": null}}})";
    }
  }
  return "";
}

struct Model {
  std::string dir, config, float_config, weights, float_weights, prefix;
  io::Json float_config_json;
};

// One Linear [N, K] of float values, quantized: unsigned codes, scales (rounded to the stored
// dtype), zero points, the group of each K element.
struct Quantized {
  Index N = 0, K = 0, groups = 0;
  std::vector<unsigned> q;           // [N, K]
  std::vector<float> scale;          // [N, groups]
  std::vector<unsigned> zero;        // [N, groups]
  std::vector<std::int32_t> g_idx;   // [K]
  std::vector<float> twin;           // [N, K] what the layer computes with
};

// `order`: the act-order of K (GPTQ's, from the input's statistics: shared by the Linears of one
// input, gate and up).
inline Quantized quantize(const std::vector<float>& v, Index N, Index K, const IntFormat& f, int linear,
                          const std::vector<Index>& order, DType scale_dtype) {
  Quantized r;
  r.N = N;
  r.K = K;
  const Index G = f.group > 0 ? f.group : K;
  r.groups = (K + G - 1) / G;
  r.g_idx.resize(static_cast<std::size_t>(K));
  for (Index i = 0; i < K; ++i) r.g_idx[static_cast<std::size_t>(order[i])] = static_cast<std::int32_t>(i / G);
  const unsigned qmax = (1u << f.bits) - 1, mid = 1u << (f.bits - 1);
  r.q.resize(static_cast<std::size_t>(N * K));
  r.twin.resize(r.q.size());
  r.scale.resize(static_cast<std::size_t>(N * r.groups));
  r.zero.resize(r.scale.size());
  const auto stored = [&](float s) {
    return scale_dtype == DType::kF16 ? to_float(half(s)) : scale_dtype == DType::kBF16 ? to_float(bfloat16(s)) : s;
  };
  for (Index n = 0; n < N; ++n) {
    for (Index g = 0; g < r.groups; ++g) {
      const float factor = std::ldexp(1.0f, static_cast<int>((n / 8 + 2 * g + linear) % 4));
      float lo = 0, hi = 0;
      for (Index k = 0; k < K; ++k) {
        if (r.g_idx[k] != g) continue;
        lo = std::min(lo, v[n * K + k] * factor);
        hi = std::max(hi, v[n * K + k] * factor);
      }
      float s;
      unsigned z = mid;
      if (f.zero_points) {
        s = stored(std::max(hi - lo, 1e-6f) / static_cast<float>(qmax));
        z = static_cast<unsigned>(std::clamp(std::lround(-lo / s), 0l, static_cast<long>(qmax)));
      } else {
        s = stored(std::max(std::max(-lo, hi), 1e-6f) / static_cast<float>(mid - 1));
      }
      r.scale[n * r.groups + g] = s;
      r.zero[n * r.groups + g] = z;
      const float s_io = to_float(bfloat16(s));
      for (Index k = 0; k < K; ++k) {
        if (r.g_idx[k] != g) continue;
        const long code = std::clamp(std::lround(v[n * K + k] * factor / s) + static_cast<long>(z), 0l, static_cast<long>(qmax));
        r.q[n * K + k] = static_cast<unsigned>(code);
        r.twin[n * K + k] = to_float(bfloat16(static_cast<float>(code - static_cast<long>(z)) * s_io));
      }
    }
  }
  return r;
}

// Storage of every tensor written (NamedTensor points into it).
struct Store {
  std::vector<std::vector<std::int32_t>> words;
  std::vector<std::vector<std::int64_t>> longs;
  std::vector<std::vector<std::uint16_t>> halves;
  std::vector<std::vector<float>> floats;
  Store() {
    words.reserve(4096), longs.reserve(1024), halves.reserve(1024), floats.reserve(4096);
  }
};

// Codes packed `pf` per int32 word, the first in the low bits: element (a, b) of a [A, B] matrix of
// codes goes to word (a, b / pf) when along_b, else to word (a / pf, b).
inline std::vector<std::int32_t> pack_words(const std::function<unsigned(Index, Index)>& code, Index A, Index B, int bits,
                                            bool along_b, const int* slot = nullptr) {
  const Index pf = 32 / bits;
  const Index WA = along_b ? A : (A + pf - 1) / pf, WB = along_b ? (B + pf - 1) / pf : B;
  std::vector<std::uint32_t> w(static_cast<std::size_t>(WA * WB), 0u);
  for (Index a = 0; a < A; ++a)
    for (Index b = 0; b < B; ++b) {
      const Index i = along_b ? b % pf : a % pf;
      const Index at = along_b ? a * WB + b / pf : (a / pf) * WB + b;
      w[at] |= code(a, b) << (bits * (slot ? slot[i] : i));
    }
  return std::vector<std::int32_t>(w.begin(), w.end());
}

// The stored tensors of one quantized Linear `base` ("...experts.3.gate_proj").
inline void write_linear(const Quantized& l, const std::string& base, const IntFormat& f, Store& st,
                         std::vector<io::NamedTensor>& out) {
  const Index N = l.N, K = l.K, G = l.groups;
  const auto q = [&](Index n, Index k) { return l.q[n * K + k]; };
  const auto scales_f16 = [&](bool transposed) {
    auto& h = st.halves.emplace_back();
    for (Index a = 0; a < (transposed ? G : N); ++a)
      for (Index b = 0; b < (transposed ? N : G); ++b) {
        const float s = transposed ? l.scale[b * G + a] : l.scale[a * G + b];
        h.push_back(f.kind == Kind::kCompressedTensors ? bfloat16(s).bits : half(s).bits);
      }
    return h.data();
  };
  const unsigned mask = (1u << f.bits) - 1;
  switch (f.kind) {
    case Kind::kCompressedTensors: {
      const Index pf = 32 / f.bits;
      auto& w = st.words.emplace_back(pack_words([&](Index n, Index k) { return q(n, k); }, N, K, f.bits, true));
      out.push_back({base + ".weight_packed", DType::kI32, {N, (K + pf - 1) / pf}, w.data()});
      auto& shape = st.longs.emplace_back(std::vector<std::int64_t>{N, K});
      out.push_back({base + ".weight_shape", DType::kI64, {2}, shape.data()});
      out.push_back({base + ".weight_scale", DType::kBF16, {N, G}, scales_f16(false)});
      if (f.zero_points) {
        auto& z = st.words.emplace_back(pack_words([&](Index n, Index g) { return l.zero[n * G + g]; }, N, G, f.bits, false));
        out.push_back({base + ".weight_zero_point", DType::kI32, {(N + pf - 1) / pf, G}, z.data()});
      }
      if (f.act_order) {
        auto& g = st.words.emplace_back(l.g_idx);
        out.push_back({base + ".weight_g_idx", DType::kI32, {K}, g.data()});
      }
      break;
    }
    case Kind::kGptq: {
      const Index pf = 32 / f.bits;
      // qweight [K / pf, N]: K packed; qzeros [G, N / pf] (zero - 1); scales [G, N]; g_idx [K].
      auto& w = st.words.emplace_back(pack_words([&](Index k, Index n) { return q(n, k); }, K, N, f.bits, false));
      out.push_back({base + ".qweight", DType::kI32, {K / pf, N}, w.data()});
      auto& z = st.words.emplace_back(
          pack_words([&](Index g, Index n) { return (l.zero[n * G + g] - 1) & mask; }, G, N, f.bits, true));
      out.push_back({base + ".qzeros", DType::kI32, {G, N / pf}, z.data()});
      out.push_back({base + ".scales", DType::kF16, {G, N}, scales_f16(true)});
      auto& g = st.words.emplace_back(l.g_idx);
      out.push_back({base + ".g_idx", DType::kI32, {K}, g.data()});
      break;
    }
    case Kind::kAwq: {
      static constexpr int kSlot[8] = {0, 4, 1, 5, 2, 6, 3, 7};  // AutoAWQ's interleave of 8 columns
      auto& w = st.words.emplace_back(pack_words([&](Index k, Index n) { return q(n, k); }, K, N, 4, true, kSlot));
      out.push_back({base + ".qweight", DType::kI32, {K, N / 8}, w.data()});
      if (f.zero_points) {
        auto& z = st.words.emplace_back(pack_words([&](Index g, Index n) { return l.zero[n * G + g]; }, G, N, 4, true, kSlot));
        out.push_back({base + ".qzeros", DType::kI32, {G, N / 8}, z.data()});
      }
      out.push_back({base + ".scales", DType::kF16, {G, N}, scales_f16(true)});
      break;
    }
  }
}

// `edit` may rename, reshape or drop (empty name) a tensor before it is written.
inline Model write_model(const std::string& name, const io::HfLayerSpec& spec, const IntFormat& f,
                         const std::function<void(io::NamedTensor&)>& edit = nullptr) {
  Model m;
  m.dir = testing::hf::make_test_dir("int_" + name);
  io::HfCheckpointWriter writer(spec);
  EXPECT_TRUE(writer.write(m.dir).is_ok());
  m.prefix = writer.prefix();
  io::SafetensorsFile file;
  EXPECT_TRUE(io::SafetensorsFile::open(m.dir + "/model.safetensors", &file).is_ok());
  Store st;
  std::vector<io::NamedTensor> quantized, twin;
  std::mt19937 gen(static_cast<std::uint32_t>(spec.seed) + 17);
  int linear = 0;
  std::map<std::string, std::vector<Index>> orders;  // act-order per expert input
  for (const std::string& n : file.names()) {
    AnyTensor t;
    EXPECT_TRUE(file.tensor(n, &t).is_ok());
    std::vector<float>& v = st.floats.emplace_back(quantized::tensor_as_floats(t));
    const std::vector<std::int64_t> shape(t.extents.begin(), t.extents.end());
    if (!quantized::is_expert_linear(n)) {
      quantized.push_back({n, DType::kF32, shape, v.data()});
      twin.push_back({n, DType::kF32, shape, v.data()});
      continue;
    }
    const std::string base = n.substr(0, n.size() - 7);
    const bool down = base.ends_with("down_proj") || base.ends_with(".w2");
    std::vector<Index>& order = orders[base.substr(0, base.rfind('.')) + (down ? "/down" : "/in")];
    if (order.empty()) {
      order.resize(static_cast<std::size_t>(t.extents[1]));
      std::iota(order.begin(), order.end(), Index{0});
      if (f.act_order) std::shuffle(order.begin(), order.end(), gen);
    }
    const Quantized l = quantize(v, t.extents[0], t.extents[1], f, ++linear, order,
                                 f.kind == Kind::kCompressedTensors ? DType::kBF16 : DType::kF16);
    write_linear(l, base, f, st, quantized);
    twin.push_back({n, DType::kF32, shape, st.floats.emplace_back(l.twin).data()});
  }
  if (edit) {
    for (io::NamedTensor& t : quantized) edit(t);
    std::erase_if(quantized, [](const io::NamedTensor& t) { return t.name.empty(); });
  }
  const quantized::Written w = quantized::write_checkpoint_pair(m.dir, "int", quantized, twin, quantization_config_of(f));
  m.weights = w.weights;
  m.float_weights = w.float_weights;
  m.config = w.config;
  m.float_config = w.float_config;
  m.float_config_json = w.float_config_json;
  return m;
}

}  // namespace moe::testing::weight_only
