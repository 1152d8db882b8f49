// Shared by the routing tests (testing/cpu/routing_*_test.cc, one binary): select_experts run
// with sentinel-filled outputs, the reference keys of every built-in policy, and the logits and
// argument grids.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "moe/cpu/ops.h"
#include "moe/routing.h"
#include "moe/status.h"
#include "moe/tensor.h"
#include "testing/lib/naive.h"
#include "testing/lib/random.h"

namespace moe::testing::routing_tests {

using moe::HostView;
using moe::Index;
using moe::Status;
using moe::StatusCode;
using moe::testing::Random;
namespace routing = moe::routing;
namespace naive = moe::naive;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Running select_experts.

struct Routed {
  Status status;
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
};

// Runs select_experts<Policy> on logits [M, E]. Outputs are pre-filled with sentinels.
template <class Policy>
Routed select(const std::vector<float>& logits, Index M, Index E, int top_k, const typename Policy::Arguments& args,
              const std::vector<float>* bias = nullptr, Index ids_rows = -1, Index ids_cols = -1, Index w_rows = -1,
              Index w_cols = -1) {
  if (ids_rows < 0) ids_rows = M;
  if (ids_cols < 0) ids_cols = top_k;
  if (w_rows < 0) w_rows = M;
  if (w_cols < 0) w_cols = top_k;
  Routed r;
  r.ids.assign(static_cast<std::size_t>(std::max<Index>(ids_rows * ids_cols, 0)), -12345);
  r.weights.assign(static_cast<std::size_t>(std::max<Index>(w_rows * w_cols, 0)), std::bit_cast<float>(0x7fa5a5a5u));
  HostView<const float, 2> lv(logits.data(), {M, E});
  std::optional<HostView<const float, 1>> bv;
  if (bias != nullptr) bv.emplace(bias->data(), std::array<Index, 1>{static_cast<Index>(bias->size())});
  r.status = moe::cpu::select_experts<Policy>(lv, top_k, args, bv, HostView<std::int32_t, 2>(r.ids.data(), {ids_rows, ids_cols}),
                                              HostView<float, 2>(r.weights.data(), {w_rows, w_cols}));
  return r;
}

inline std::vector<float> row_of(const std::vector<float>& logits, Index E, Index m) {
  return std::vector<float>(logits.begin() + m * E, logits.begin() + (m + 1) * E);
}

// Ids exact; weights within `rtol` relative (plus a tiny absolute term for exact zeros).
inline ::testing::AssertionResult matches_reference(const Routed& got, Index M, int k,
                                             const std::function<naive::Routed(Index)>& reference,
                                             double rtol = 1e-5) {
  if (!got.status.is_ok()) return ::testing::AssertionFailure() << "status: " << got.status.to_string();
  for (Index m = 0; m < M; ++m) {
    const naive::Routed ref = reference(m);
    for (int j = 0; j < k; ++j) {
      const std::int32_t id = got.ids[m * k + j];
      const double w = got.weights[m * k + j];
      if (id != ref.ids[j]) {
        std::ostringstream os;
        os << "token " << m << " slot " << j << ": id " << id << ", expected " << ref.ids[j] << " (row ids:";
        for (int i = 0; i < k; ++i) os << ' ' << got.ids[m * k + i];
        os << " vs";
        for (int i = 0; i < k; ++i) os << ' ' << ref.ids[i];
        os << ")";
        return ::testing::AssertionFailure() << os.str();
      }
      const double e = ref.weights[j];
      if (!(std::abs(w - e) <= rtol * std::abs(e) + 1e-30)) {
        return ::testing::AssertionFailure() << "token " << m << " slot " << j << " (id " << id << "): weight " << w
                                             << ", expected " << e << " (rel err " << std::abs(w - e) / std::abs(e) << ")";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// Selection keys in double, as naive::route defines them: scores (+ bias); experts outside the
// kept groups at -inf. Used only to tell a genuine near-tie from a wrong selection.
inline std::vector<double> reference_keys(const std::vector<float>& row, const naive::RoutingConfig& c,
                                   std::vector<double>* scores_out) {
  const int n = static_cast<int>(row.size());
  std::vector<double> scores(static_cast<std::size_t>(n));
  if (c.scoring == naive::Scoring::kSoftmax) {
    scores = naive::softmax(row);
  } else {
    for (int i = 0; i < n; ++i) scores[i] = naive::sigmoid(row[i]);
  }
  std::vector<double> keys = scores;
  const bool biased = !c.correction_bias.empty();
  if (biased) for (int i = 0; i < n; ++i) keys[i] += c.correction_bias[i];
  if (c.num_expert_group > 0) {
    const int G = c.num_expert_group, per = n / G;
    std::vector<double> group_score(static_cast<std::size_t>(G));
    for (int g = 0; g < G; ++g) {
      std::vector<double> member(keys.begin() + g * per, keys.begin() + (g + 1) * per);
      std::sort(member.begin(), member.end(), std::greater<>());
      group_score[g] = biased && per >= 2 ? member[0] + member[1] : member[0];
    }
    const std::vector<int> kept = naive::topk_indices(group_score, c.topk_group);
    for (int g = 0; g < G; ++g) {
      if (std::find(kept.begin(), kept.end(), g) != kept.end()) continue;
      for (int i = g * per; i < (g + 1) * per; ++i) keys[i] = -naive::kInf;
    }
  }
  *scores_out = std::move(scores);
  return keys;
}

// Scored policies vs naive::route. Ids must match exactly, except that two experts whose double
// selection keys differ by no more than float rounding of the key (score + bias) may come in
// either order: such rows are counted in `tie_rows`, and their weights are checked against the
// reference weights of the ids actually chosen.
inline ::testing::AssertionResult matches_scored_reference(const Routed& got, const std::vector<float>& logits, Index M, int E,
                                                    int k, const naive::RoutingConfig& cfg, int* tie_rows) {
  if (!got.status.is_ok()) return ::testing::AssertionFailure() << "status: " << got.status.to_string();
  for (Index m = 0; m < M; ++m) {
    const std::vector<float> row = row_of(logits, E, m);
    naive::Routed ref = naive::route(row, cfg);
    const std::vector<int> ids(got.ids.begin() + m * k, got.ids.begin() + (m + 1) * k);
    if (ids != ref.ids) {
      std::vector<double> scores;
      const std::vector<double> keys = reference_keys(row, cfg, &scores);
      if (std::set<int>(ids.begin(), ids.end()).size() != ids.size()) {
        return ::testing::AssertionFailure() << "token " << m << ": duplicate ids";
      }
      for (int j = 0; j < k; ++j) {
        const int g = ids[j], r = ref.ids[j];
        if (g < 0 || g >= E) return ::testing::AssertionFailure() << "token " << m << " slot " << j << ": id " << g;
        const double tol = 2e-6 * (scores[g] + scores[r]) + 0x1p-22 * (std::abs(keys[g]) + std::abs(keys[r]));
        if (!(std::abs(keys[g] - keys[r]) <= tol)) {
          return ::testing::AssertionFailure()
                 << "token " << m << " slot " << j << ": id " << g << " (key " << keys[g] << "), expected " << r
                 << " (key " << keys[r] << "): not a near-tie";
        }
      }
      ref.ids = ids;
      ref.weights.clear();
      for (int id : ids) ref.weights.push_back(scores[id]);
      naive::finish(ref, cfg.renormalize, cfg.routed_scaling_factor);
      ++*tie_rows;
    }
    for (int j = 0; j < k; ++j) {
      const double w = got.weights[m * k + j], e = ref.weights[j];
      if (!(std::abs(w - e) <= 1e-5 * std::abs(e) + 1e-30)) {
        return ::testing::AssertionFailure() << "token " << m << " slot " << j << " (id " << ref.ids[j] << "): weight " << w
                                             << ", expected " << e << " (rel err " << std::abs(w - e) / std::abs(e) << ")";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// Every row: k distinct ids in [0, E), finite weights.
inline ::testing::AssertionResult well_formed(const Routed& got, Index M, Index E, int k) {
  if (!got.status.is_ok()) return ::testing::AssertionFailure() << "status: " << got.status.to_string();
  for (Index m = 0; m < M; ++m) {
    std::set<std::int32_t> seen;
    for (int j = 0; j < k; ++j) {
      const std::int32_t id = got.ids[m * k + j];
      if (id < 0 || id >= E) return ::testing::AssertionFailure() << "token " << m << " slot " << j << ": id " << id << " out of range";
      if (!seen.insert(id).second) return ::testing::AssertionFailure() << "token " << m << ": duplicate id " << id;
      if (!std::isfinite(got.weights[m * k + j])) {
        return ::testing::AssertionFailure() << "token " << m << " slot " << j << ": weight " << got.weights[m * k + j];
      }
    }
  }
  return ::testing::AssertionSuccess();
}

inline std::vector<int> sizes_top_k(int E) {
  std::vector<int> ks;
  for (int k : {1, 2, 8, E}) {
    if (k <= E && std::find(ks.begin(), ks.end(), k) == ks.end()) ks.push_back(k);
  }
  return ks;
}

// Bias for the scored policies: comparable to the spread of the scores so that it changes the
// selection, but does not fully dominate it.
inline std::vector<float> make_bias(Random& rng, int E, naive::Scoring scoring) {
  const float scale = scoring == naive::Scoring::kSoftmax ? 2.0f / static_cast<float>(E) : 0.3f;
  return rng.uniform_vector<float>(static_cast<std::size_t>(E), -scale, scale);
}

// Gapped logits. For sigmoid scoring the spread stays within about [-6, 6]: beyond that float
// sigmoid saturates to 1.0f, so distinct logits tie in float (lower id wins) but not in double.
inline std::vector<float> scored_logits(Random& rng, Index M, int E, naive::Scoring scoring) {
  const float gap = scoring == naive::Scoring::kSigmoid ? std::min(0.05f, 10.0f / static_cast<float>(E)) : 0.05f;
  return rng.gapped_logits(static_cast<std::size_t>(M), static_cast<std::size_t>(E), gap);
}

inline std::string describe(naive::Scoring s, Index M, int E, int k, bool renorm, bool bias, float rsf, int groups = 0,
                     int topk_group = 0) {
  std::ostringstream os;
  os << (s == naive::Scoring::kSoftmax ? "softmax" : "sigmoid") << " M=" << M << " E=" << E << " k=" << k
     << " renormalize=" << renorm << " bias=" << bias << " rsf=" << rsf;
  if (groups > 0) os << " groups=" << groups << " topk_group=" << topk_group;
  return os.str();
}

}  // namespace moe::testing::routing_tests
