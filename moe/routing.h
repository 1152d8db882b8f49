// Routing policies: router logits [M, E] -> topk_ids [M, k] (int32) and topk_weights [M, k] (fp32).
//
// A policy routes one token at a time through `route_token(const TokenContext&, const Arguments&)`.
// That scalar code is the semantics on both backends (the CPU reference and the generic CUDA
// path); fast CUDA paths for the built-ins must agree with it.
//
// Conventions shared by every built-in policy (and offered to user policies via select_topk):
//  * Ties go to the lower expert id; ids are written in descending order of their selection key.
//  * Non-finite logits: NaN counts as -inf. Softmax over a row whose maximum is +inf gives the
//    +inf entries equal shares and the rest zero; a row with no finite or +inf entry (all NaN or
//    -inf) gives the uniform distribution 1/E. Sigmoid maps -inf (and NaN) to 0 and +inf to 1.
//    So every token always gets k distinct ids in [0, E) and finite weights, and a bad row never
//    affects another token.
//  * renormalize divides the selected weights by their sum when that sum is > 0 (otherwise the
//    weights stay as they are: all zero); routed_scaling_factor then multiplies them, exactly once.
#pragma once

#include <concepts>
#include <cstdint>
#include <string_view>

#include "moe/config.h"
#include "moe/detail/math.h"
#include "moe/status.h"

namespace moe::routing {

// Everything one token's routing sees and writes.
struct TokenContext {
  const float* logits;            // [num_experts] raw router logits of this token
  int num_experts;                // E (global)
  int top_k;                      // k
  const float* correction_bias;   // [num_experts] or nullptr (e_score_correction_bias)
  float* scratch;                 // kScratchPerExpert * num_experts floats, owned by the caller
  std::int32_t* index_scratch;    // num_experts ints, owned by the caller
  std::int32_t* ids;              // out: [top_k]
  float* weights;                 // out: [top_k]
};
// Scratch floats per expert that a TokenContext provides.
inline constexpr int kScratchPerExpert = 4;

// ---------------------------------------------------------------------------------------------
// Building blocks for built-in and user policies.

// True when key a (at index ia) ranks before key b (at index ib): larger key, then lower index.
// NaN ranks last.
MOE_HOST_DEVICE bool ranks_before(float a, int ia, float b, int ib) {
  const float x = math::isnan(a) ? -math::infinity() : a;
  const float y = math::isnan(b) ? -math::infinity() : b;
  return x > y || (x == y && ia < ib);
}

// The k best of keys[0, n) by ranks_before, written in rank order to ids (and their keys to
// selected_keys). O(n*k); k <= n.
MOE_HOST_DEVICE void select_topk(const float* keys, int n, int k, std::int32_t* ids, float* selected_keys) {
  int filled = 0;
  for (int i = 0; i < n; ++i) {
    const float key = keys[i];
    if (filled == k && !ranks_before(key, i, selected_keys[k - 1], ids[k - 1])) continue;
    int pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && ranks_before(key, i, selected_keys[pos - 1], ids[pos - 1])) {
      ids[pos] = ids[pos - 1];
      selected_keys[pos] = selected_keys[pos - 1];
      --pos;
    }
    ids[pos] = i;
    selected_keys[pos] = key;
  }
}

// Softmax over n logits with the non-finite conventions above.
MOE_HOST_DEVICE void softmax(const float* logits, int n, float* out) {
  const float inf = math::infinity();
  float max_v = -inf;
  int num_pos_inf = 0;
  for (int i = 0; i < n; ++i) {
    const float x = math::isnan(logits[i]) ? -inf : logits[i];
    max_v = math::fmax(max_v, x);
    num_pos_inf += (x == inf);
  }
  if (max_v == inf) {
    for (int i = 0; i < n; ++i) out[i] = logits[i] == inf ? 1.0f / static_cast<float>(num_pos_inf) : 0.0f;
    return;
  }
  if (max_v == -inf) {
    for (int i = 0; i < n; ++i) out[i] = 1.0f / static_cast<float>(n);
    return;
  }
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float x = math::isnan(logits[i]) ? -inf : logits[i];
    out[i] = math::exp(x - max_v);
    sum += out[i];
  }
  const float inv = 1.0f / sum;
  for (int i = 0; i < n; ++i) out[i] *= inv;
}

MOE_HOST_DEVICE float safe_sigmoid(float x) {
  return math::isnan(x) ? 0.0f : math::sigmoid(x);
}

MOE_HOST_DEVICE void sigmoid(const float* logits, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = safe_sigmoid(logits[i]);
}

