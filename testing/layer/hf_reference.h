// An independent double-precision reference of the MoE blocks of the seven Hugging Face
// architectures the runtime layer (moe/layer) loads, written from the models' Hugging Face
// semantics, not from the library:
//
//   Mixtral     softmax(logits) -> top-k -> renormalize; sum_j w_j * w2(silu(w1 x) * w3 x).
//   Qwen2-MoE   softmax -> top-k -> renormalize iff norm_topk_prob; plus
//               sigmoid(shared_expert_gate . x) * shared_expert(x).
//   Qwen3-MoE   as Qwen2-MoE without the shared expert.
//   DeepSeek-V2 softmax scores; greedy top-k, or group_limited_greedy (group score = max score of
//               the group, the best topk_group groups kept, the others masked); weights = chosen
//               scores * routed_scaling_factor, never renormalized; shared experts (intermediate
//               moe_intermediate_size * n_shared_experts) added with weight 1.
//   DeepSeek-V3 sigmoid scores; choice = scores + e_score_correction_bias; group score = sum of
//               the top-2 choices of the group; topk_group groups kept (others -inf); top-k over
//               the choices; weights = the unbiased scores, renormalized iff norm_topk_prob, then
//               * routed_scaling_factor; shared experts added.
//   gpt-oss     logits = W x + b; top-k of the logits; weights = softmax over the k chosen logits;
//               expert: gu = x . gate_up_proj[e] + bias, gate = gu[0::2], up = gu[1::2],
//               g = min(gate, limit), u = clamp(up, -limit, limit),
//               y = ((u + 1) * g * sigmoid(1.702 g)) . down_proj[e] + down_bias. The MXFP4 form
//               stores [out, in] blocks (value = lut[nibble] * 2^(scale - 127), low nibble first).
//   Llama-4     top-k (k = 1) of the raw logits, s = sigmoid(logit); the routed expert gets s * x
//               (the INPUT is scaled); gate_up_proj [E, H, 2I] with gate = [..., :I], up =
//               [..., I:]; plus the shared expert (intermediate I) with weight 1.
//
// Every number is a double: tensors (BF16, F16, F32) are widened exactly, the router runs in
// double, and nothing is rounded. topk_ids come in descending order of the selection score
// (torch.topk(sorted=True)).
//
// The second half of the file holds the file helpers the layer tests share (temporary
// directories, rewriting a checkpoint with one tensor changed).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "moe/io/json.h"
#include "moe/io/safetensors.h"
#include "moe/quant/numeric.h"
#include "moe/tensor.h"

namespace moe::testing::hf {

// ---- the Hugging Face config -------------------------------------------------------------------

struct RefConfig {
  std::string architecture;
  Index hidden = 0, intermediate = 0, num_experts = 0;
  int top_k = 0;
  bool norm_topk_prob = false;
  Index shared_intermediate = 0;  // 0: no shared expert
  bool shared_gate = false;       // Qwen2-MoE
  double routed_scaling_factor = 1.0;
  std::string topk_method = "greedy";
  int n_group = 1, topk_group = 1;
  double swiglu_limit = 7.0, swiglu_alpha = 1.702;
  std::string module;  // block_sparse_moe, mlp, feed_forward
};

namespace detail {

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("hf reference: " + what); }

inline const io::Json& member(const io::Json& c, const std::string& key) {
  const io::Json* v = c.find(key);
  if (v == nullptr || v->is_null()) fail("config has no \"" + key + "\"");
  return *v;
}
inline std::int64_t int_of(const io::Json& c, const std::string& key) { return member(c, key).as_int(); }
inline std::int64_t int_or(const io::Json& c, const std::string& key, std::int64_t def) {
  const io::Json* v = c.find(key);
  return (v == nullptr || v->is_null()) ? def : v->as_int();
}
inline double double_or(const io::Json& c, const std::string& key, double def) {
  const io::Json* v = c.find(key);
  return (v == nullptr || v->is_null()) ? def : v->as_double();
}
inline bool bool_or(const io::Json& c, const std::string& key, bool def) {
  const io::Json* v = c.find(key);
  return (v == nullptr || v->is_null()) ? def : v->as_bool();
}
inline std::string string_or(const io::Json& c, const std::string& key, const std::string& def) {
  const io::Json* v = c.find(key);
  return (v == nullptr || v->is_null()) ? def : v->as_string();
}

}  // namespace detail

