// Independent naive definitions of every MoE op, for tests and the demo: plain loops in double
// precision, written from the semantics (vLLM) rather than from the library's code. Nothing
// here includes moe/cpu; only the storage types of moe/quant/numeric.h are shared, so that the
// naive forward can round where the library documents its rounding points.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

namespace moe::naive {

constexpr double kInf = std::numeric_limits<double>::infinity();

inline double sanitize(double x) { return std::isnan(x) ? -kInf : x; }

// Indices of the k largest keys; ties (and NaN, as -inf) resolved toward the lower index.
inline std::vector<int> topk_indices(const std::vector<double>& keys, int k) {
  std::vector<int> idx(keys.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return sanitize(keys[a]) > sanitize(keys[b]); });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

inline std::vector<double> softmax(const std::vector<float>& logits) {
  const std::size_t n = logits.size();
  std::vector<double> x(n), p(n);
  double mx = -kInf;
  for (std::size_t i = 0; i < n; ++i) {
    x[i] = sanitize(logits[i]);
    mx = std::max(mx, x[i]);
  }
  if (mx == kInf) {
    const double c = static_cast<double>(std::count(x.begin(), x.end(), kInf));
    for (std::size_t i = 0; i < n; ++i) p[i] = x[i] == kInf ? 1.0 / c : 0.0;
    return p;
  }
  if (mx == -kInf) return std::vector<double>(n, 1.0 / static_cast<double>(n));
  double sum = 0;
  for (std::size_t i = 0; i < n; ++i) sum += (p[i] = std::exp(x[i] - mx));
  for (double& v : p) v /= sum;
  return p;
}

inline double sigmoid(double x) { return std::isnan(x) ? 0.0 : 1.0 / (1.0 + std::exp(-x)); }

struct Routed {
  std::vector<int> ids;
  std::vector<double> weights;
};

enum class Scoring { kSoftmax, kSigmoid };

struct RoutingConfig {
  Scoring scoring = Scoring::kSoftmax;
  int top_k = 1;
  bool renormalize = false;
  double routed_scaling_factor = 1.0;
  std::vector<float> correction_bias;  // empty: none
  int num_expert_group = 0;            // 0: not grouped
  int topk_group = 0;
};

inline void finish(Routed& r, bool renormalize, double rsf) {
  if (renormalize) {
    double s = 0;
    for (double w : r.weights) s += w;
    if (s > 0) for (double& w : r.weights) w /= s;
  }
  for (double& w : r.weights) w *= rsf;
}

// Softmax / sigmoid top-k, optionally biased for selection and grouped (DeepSeek).
inline Routed route(const std::vector<float>& logits, const RoutingConfig& c) {
  const int n = static_cast<int>(logits.size());
  std::vector<double> scores;
  if (c.scoring == Scoring::kSoftmax) {
    scores = softmax(logits);
  } else {
    scores.resize(n);
    for (int i = 0; i < n; ++i) scores[i] = sigmoid(logits[i]);
  }
  std::vector<double> keys = scores;
  const bool biased = !c.correction_bias.empty();
  if (biased) for (int i = 0; i < n; ++i) keys[i] += c.correction_bias[i];
  if (c.num_expert_group > 0) {
    const int G = c.num_expert_group, per = n / G;
    std::vector<double> group_score(G);
    for (int g = 0; g < G; ++g) {
      std::vector<double> member(keys.begin() + g * per, keys.begin() + (g + 1) * per);
      std::sort(member.begin(), member.end(), std::greater<>());
      group_score[g] = biased ? (per >= 2 ? member[0] + member[1] : member[0]) : member[0];
    }
    const std::vector<int> kept = topk_indices(group_score, c.topk_group);
    for (int g = 0; g < G; ++g) {
      if (std::find(kept.begin(), kept.end(), g) == kept.end()) {
        for (int i = g * per; i < (g + 1) * per; ++i) keys[i] = -kInf;
      }
    }
  }
  Routed r;
  r.ids = topk_indices(keys, c.top_k);
  for (int id : r.ids) r.weights.push_back(scores[id]);
  finish(r, c.renormalize, c.routed_scaling_factor);
  return r;
}

// Llama-4: top-k of the raw logits, weight = sigmoid(logit).
inline Routed route_llama4(const std::vector<float>& logits, int top_k) {
  std::vector<double> keys(logits.begin(), logits.end());
  Routed r;
  r.ids = topk_indices(keys, top_k);
  for (int id : r.ids) r.weights.push_back(sigmoid(logits[id]));
  return r;
}

// ---------------------------------------------------------------------------------------------
// The fused MoE layer.

using Rounder = std::function<double(double)>;  // rounds to the IO storage type (identity for none)

struct Layer {
  int hidden = 0, intermediate = 0, num_local_experts = 0, num_experts = 0;
  bool gated = true;
  bool interleaved = false;
  std::function<double(double, double)> gated_act;  // (gate, up)
  std::function<double(double)> act;                 // ungated
  // Weights are stored as float (every storage type converts to float exactly); sums are double.
  std::vector<float> w13;  // [E_local][N1][H]
  std::vector<float> w2;   // [E_local][H][I]
  std::vector<double> b13;  // [E_local][N1] or empty
  std::vector<double> b2;   // [E_local][H] or empty
  std::vector<int> expert_map;  // [E_global] or empty
  bool weight_on_input = false;
  int width1() const { return gated ? 2 * intermediate : intermediate; }
};

// Output [M][H] for hidden [M][H] and routing (ids are global). `round_io` models the library's
// documented rounding points; pass the identity for an exact double-precision result.
inline std::vector<double> fused_moe(const Layer& L, const std::vector<double>& hidden, int M,
                                     const std::vector<Routed>& routed, const Rounder& round_io) {
  const int H = L.hidden, I = L.intermediate, N1 = L.width1();
  std::vector<double> out(static_cast<std::size_t>(M) * H, 0.0);
  std::vector<double> x(H), g1(N1), a(I), y(H);
  for (int m = 0; m < M; ++m) {
    std::vector<double> acc(H, 0.0);
    for (std::size_t j = 0; j < routed[m].ids.size(); ++j) {
      const int id = routed[m].ids[j];
      if (id < 0 || id >= L.num_experts) continue;
      const int e = L.expert_map.empty() ? id : L.expert_map[id];
      if (e < 0) continue;
      const double w = routed[m].weights[j];
      for (int c = 0; c < H; ++c) {
        x[c] = hidden[static_cast<std::size_t>(m) * H + c];
        if (L.weight_on_input) x[c] = round_io(x[c] * round_io(w));
      }
      for (int r = 0; r < N1; ++r) {
        double s = 0;
        const float* wr = &L.w13[(static_cast<std::size_t>(e) * N1 + r) * H];
        for (int c = 0; c < H; ++c) s += static_cast<double>(wr[c]) * x[c];
        if (!L.b13.empty()) s += L.b13[static_cast<std::size_t>(e) * N1 + r];
        g1[r] = s;
      }
      for (int i = 0; i < I; ++i) {
        if (L.gated) {
          const double gate = L.interleaved ? g1[2 * i] : g1[i];
          const double up = L.interleaved ? g1[2 * i + 1] : g1[I + i];
          a[i] = round_io(L.gated_act(round_io(gate), round_io(up)));
        } else {
          a[i] = round_io(L.act(round_io(g1[i])));
        }
      }
      for (int c = 0; c < H; ++c) {
        double s = 0;
        const float* wr = &L.w2[(static_cast<std::size_t>(e) * H + c) * I];
        for (int i = 0; i < I; ++i) s += static_cast<double>(wr[i]) * a[i];
        if (!L.b2.empty()) s += L.b2[static_cast<std::size_t>(e) * H + c];
        s = round_io(s);  // the stored expert output
        if (!L.weight_on_input) s = round_io(s * w);
        acc[c] += s;
      }
    }
    for (int c = 0; c < H; ++c) out[static_cast<std::size_t>(m) * H + c] = round_io(acc[c]);
  }
  return out;
}

// Activations, written independently of moe/activation.h.
inline double silu(double x) { return x / (1.0 + std::exp(-x)); }
inline double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
inline double gelu_tanh(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}
inline double swigluoai(double gate, double up, double alpha = 1.702, double limit = 7.0) {
  const double g = std::min(gate, limit);
  const double u = std::clamp(up, -limit, limit);
  return (u + 1.0) * g / (1.0 + std::exp(-alpha * g));
}
inline double relu2(double x) { return x > 0 ? x * x : 0.0; }

}  // namespace moe::naive