// Renormalization (guarded) followed by the routed scaling factor.
MOE_HOST_DEVICE void finish_weights(float* w, int k, bool renormalize, float routed_scaling_factor) {
  if (renormalize) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += w[j];
    if (sum > 0.0f) {
      for (int j = 0; j < k; ++j) w[j] /= sum;
    }
  }
  if (routed_scaling_factor != 1.0f) {
    for (int j = 0; j < k; ++j) w[j] *= routed_scaling_factor;
  }
}

// Scoring functions for the scored policies.
struct Softmax {
  static constexpr std::string_view kName = "softmax";
  static constexpr std::string_view kTopKName = "softmax_topk";            // ScoredTopK<Softmax>
  static constexpr std::string_view kGroupedName = "grouped_softmax_topk";  // GroupedTopK<Softmax>
  MOE_HOST_DEVICE static void score(const float* logits, int n, float* out) { softmax(logits, n, out); }
};
struct Sigmoid {
  static constexpr std::string_view kName = "sigmoid";
  static constexpr std::string_view kTopKName = "sigmoid_topk";
  static constexpr std::string_view kGroupedName = "grouped_sigmoid_topk";
  MOE_HOST_DEVICE static void score(const float* logits, int n, float* out) { sigmoid(logits, n, out); }
};

// Base for routing policies: defaults for the optional members.
struct TopKBase {
  static constexpr bool kUsesLogits = true;             // false: ids/weights are given (Precomputed)
  static constexpr bool kAcceptsCorrectionBias = false;  // whether e_score_correction_bias is read
  struct Arguments {};
  template <class Args>
  static Status can_implement(const Args&, int /*num_experts*/, int /*top_k*/) {
    return Status::ok();
  }
};

// ---------------------------------------------------------------------------------------------
// Built-in policies.

// Scores = Scoring(logits); optional correction bias added for selection only; top-k of the
// (biased) scores; weights are the unbiased scores; renormalize; times routed_scaling_factor.
// ScoredTopK<Softmax> is vLLM's fused_topk, ScoredTopK<Sigmoid> its topk_sigmoid, and with a bias
// both are FusedTopKBiasRouter.
template <class Scoring>
struct ScoredTopK : TopKBase {
  static constexpr std::string_view kName = Scoring::kTopKName;
  static constexpr bool kAcceptsCorrectionBias = true;
  struct Arguments {
    bool renormalize = false;
    float routed_scaling_factor = 1.0f;
  };
  static Status can_implement(const Arguments& a, int, int) {
    if (!(a.routed_scaling_factor == a.routed_scaling_factor)) {
      return invalid_argument("routing.routed_scaling_factor: expected a number, got NaN");
    }
    return Status::ok();
  }
  MOE_HOST_DEVICE static void route_token(const TokenContext& t, const Arguments& a) {
    const int n = t.num_experts;
    float* scores = t.scratch;
    float* keys = t.scratch + n;
    Scoring::score(t.logits, n, scores);
    const float* select_on = scores;
    if (t.correction_bias != nullptr) {
      for (int i = 0; i < n; ++i) keys[i] = scores[i] + t.correction_bias[i];
      select_on = keys;
    }
    select_topk(select_on, n, t.top_k, t.ids, t.weights);
    for (int j = 0; j < t.top_k; ++j) t.weights[j] = scores[t.ids[j]];
    finish_weights(t.weights, t.top_k, a.renormalize, a.routed_scaling_factor);
  }
};
using SoftmaxTopK = ScoredTopK<Softmax>;
using SigmoidTopK = ScoredTopK<Sigmoid>;