// Reads config.json the way the Hugging Face config classes do (their defaults where a key may
// be absent).
inline RefConfig parse_config(const io::Json& root) {
  using namespace detail;
  RefConfig r;
  const io::Json& archs = member(root, "architectures");
  if (!archs.is_array() || archs.size() == 0) fail("architectures is not a non-empty array");
  r.architecture = archs[0].as_string();
  const bool multimodal_llama4 = r.architecture == "Llama4ForConditionalGeneration";
  if (multimodal_llama4) r.architecture = "Llama4ForCausalLM";
  const io::Json& c = multimodal_llama4 ? member(root, "text_config") : root;
  r.hidden = int_of(c, "hidden_size");
  r.top_k = static_cast<int>(int_of(c, "num_experts_per_tok"));
  const std::string& a = r.architecture;
  if (a == "MixtralForCausalLM") {
    r.num_experts = int_of(c, "num_local_experts");
    r.intermediate = int_of(c, "intermediate_size");
    r.norm_topk_prob = true;
    r.module = "block_sparse_moe";
  } else if (a == "Qwen2MoeForCausalLM" || a == "Qwen3MoeForCausalLM") {
    r.num_experts = int_of(c, "num_experts");
    r.intermediate = int_of(c, "moe_intermediate_size");
    r.norm_topk_prob = bool_or(c, "norm_topk_prob", false);
    if (a == "Qwen2MoeForCausalLM") {
      r.shared_intermediate = int_of(c, "shared_expert_intermediate_size");
      r.shared_gate = r.shared_intermediate > 0;
    }
    r.module = "mlp";
  } else if (a == "DeepseekV2ForCausalLM" || a == "DeepseekV3ForCausalLM") {
    r.num_experts = int_of(c, "n_routed_experts");
    r.intermediate = int_of(c, "moe_intermediate_size");
    r.shared_intermediate = int_or(c, "n_shared_experts", 0) * r.intermediate;
    r.routed_scaling_factor = double_or(c, "routed_scaling_factor", 1.0);
    r.n_group = static_cast<int>(int_or(c, "n_group", 1));
    r.topk_group = static_cast<int>(int_or(c, "topk_group", 1));
    if (a == "DeepseekV2ForCausalLM") {
      r.topk_method = string_or(c, "topk_method", "greedy");
      r.norm_topk_prob = false;  // V2 never renormalizes
    } else {
      r.topk_method = "noaux_tc";
      r.norm_topk_prob = bool_or(c, "norm_topk_prob", true);
    }
    r.module = "mlp";
  } else if (a == "GptOssForCausalLM") {
    r.num_experts = int_of(c, "num_local_experts");
    r.intermediate = int_of(c, "intermediate_size");
    r.swiglu_limit = double_or(c, "swiglu_limit", 7.0);
    r.module = "mlp";
  } else if (a == "Llama4ForCausalLM") {
    r.num_experts = int_of(c, "num_local_experts");
    r.intermediate = int_of(c, "intermediate_size");
    r.shared_intermediate = r.intermediate;
    r.module = "feed_forward";
  } else {
    fail("unknown architecture " + a);
  }
  return r;
}

// ---- tensors as doubles ------------------------------------------------------------------------

// A checkpoint tensor widened to double, row-major; throws unless its dtype is BF16, F16 or F32
// and its shape is exactly `shape`.
inline std::vector<double> read_tensor(const io::Checkpoint& ckpt, const std::string& name,
                                       const std::vector<Index>& shape) {
  AnyTensor t;
  const Status s = ckpt.tensor(name, &t);
  if (!s.is_ok()) detail::fail(s.to_string());
  if (t.extents != shape) detail::fail("tensor " + name + " has shape " + moe::detail::format_shape(t.extents));
  Index n = 1;
  for (Index e : shape) n *= e;
  std::vector<double> out(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) {
    switch (t.dtype) {
      case DType::kF32: {
        float f;
        std::memcpy(&f, static_cast<const std::byte*>(t.data) + 4 * i, 4);
        out[i] = f;
        break;
      }
      case DType::kBF16:
      case DType::kF16: {
        std::uint16_t b;
        std::memcpy(&b, static_cast<const std::byte*>(t.data) + 2 * i, 2);
        out[i] = t.dtype == DType::kBF16 ? bfloat16::to_float(b) : half::to_float(b);
        break;
      }
      default: detail::fail("tensor " + name + " has dtype " + std::string(to_string(t.dtype)));
    }
  }
  return out;
}

