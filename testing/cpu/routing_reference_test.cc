// Routing policies through the standalone op moe::cpu::select_experts, checked against the
// independent double-precision definitions of testing/lib/naive.h: every built-in policy on random
// (gapped) logits over a grid of M, E, top_k, renormalize, correction bias, routed_scaling_factor
// and grouping; and a user policy written here through the public headers only.
#include "testing/cpu/routing_test_support.h"

namespace moe::testing::routing_tests {
namespace {

// ---------------------------------------------------------------------------------------------
// Built-in policies vs the naive reference.

template <class Policy>
void check_scored_grid(naive::Scoring scoring, std::uint64_t seed) {
  Random rng(seed);
  int cases = 0, bias_changed_rows = 0, rows = 0, tie_rows = 0;
  for (int E : {1, 8, 64, 256, 512}) {
    for (int k : sizes_top_k(E)) {
      for (Index M : {Index{0}, Index{1}, Index{64}, Index{131}}) {
        if (M == 131 && E != 64) continue;  // one odd-sized batch is enough
        for (bool renorm : {false, true}) {
          for (bool with_bias : {false, true}) {
            for (float rsf : {1.0f, 2.5f}) {
              const std::vector<float> logits = scored_logits(rng, M, E, scoring);
              const std::vector<float> bias = make_bias(rng, E, scoring);
              typename Policy::Arguments args;
              args.renormalize = renorm;
              args.routed_scaling_factor = rsf;
              const Routed got = select<Policy>(logits, M, E, k, args, with_bias ? &bias : nullptr);
              naive::RoutingConfig cfg;
              cfg.scoring = scoring;
              cfg.top_k = k;
              cfg.renormalize = renorm;
              cfg.routed_scaling_factor = rsf;
              if (with_bias) cfg.correction_bias = bias;
              EXPECT_TRUE(matches_scored_reference(got, logits, M, E, k, cfg, &tie_rows))
                  << describe(scoring, M, E, k, renorm, with_bias, rsf);
              rows += M;
              if (with_bias) {
                naive::RoutingConfig unbiased = cfg;
                unbiased.correction_bias.clear();
                for (Index m = 0; m < M; ++m) {
                  const std::vector<float> row = row_of(logits, E, m);
                  bias_changed_rows += naive::route(row, cfg).ids != naive::route(row, unbiased).ids;
                }
              }
              ++cases;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(cases, 300);
  // Near-ties (only reachable through a bias over many experts) stay the exception.
  ::testing::Test::RecordProperty("rows", rows);
  ::testing::Test::RecordProperty("near_tie_rows", tie_rows);
  EXPECT_LT(tie_rows * 20, rows) << tie_rows << " of " << rows << " rows resolved as near-ties";
  // The bias must actually have changed the selection in many rows, or the bias cases test nothing.
  EXPECT_GT(bias_changed_rows, 500);
}

TEST(RoutingReference, SoftmaxTopKGrid) { check_scored_grid<routing::SoftmaxTopK>(naive::Scoring::kSoftmax, 101); }
TEST(RoutingReference, SigmoidTopKGrid) { check_scored_grid<routing::SigmoidTopK>(naive::Scoring::kSigmoid, 102); }

// Runs Policy::route_token directly for one token, on scratch of the documented size
// (kScratchPerExpert * E floats, E ints: what select_experts allocates) followed by a guard zone,
// and reports whether the policy wrote past the documented size. The result is written to `out`.
template <class Policy>
bool route_token_overflows_scratch(const std::vector<float>& row, int k, const typename Policy::Arguments& args,
                                   const std::vector<float>* bias, naive::Routed* out = nullptr) {
  const int E = static_cast<int>(row.size());
  const std::size_t nf = static_cast<std::size_t>(routing::kScratchPerExpert) * E, ni = static_cast<std::size_t>(E);
  const std::size_t guard = 2 * static_cast<std::size_t>(E) + 64;
  const float canary = std::bit_cast<float>(0x7fb0b0b0u);
  std::vector<float> scratch(nf + guard, canary);
  std::vector<std::int32_t> iscratch(ni + guard, -777);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(k));
  std::vector<float> weights(static_cast<std::size_t>(k));
  const routing::TokenContext t{row.data(), E, k, bias ? bias->data() : nullptr, scratch.data(), iscratch.data(),
                                ids.data(), weights.data()};
  Policy::route_token(t, args);
  if (out != nullptr) {
    out->ids.assign(ids.begin(), ids.end());
    out->weights.assign(weights.begin(), weights.end());
  }
  for (std::size_t i = nf; i < scratch.size(); ++i) {
    if (std::bit_cast<std::uint32_t>(scratch[i]) != 0x7fb0b0b0u) return true;
  }
  for (std::size_t i = ni; i < iscratch.size(); ++i) {
    if (iscratch[i] != -777) return true;
  }
  return false;
}

template <class Policy>
void check_grouped_grid(naive::Scoring scoring, std::uint64_t seed) {
  Random rng(seed);
  int cases = 0, rows = 0, tie_rows = 0, skipped = 0;
  for (int E : {1, 8, 64, 256, 512}) {
    for (int groups : {1, 2, 4, 8, 16}) {
      if (groups > E || E % groups != 0) continue;
      std::vector<int> topk_groups = {1, groups / 2, groups};
      std::sort(topk_groups.begin(), topk_groups.end());
      topk_groups.erase(std::unique(topk_groups.begin(), topk_groups.end()), topk_groups.end());
      for (int topk_group : topk_groups) {
        if (topk_group < 1) continue;
        const int reachable = topk_group * (E / groups);
        for (int k : sizes_top_k(E)) {
          if (k > reachable) continue;
          for (bool renorm : {false, true}) {
            for (bool with_bias : {false, true}) {
              const Index M = (cases % 3 == 0) ? 1 : 24;
              const float rsf = (cases % 2 == 0) ? 1.0f : 2.5f;
              const std::vector<float> logits = scored_logits(rng, M, E, scoring);
              const std::vector<float> bias = make_bias(rng, E, scoring);
              typename Policy::Arguments args;
              args.num_expert_group = groups;
              args.topk_group = topk_group;
              args.renormalize = renorm;
              args.routed_scaling_factor = rsf;
              // Configurations where route_token overruns its scratch (groups + topk_group > E; the
              // failure is reported by GroupedTopKStaysInsideItsScratch) are skipped: through
              // select_experts they corrupt the heap and take the whole binary down.
              if (M > 0 && route_token_overflows_scratch<Policy>(row_of(logits, E, 0), k, args, with_bias ? &bias : nullptr)) {
                ++skipped;
                continue;
              }
              const Routed got = select<Policy>(logits, M, E, k, args, with_bias ? &bias : nullptr);
              naive::RoutingConfig cfg;
              cfg.scoring = scoring;
              cfg.top_k = k;
              cfg.renormalize = renorm;
              cfg.routed_scaling_factor = rsf;
              cfg.num_expert_group = groups;
              cfg.topk_group = topk_group;
              if (with_bias) cfg.correction_bias = bias;
              EXPECT_TRUE(matches_scored_reference(got, logits, M, E, k, cfg, &tie_rows))
                  << describe(scoring, M, E, k, renorm, with_bias, rsf, groups, topk_group);
              rows += M;
              EXPECT_TRUE(well_formed(got, M, E, k));
              ++cases;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(cases, 100);
  ::testing::Test::RecordProperty("rows", rows);
  ::testing::Test::RecordProperty("near_tie_rows", tie_rows);
  ::testing::Test::RecordProperty("skipped_for_scratch_overflow", skipped);
  EXPECT_LT(skipped * 10, cases) << skipped << " configurations skipped for scratch overflow";
  EXPECT_LT(tie_rows * 20, rows) << tie_rows << " of " << rows << " rows resolved as near-ties";
  // M = 0 through the grouped policy.
  typename Policy::Arguments args;
  args.num_expert_group = 8;
  args.topk_group = 4;
  const Routed empty = select<Policy>({}, 0, 256, 8, args);
  EXPECT_TRUE(empty.status.is_ok()) << empty.status.to_string();
}

TEST(RoutingReference, GroupedSoftmaxGrid) { check_grouped_grid<routing::GroupedTopK<routing::Softmax>>(naive::Scoring::kSoftmax, 201); }
TEST(RoutingReference, GroupedSigmoidGrid) { check_grouped_grid<routing::GroupedTopK<routing::Sigmoid>>(naive::Scoring::kSigmoid, 202); }

// GroupedTopK keeps its group keys at scratch[2E, 2E + groups) and the kept groups' keys right
// after them, [2E + groups, 2E + groups + topk_group): past the 3E floats of TokenContext::scratch
// whenever groups + topk_group > E, e.g. one expert per group. select_experts then overflows its
// heap buffer (AddressSanitizer: heap-buffer-overflow in select_topk, routing.h).
TEST(RoutingReference, GroupedTopKStaysInsideItsScratch) {
  Random rng(204);
  struct Case {
    int E, groups, topk_group, k;
  };
  for (const Case c : {Case{1, 1, 1, 1}, Case{8, 8, 1, 1}, Case{8, 8, 4, 2}, Case{8, 8, 8, 8}, Case{16, 16, 4, 4},
                       Case{8, 4, 4, 2}, Case{64, 32, 32, 8}}) {
    for (bool with_bias : {false, true}) {
      const std::vector<float> row = rng.gapped_logits(1, c.E);
      const std::vector<float> bias = rng.uniform_vector<float>(c.E, -0.1f, 0.1f);
      routing::GroupedTopK<routing::Sigmoid>::Arguments args{c.groups, c.topk_group, true, 1.0f};
      naive::Routed got;
      const bool overflow = route_token_overflows_scratch<routing::GroupedTopK<routing::Sigmoid>>(
          row, c.k, args, with_bias ? &bias : nullptr, &got);
      EXPECT_FALSE(overflow) << "E=" << c.E << " num_expert_group=" << c.groups << " topk_group=" << c.topk_group
                             << " k=" << c.k << ": wrote past kScratchPerExpert * E = " << 3 * c.E << " scratch floats";
      // The routing itself is right when given room.
      naive::RoutingConfig cfg{naive::Scoring::kSigmoid, c.k, true, 1.0, with_bias ? bias : std::vector<float>{}, c.groups,
                               c.topk_group};
      const naive::Routed ref = naive::route(row, cfg);
      EXPECT_EQ(std::vector<int>(got.ids.begin(), got.ids.end()), ref.ids);
      for (int j = 0; j < c.k; ++j) EXPECT_NEAR(got.weights[j], ref.weights[j], 1e-5 * ref.weights[j]);
    }
  }
}

// DeepSeek-V3 shape: E=256, 8 groups, topk_group=4, k=8, sigmoid + bias, renormalize, rsf 2.5.
TEST(RoutingReference, GroupedSigmoidDeepSeekV3) {
  Random rng(203);
  const Index M = 257;
  const int E = 256, k = 8;
  const std::vector<float> logits = rng.gapped_logits(M, E, 0.01f);
  const std::vector<float> bias = rng.uniform_vector<float>(E, -0.2f, 0.2f);
  routing::GroupedTopK<routing::Sigmoid>::Arguments args{8, 4, true, 2.5f};
  const Routed got = select<routing::GroupedTopK<routing::Sigmoid>>(logits, M, E, k, args, &bias);
  naive::RoutingConfig cfg{naive::Scoring::kSigmoid, k, true, 2.5, bias, 8, 4};
  EXPECT_TRUE(matches_reference(got, M, k, [&](Index m) { return naive::route(row_of(logits, E, m), cfg); }));
  for (Index m = 0; m < M; ++m) {
    // Selected experts come from at most topk_group = 4 groups; weights sum to rsf.
    std::set<int> groups;
    double sum = 0;
    for (int j = 0; j < k; ++j) {
      groups.insert(got.ids[m * k + j] / 32);
      sum += got.weights[m * k + j];
    }
    EXPECT_LE(groups.size(), 4u) << "token " << m;
    EXPECT_NEAR(sum, 2.5, 1e-5) << "token " << m;
  }
}

// Group score = max without a bias, sum of the top two (biased) scores with one: a zero bias
// changes the kept group.
TEST(RoutingReference, GroupScoreIsMaxWithoutBiasAndTopTwoSumWithBias) {
  using G = routing::GroupedTopK<routing::Sigmoid>;
  const int E = 8, k = 2;
  // Group 0 = experts 0..3 holds the single best expert; group 1 = experts 4..7 holds two
  // strong ones whose sum beats group 0's top two.
  const std::vector<float> logits = {3.0f, -4.0f, -4.5f, -5.0f, 1.0f, 0.9f, -3.0f, -3.5f};
  const std::vector<float> zero_bias(E, 0.0f);
  G::Arguments args{2, 1, false, 1.0f};
  const Routed plain = select<G>(logits, 1, E, k, args);
  ASSERT_TRUE(plain.status.is_ok()) << plain.status.to_string();
  EXPECT_EQ(plain.ids, (std::vector<std::int32_t>{0, 1}));  // group 0 kept: max 3.0 > 1.0
  const Routed biased = select<G>(logits, 1, E, k, args, &zero_bias);
  ASSERT_TRUE(biased.status.is_ok()) << biased.status.to_string();
  EXPECT_EQ(biased.ids, (std::vector<std::int32_t>{4, 5}));  // group 1 kept: s(1)+s(.9) > s(3)+s(-4)
  for (const Routed* r : {&plain, &biased}) {
    for (int j = 0; j < k; ++j) {
      EXPECT_FLOAT_EQ(r->weights[j], static_cast<float>(naive::sigmoid(logits[r->ids[j]])));
    }
  }
}

// The correction bias changes the selection only: weights are the unbiased scores.
TEST(RoutingReference, CorrectionBiasSelectsButDoesNotWeigh) {
  const int E = 4, k = 2;
  const std::vector<float> logits = {2.0f, 1.0f, 0.0f, -1.0f};
  const std::vector<float> bias = {0.0f, -10.0f, 10.0f, 0.0f};
  for (bool renorm : {false, true}) {
    routing::SoftmaxTopK::Arguments sargs{renorm, 1.0f};
    const Routed s = select<routing::SoftmaxTopK>(logits, 1, E, k, sargs, &bias);
    ASSERT_TRUE(s.status.is_ok());
    EXPECT_EQ(s.ids, (std::vector<std::int32_t>{2, 0}));
    const std::vector<double> p = naive::softmax(logits);
    const double denom = renorm ? p[2] + p[0] : 1.0;
    EXPECT_NEAR(s.weights[0], p[2] / denom, 1e-6);
    EXPECT_NEAR(s.weights[1], p[0] / denom, 1e-6);

    routing::SigmoidTopK::Arguments gargs{renorm, 1.0f};
    const Routed g = select<routing::SigmoidTopK>(logits, 1, E, k, gargs, &bias);
    ASSERT_TRUE(g.status.is_ok());
    EXPECT_EQ(g.ids, (std::vector<std::int32_t>{2, 0}));
    const double d2 = renorm ? naive::sigmoid(0.0) + naive::sigmoid(2.0) : 1.0;
    EXPECT_NEAR(g.weights[0], naive::sigmoid(0.0) / d2, 1e-6);
    EXPECT_NEAR(g.weights[1], naive::sigmoid(2.0) / d2, 1e-6);
  }
}

// routed_scaling_factor multiplies the (renormalized) weights exactly once.
TEST(RoutingReference, RoutedScalingFactorAppliedOnceAfterRenormalize) {
  Random rng(301);
  const Index M = 32;
  const int E = 64, k = 8;
  const std::vector<float> logits = rng.gapped_logits(M, E);
  for (bool renorm : {false, true}) {
    const Routed one = select<routing::SoftmaxTopK>(logits, M, E, k, {renorm, 1.0f});
    const Routed scaled = select<routing::SoftmaxTopK>(logits, M, E, k, {renorm, 2.5f});
    ASSERT_TRUE(one.status.is_ok() && scaled.status.is_ok());
    EXPECT_EQ(one.ids, scaled.ids);
    for (Index m = 0; m < M; ++m) {
      double s1 = 0, s2 = 0;
      for (int j = 0; j < k; ++j) {
        EXPECT_NEAR(scaled.weights[m * k + j], 2.5 * one.weights[m * k + j], 1e-6 * scaled.weights[m * k + j]);
        s1 += one.weights[m * k + j];
        s2 += scaled.weights[m * k + j];
      }
      if (renorm) {
        EXPECT_NEAR(s1, 1.0, 1e-6);
        EXPECT_NEAR(s2, 2.5, 1e-5);  // not 1 (rsf before renorm) and not 6.25 (applied twice)
      }
    }
  }
}

TEST(RoutingReference, Llama4TopKGrid) {
  Random rng(401);
  int cases = 0;
  for (int E : {1, 8, 16, 64, 128, 256, 512}) {
    for (int k : sizes_top_k(E)) {
      for (Index M : {Index{0}, Index{1}, Index{64}}) {
        const std::vector<float> logits = rng.gapped_logits(M, E);
        const Routed got = select<routing::Llama4TopK>(logits, M, E, k, {});
        EXPECT_TRUE(matches_reference(got, M, k, [&](Index m) { return naive::route_llama4(row_of(logits, E, m), k); }))
            << "E=" << E << " k=" << k << " M=" << M;
        ++cases;
      }
    }
  }
  EXPECT_GT(cases, 50);
}

// reliability.md 3.1 #7: top_k == E selects every expert; renormalized softmax weights are the
// full softmax and sum to one.
TEST(RoutingReference, TopKEqualsNumExperts) {
  Random rng(402);
  const Index M = 16;
  const int E = 8;
  const std::vector<float> logits = rng.gapped_logits(M, E);
  const Routed got = select<routing::SoftmaxTopK>(logits, M, E, E, {true, 1.0f});
  ASSERT_TRUE(well_formed(got, M, E, E));
  for (Index m = 0; m < M; ++m) {
    const std::vector<double> p = naive::softmax(row_of(logits, E, m));
    double sum = 0;
    for (int j = 0; j < E; ++j) {
      EXPECT_NEAR(got.weights[m * E + j], p[got.ids[m * E + j]], 1e-6);
      sum += got.weights[m * E + j];
    }
    EXPECT_NEAR(sum, 1.0, 1e-6);
  }
}

// reliability.md 3.1 #8: top_k = 1 with renormalize gives weight exactly 1.0 (w / w). The header
// documents renormalize as "divides the selected weights by their sum".
TEST(RoutingReference, TopOneRenormalizedWeightIsExactlyOne) {
  Random rng(403);
  const Index M = 512;
  const int E = 64;
  const std::vector<float> logits = rng.gapped_logits(M, E);
  const Routed soft = select<routing::SoftmaxTopK>(logits, M, E, 1, {true, 1.0f});
  const Routed sig = select<routing::SigmoidTopK>(logits, M, E, 1, {true, 1.0f});
  ASSERT_TRUE(soft.status.is_ok() && sig.status.is_ok());
  int soft_bad = 0, sig_bad = 0;
  Index first_bad = -1;
  for (Index m = 0; m < M; ++m) {
    if (soft.weights[m] != 1.0f) {
      ++soft_bad;
      if (first_bad < 0) first_bad = m;
    }
    sig_bad += sig.weights[m] != 1.0f;
  }
  EXPECT_EQ(soft_bad, 0) << "softmax top-1 renormalized weights != 1.0f in " << soft_bad << " of " << M
                         << " tokens; e.g. token " << first_bad << ": "
                         << (first_bad >= 0 ? soft.weights[first_bad] : 0.0f);
  Index sig_first = -1;
  for (Index m = 0; m < M && sig_first < 0; ++m) {
    if (sig.weights[m] != 1.0f) sig_first = m;
  }
  EXPECT_EQ(sig_bad, 0) << "sigmoid top-1 renormalized weights != 1.0f in " << sig_bad << " of " << M << " tokens; e.g. "
                        << "token " << sig_first << ": logit "
                        << (sig_first >= 0 ? logits[sig_first * E + sig.ids[sig_first]] : 0.0f) << " -> weight "
                        << std::hexfloat << (sig_first >= 0 ? sig.weights[sig_first] : 0.0f) << std::defaultfloat;
}

// ---------------------------------------------------------------------------------------------
// A user routing policy, written through the public headers only: the k experts with the
// smallest logits, each weighted `scale / k`.

struct BottomKUniform : moe::routing::TopKBase {
  static constexpr std::string_view kName = "bottom_k_uniform";
  struct Arguments {
    float scale = 1.0f;
  };
  static void route_token(const moe::routing::TokenContext& t, const Arguments& a) {
    float* keys = t.scratch;
    for (int i = 0; i < t.num_experts; ++i) keys[i] = -t.logits[i];
    moe::routing::select_topk(keys, t.num_experts, t.top_k, t.ids, t.weights);
    for (int j = 0; j < t.top_k; ++j) t.weights[j] = a.scale / static_cast<float>(t.top_k);
  }
};
static_assert(moe::routing::RoutingPolicy<BottomKUniform>);

// Its naive definition: ascending logits, ties to the lower id.
naive::Routed bottom_k_reference(const std::vector<float>& logits, int k, double scale) {
  std::vector<int> idx(logits.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return logits[a] < logits[b]; });
  naive::Routed r;
  r.ids.assign(idx.begin(), idx.begin() + k);
  r.weights.assign(static_cast<std::size_t>(k), scale / k);
  return r;
}

TEST(RoutingCustomPolicy, UserPolicyIsUsedBySelectExperts) {
  Random rng(501);
  for (int E : {1, 8, 64, 256}) {
    for (int k : sizes_top_k(E)) {
      const Index M = 33;
      const std::vector<float> logits = rng.gapped_logits(M, E);
      const Routed got = select<BottomKUniform>(logits, M, E, k, {3.0f});
      EXPECT_TRUE(matches_reference(got, M, k, [&](Index m) { return bottom_k_reference(row_of(logits, E, m), k, 3.0); }))
          << "E=" << E << " k=" << k;
      EXPECT_TRUE(well_formed(got, M, E, k));
      if (k < E) {
        // Not what softmax top-k would have chosen: the user policy really ran.
        const Routed soft = select<routing::SoftmaxTopK>(logits, M, E, k, {});
        for (Index m = 0; m < M; ++m) EXPECT_NE(got.ids[m * k], soft.ids[m * k]);
      }
    }
  }
  // Ties keep the lower id.
  const std::vector<float> tied = {1.0f, 0.0f, 2.0f, 0.0f, 0.0f};
  const Routed t = select<BottomKUniform>(tied, 1, 5, 2, {});
  ASSERT_TRUE(t.status.is_ok());
  EXPECT_EQ(t.ids, (std::vector<std::int32_t>{1, 3}));
  EXPECT_EQ(t.weights, (std::vector<float>{0.5f, 0.5f}));
}

TEST(RoutingCustomPolicy, UserPolicyRejectsCorrectionBias) {
  const std::vector<float> logits(8, 0.0f), bias(8, 0.0f);
  const Routed r = select<BottomKUniform>(logits, 1, 8, 2, {}, &bias);
  EXPECT_EQ(r.status.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status.message().find("correction_bias"), std::string::npos) << r.status.message();
}

}  // namespace
}  // namespace moe::testing::routing_tests