// DeepSeek-style grouped top-k: experts form num_expert_group equal groups; a group's score is
// the sum of its top-2 biased scores when a correction bias is given, else its maximum score;
// the topk_group best groups are kept and top-k runs over their experts. Weights are the
// unbiased scores, renormalized, then scaled. E must be divisible by num_expert_group (vLLM
// silently falls back to plain top-k there; we report it instead).
template <class Scoring>
struct GroupedTopK : TopKBase {
  static constexpr std::string_view kName = Scoring::kGroupedName;
  static constexpr bool kAcceptsCorrectionBias = true;
  struct Arguments {
    int num_expert_group = 1;
    int topk_group = 1;
    bool renormalize = false;
    float routed_scaling_factor = 1.0f;
  };
  static Status can_implement(const Arguments& a, int num_experts, int top_k) {
    if (a.num_expert_group < 1 || a.num_expert_group > num_experts || num_experts % a.num_expert_group != 0) {
      return invalid_argument("routing.num_expert_group: expected a divisor of num_experts=", num_experts,
                              ", got ", a.num_expert_group);
    }
    if (a.topk_group < 1 || a.topk_group > a.num_expert_group) {
      return invalid_argument("routing.topk_group: expected 1 <= topk_group <= num_expert_group=",
                              a.num_expert_group, ", got ", a.topk_group);
    }
    const int reachable = a.topk_group * (num_experts / a.num_expert_group);
    if (top_k > reachable) {
      return invalid_argument("top_k: expected <= topk_group * experts_per_group = ", reachable, ", got ", top_k);
    }
    if (!(a.routed_scaling_factor == a.routed_scaling_factor)) {
      return invalid_argument("routing.routed_scaling_factor: expected a number, got NaN");
    }
    return Status::ok();
  }
  MOE_HOST_DEVICE static void route_token(const TokenContext& t, const Arguments& a) {
    const int n = t.num_experts;
    const int groups = a.num_expert_group;
    const int per_group = n / groups;
    float* scores = t.scratch;
    float* keys = t.scratch + n;
    float* group_keys = t.scratch + 2 * n;
    Scoring::score(t.logits, n, scores);
    const bool biased = t.correction_bias != nullptr;
    for (int i = 0; i < n; ++i) keys[i] = biased ? scores[i] + t.correction_bias[i] : scores[i];
    for (int g = 0; g < groups; ++g) {
      const float* k = keys + g * per_group;
      if (biased) {  // sum of the two largest (or the only one)
        float best = -math::infinity(), second = -math::infinity();
        for (int i = 0; i < per_group; ++i) {
          if (ranks_before(k[i], 0, best, 0)) {
            second = best;
            best = k[i];
          } else if (ranks_before(k[i], 0, second, 0)) {
            second = k[i];
          }
        }
        group_keys[g] = per_group >= 2 ? best + second : best;
      } else {
        float best = -math::infinity();
        for (int i = 0; i < per_group; ++i) best = math::fmax(best, k[i]);
        group_keys[g] = best;
      }
    }
    // Keep the topk_group best groups (ties: lower group); mask every other expert to -inf.
    std::int32_t* kept = t.index_scratch;
    float* kept_keys = group_keys + groups;  // groups + topk_group <= 2 * n floats after 2 * n
    select_topk(group_keys, groups, a.topk_group, kept, kept_keys);
    for (int g = 0; g < groups; ++g) {
      bool keep = false;
      for (int j = 0; j < a.topk_group; ++j) keep = keep || kept[j] == g;
      if (!keep) {
        for (int i = 0; i < per_group; ++i) keys[g * per_group + i] = -math::infinity();
      }
    }
    // Masked experts rank after every kept one: -inf ties are broken by index, and kept keys are
    // never -inf unless the kept experts' scores are -inf themselves (impossible: scores are finite).
    select_topk(keys, n, t.top_k, t.ids, t.weights);
    for (int j = 0; j < t.top_k; ++j) t.weights[j] = scores[t.ids[j]];
    finish_weights(t.weights, t.top_k, a.renormalize, a.routed_scaling_factor);
  }
};

// Llama-4: top-k (k = 1 in the model) on the raw logits; weight = sigmoid(chosen logit). No
// softmax, no renormalization. Used with apply_router_weight_on_input.
struct Llama4TopK : TopKBase {
  static constexpr std::string_view kName = "llama4_top1_sigmoid";
  struct Arguments {};
  MOE_HOST_DEVICE static void route_token(const TokenContext& t, const Arguments&) {
    select_topk(t.logits, t.num_experts, t.top_k, t.ids, t.weights);
    for (int j = 0; j < t.top_k; ++j) t.weights[j] = safe_sigmoid(t.logits[t.ids[j]]);
  }
};

// The caller already routed (vLLM's modular path): topk_ids and topk_weights are inputs.
struct Precomputed : TopKBase {
  static constexpr std::string_view kName = "precomputed";
  static constexpr bool kUsesLogits = false;
  struct Arguments {};
};

// ---------------------------------------------------------------------------------------------

template <class R>
concept RoutingPolicy =
    requires {
      { R::kName } -> std::convertible_to<std::string_view>;
      { R::kUsesLogits } -> std::convertible_to<bool>;
      { R::kAcceptsCorrectionBias } -> std::convertible_to<bool>;
      typename R::Arguments;
    } &&
    requires(const typename R::Arguments& a, int e, int k) {
      { R::can_implement(a, e, k) } -> std::same_as<Status>;
    } &&
    (!R::kUsesLogits || requires(const TokenContext& t, const typename R::Arguments& a) { R::route_token(t, a); });

static_assert(RoutingPolicy<SoftmaxTopK>);
static_assert(RoutingPolicy<SigmoidTopK>);
static_assert(RoutingPolicy<GroupedTopK<Softmax>>);
static_assert(RoutingPolicy<GroupedTopK<Sigmoid>>);
static_assert(RoutingPolicy<Llama4TopK>);
static_assert(RoutingPolicy<Precomputed>);

}  // namespace moe::routing