// gpt-oss MXFP4: <base>_blocks [E, R, C/32, 16] and <base>_scales [E, R, C/32] (u8) -> [E, R, C].
inline std::vector<double> read_mxfp4(const io::Checkpoint& ckpt, const std::string& base, Index E, Index R, Index C) {
  static constexpr double kLut[16] = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                                      -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0};
  AnyTensor blocks, scales;
  if (!ckpt.tensor(base + "_blocks", &blocks).is_ok() || !ckpt.tensor(base + "_scales", &scales).is_ok()) {
    detail::fail("missing MXFP4 tensors " + base + "_blocks/_scales");
  }
  if (blocks.dtype != DType::kU8 || scales.dtype != DType::kU8 || blocks.extents != std::vector<Index>{E, R, C / 32, 16} ||
      scales.extents != std::vector<Index>{E, R, C / 32}) {
    detail::fail("MXFP4 tensors " + base + " have the wrong dtype or shape");
  }
  const auto* b = static_cast<const std::uint8_t*>(blocks.data);
  const auto* s = static_cast<const std::uint8_t*>(scales.data);
  std::vector<double> out(static_cast<std::size_t>(E * R * C));
  for (Index e = 0; e < E; ++e)
    for (Index r = 0; r < R; ++r)
      for (Index c = 0; c < C; ++c) {
        const Index block = (e * R + r) * (C / 32) + c / 32;
        const std::uint8_t byte = b[block * 16 + (c % 32) / 2];
        const int nibble = (c % 2 == 0) ? (byte & 0xf) : (byte >> 4);
        out[(e * R + r) * C + c] = std::ldexp(kLut[nibble], static_cast<int>(s[block]) - 127);
      }
  return out;
}

// ---- the forward -------------------------------------------------------------------------------

struct RefResult {
  std::vector<double> output;           // [M, H]
  std::vector<std::int32_t> topk_ids;   // [M, k], descending selection score
  std::vector<double> topk_weights;     // [M, k]
  std::vector<double> logits;           // [M, E], router bias included
};

inline double silu(double v) { return v / (1.0 + std::exp(-v)); }
inline double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// The k largest entries, largest first; equal values keep the lower index first.
inline std::vector<int> top_k(const std::vector<double>& v, int k) {
  std::vector<int> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return v[a] > v[b]; });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

inline std::vector<double> softmax(const std::vector<double>& v) {
  const double mx = *std::max_element(v.begin(), v.end());
  std::vector<double> p(v.size());
  double sum = 0;
  for (std::size_t i = 0; i < v.size(); ++i) sum += p[i] = std::exp(v[i] - mx);
  for (double& x : p) x /= sum;
  return p;
}

// A dense gated MLP with nn.Linear weights: down(silu(gate x) * up x); gate/up [S, H], down [H, S].
// Adds scale * result to `acc` [H].
inline void gated_mlp(const double* gate, const double* up, const double* down, Index S, Index H, const double* x,
                      double scale, double* acc) {
  std::vector<double> a(static_cast<std::size_t>(S));
  for (Index i = 0; i < S; ++i) {
    double g = 0, u = 0;
    for (Index h = 0; h < H; ++h) {
      g += gate[i * H + h] * x[h];
      u += up[i * H + h] * x[h];
    }
    a[i] = silu(g) * u;
  }
  for (Index h = 0; h < H; ++h) {
    double y = 0;
    for (Index i = 0; i < S; ++i) y += down[h * S + i] * a[i];
    acc[h] += scale * y;
  }
}

// The MoE block of `layer_prefix` ("model.layers.3"; the block's module name is appended) on the
// hidden states x [M, H]. `router_logits` [M, E], when given, replaces W x (+ b).
inline RefResult reference_forward(const io::Json& config_json, const io::Checkpoint& ckpt,
                                   const std::string& layer_prefix, const std::vector<float>& x, Index M,
                                   const std::vector<double>* router_logits = nullptr) {
  const RefConfig c = parse_config(config_json);
  const Index H = c.hidden, I = c.intermediate, E = c.num_experts;
  const int k = c.top_k;
  const std::string& a = c.architecture;
  const std::string p = layer_prefix + "." + c.module + ".";
  if (static_cast<Index>(x.size()) != M * H) detail::fail("x has the wrong size");

  RefResult r;
  r.output.assign(static_cast<std::size_t>(M * H), 0.0);
  r.topk_ids.assign(static_cast<std::size_t>(M * k), -1);
  r.topk_weights.assign(static_cast<std::size_t>(M * k), 0.0);
  r.logits.assign(static_cast<std::size_t>(M * E), 0.0);

  // Router.
  const bool gpt_oss = a == "GptOssForCausalLM", llama4 = a == "Llama4ForCausalLM";
  const std::vector<double> router = read_tensor(ckpt, p + ((gpt_oss || llama4) ? "router.weight" : "gate.weight"), {E, H});
  std::vector<double> router_bias(static_cast<std::size_t>(E), 0.0);
  if (gpt_oss) router_bias = read_tensor(ckpt, p + "router.bias", {E});
  std::vector<double> correction(static_cast<std::size_t>(E), 0.0);
  if (a == "DeepseekV3ForCausalLM") correction = read_tensor(ckpt, p + "gate.e_score_correction_bias", {E});
  for (Index m = 0; m < M; ++m)
    for (Index e = 0; e < E; ++e) {
      if (router_logits) {
        r.logits[m * E + e] = (*router_logits)[m * E + e];
        continue;
      }
      double s = router_bias[e];
      for (Index h = 0; h < H; ++h) s += router[e * H + h] * static_cast<double>(x[m * H + h]);
      r.logits[m * E + e] = s;
    }

  // Routed experts, per layout. Per-expert nn.Linear weights [I, H] / [H, I].
  std::vector<std::vector<double>> gate_w(E), up_w(E), down_w(E);
  std::vector<double> gate_up, down, gate_up_bias, down_bias;  // fused forms
  bool mxfp4 = false;
  if (gpt_oss) {
    mxfp4 = !ckpt.contains(p + "experts.gate_up_proj");
    if (mxfp4) {
      gate_up = read_mxfp4(ckpt, p + "experts.gate_up_proj", E, 2 * I, H);  // [E, 2I, H]
      down = read_mxfp4(ckpt, p + "experts.down_proj", E, H, I);            // [E, H, I]
    } else {
      gate_up = read_tensor(ckpt, p + "experts.gate_up_proj", {E, H, 2 * I});
      down = read_tensor(ckpt, p + "experts.down_proj", {E, I, H});
    }
    gate_up_bias = read_tensor(ckpt, p + "experts.gate_up_proj_bias", {E, 2 * I});
    down_bias = read_tensor(ckpt, p + "experts.down_proj_bias", {E, H});
  } else if (llama4) {
    gate_up = read_tensor(ckpt, p + "experts.gate_up_proj", {E, H, 2 * I});
    down = read_tensor(ckpt, p + "experts.down_proj", {E, I, H});
  } else {
    const bool mixtral = a == "MixtralForCausalLM";
    for (Index e = 0; e < E; ++e) {
      const std::string n = p + "experts." + std::to_string(e) + ".";
      gate_w[e] = read_tensor(ckpt, n + (mixtral ? "w1" : "gate_proj") + ".weight", {I, H});
      up_w[e] = read_tensor(ckpt, n + (mixtral ? "w3" : "up_proj") + ".weight", {I, H});
      down_w[e] = read_tensor(ckpt, n + (mixtral ? "w2" : "down_proj") + ".weight", {H, I});
    }
  }
  std::vector<double> sg, su, sd, shared_gate;
  const Index S = c.shared_intermediate;
  if (S > 0) {
    const std::string n = p + (a.rfind("Deepseek", 0) == 0 ? "shared_experts." : "shared_expert.");
    sg = read_tensor(ckpt, n + "gate_proj.weight", {S, H});
    su = read_tensor(ckpt, n + "up_proj.weight", {S, H});
    sd = read_tensor(ckpt, n + "down_proj.weight", {H, S});
    if (c.shared_gate) shared_gate = read_tensor(ckpt, p + "shared_expert_gate.weight", {1, H});
  }

  std::vector<double> xm(static_cast<std::size_t>(H));
  for (Index m = 0; m < M; ++m) {
    for (Index h = 0; h < H; ++h) xm[h] = x[m * H + h];
    const std::vector<double> logits(r.logits.begin() + m * E, r.logits.begin() + (m + 1) * E);
    std::vector<int> ids;
    std::vector<double> w(static_cast<std::size_t>(k));

    // ---- routing
    if (a == "DeepseekV3ForCausalLM") {
      std::vector<double> score(E), choice(E);
      for (Index e = 0; e < E; ++e) {
        score[e] = sigmoid(logits[e]);
        choice[e] = score[e] + correction[e];
      }
      const Index per = E / c.n_group;
      std::vector<double> group(c.n_group);
      for (int g = 0; g < c.n_group; ++g) {
        std::vector<double> in(choice.begin() + g * per, choice.begin() + (g + 1) * per);
        const std::vector<int> t = top_k(in, 2);
        group[g] = in[t[0]] + in[t[1]];
      }
      const std::vector<int> keep = top_k(group, c.topk_group);
      std::vector<double> masked(E, -std::numeric_limits<double>::infinity());
      for (int g : keep)
        for (Index e = g * per; e < (g + 1) * per; ++e) masked[e] = choice[e];
      ids = top_k(masked, k);
      double sum = 0;
      for (int j = 0; j < k; ++j) sum += w[j] = score[ids[j]];
      for (int j = 0; j < k; ++j) w[j] = (c.norm_topk_prob ? w[j] / sum : w[j]) * c.routed_scaling_factor;
    } else if (gpt_oss) {
      ids = top_k(logits, k);
      std::vector<double> chosen(k);
      for (int j = 0; j < k; ++j) chosen[j] = logits[ids[j]];
      w = softmax(chosen);
    } else if (llama4) {
      ids = top_k(logits, k);
      for (int j = 0; j < k; ++j) w[j] = sigmoid(logits[ids[j]]);
    } else {  // softmax scores: Mixtral, Qwen2/3, DeepSeek-V2
      std::vector<double> prob = softmax(logits);
      if (a == "DeepseekV2ForCausalLM" && c.topk_method == "group_limited_greedy") {
        const Index per = E / c.n_group;
        std::vector<double> group(c.n_group);
        for (int g = 0; g < c.n_group; ++g) group[g] = *std::max_element(prob.begin() + g * per, prob.begin() + (g + 1) * per);
        const std::vector<int> keep = top_k(group, c.topk_group);
        std::vector<double> masked(E, 0.0);
        for (int g : keep)
          for (Index e = g * per; e < (g + 1) * per; ++e) masked[e] = prob[e];
        ids = top_k(masked, k);
      } else if (a == "DeepseekV2ForCausalLM" && c.topk_method != "greedy") {
        detail::fail("unknown topk_method " + c.topk_method);
      } else {
        ids = top_k(prob, k);
      }
      double sum = 0;
      for (int j = 0; j < k; ++j) sum += w[j] = prob[ids[j]];
      for (int j = 0; j < k; ++j) {
        if (a == "DeepseekV2ForCausalLM") w[j] *= c.routed_scaling_factor;
        else if (c.norm_topk_prob) w[j] /= sum;
      }
    }
    for (int j = 0; j < k; ++j) {
      r.topk_ids[m * k + j] = ids[j];
      r.topk_weights[m * k + j] = w[j];
    }

    // ---- experts
    double* out = &r.output[m * H];
    for (int j = 0; j < k; ++j) {
      const Index e = ids[j];
      if (gpt_oss) {
        std::vector<double> gu(2 * I);
        for (Index o = 0; o < 2 * I; ++o) {
          double s = gate_up_bias[e * 2 * I + o];
          for (Index h = 0; h < H; ++h) {
            const double wv = mxfp4 ? gate_up[(e * 2 * I + o) * H + h] : gate_up[(e * H + h) * 2 * I + o];
            s += xm[h] * wv;
          }
          gu[o] = s;
        }
        std::vector<double> act(I);
        for (Index i = 0; i < I; ++i) {
          const double g = std::min(gu[2 * i], c.swiglu_limit);
          const double u = std::clamp(gu[2 * i + 1], -c.swiglu_limit, c.swiglu_limit);
          act[i] = (u + 1.0) * g * sigmoid(c.swiglu_alpha * g);
        }
        for (Index h = 0; h < H; ++h) {
          double y = down_bias[e * H + h];
          for (Index i = 0; i < I; ++i) y += act[i] * (mxfp4 ? down[(e * H + h) * I + i] : down[(e * I + i) * H + h]);
          out[h] += w[j] * y;
        }
      } else if (llama4) {
        std::vector<double> xs(H);
        for (Index h = 0; h < H; ++h) xs[h] = w[j] * xm[h];  // the router weight scales the INPUT
        std::vector<double> act(I);
        for (Index i = 0; i < I; ++i) {
          double g = 0, u = 0;
          for (Index h = 0; h < H; ++h) {
            g += xs[h] * gate_up[(e * H + h) * 2 * I + i];
            u += xs[h] * gate_up[(e * H + h) * 2 * I + I + i];
          }
          act[i] = silu(g) * u;
        }
        for (Index h = 0; h < H; ++h) {
          double y = 0;
          for (Index i = 0; i < I; ++i) y += act[i] * down[(e * I + i) * H + h];
          out[h] += y;  // weight already applied on the input
        }
      } else {
        gated_mlp(gate_w[e].data(), up_w[e].data(), down_w[e].data(), I, H, xm.data(), w[j], out);
      }
    }
    if (S > 0) {
      double scale = 1.0;
      if (c.shared_gate) {
        double s = 0;
        for (Index h = 0; h < H; ++h) s += shared_gate[h] * xm[h];
        scale = sigmoid(s);
      }
      gated_mlp(sg.data(), su.data(), sd.data(), S, H, xm.data(), scale, out);
    }
  }
  return r;
}

// ---- test files --------------------------------------------------------------------------------

// A fresh directory under $TEST_TMPDIR (or /tmp).
inline std::string make_test_dir(const std::string& name) {
  const char* root = std::getenv("TEST_TMPDIR");
  const std::filesystem::path d = std::filesystem::path(root ? root : "/tmp") / name;
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d.string();
}

inline std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
}

// A tensor being copied by rewrite_safetensors; the edit may change any field or drop it.
struct EditableTensor {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;
  bool drop = false;
};

// Copies the safetensors file `src` to `dst`, passing every tensor through `edit`.
inline Status rewrite_safetensors(const std::string& src, const std::string& dst,
                                  const std::function<void(EditableTensor&)>& edit) {
  std::vector<EditableTensor> tensors;
  {
    io::SafetensorsFile f;
    MOE_RETURN_IF_ERROR(io::SafetensorsFile::open(src, &f));
    for (const std::string& n : f.names()) {
      const io::TensorInfo* info = f.info(n);
      AnyTensor t;
      MOE_RETURN_IF_ERROR(f.tensor(n, &t));
      EditableTensor e{n, info->dtype, std::vector<std::int64_t>(info->shape.begin(), info->shape.end()), {}, false};
      e.bytes.resize(info->end - info->begin);
      std::memcpy(e.bytes.data(), t.data, e.bytes.size());
      tensors.push_back(std::move(e));
    }
  }
  std::vector<io::NamedTensor> named;
  for (EditableTensor& t : tensors) {
    edit(t);
    if (!t.drop) named.push_back({t.name, t.dtype, t.shape, t.bytes.data()});
  }
  return io::write_safetensors(dst, named);
}

}  // namespace moe::testing::hf
