// Routing at the edges: the non-finite policy documented at the top of moe/routing.h
// (reliability.md 3.1) for every built-in policy, and argument validation (kInvalidArgument
// naming the argument, outputs untouched).
#include "testing/cpu/routing_test_support.h"

namespace moe::testing::routing_tests {
namespace {

// ---------------------------------------------------------------------------------------------
// Non-finite logits (moe/routing.h header; reliability.md 3.1 #9-#13).

// One policy configuration, type-erased: routes [M, E] logits.
struct Config {
  std::string name;
  std::function<Routed(const std::vector<float>&, Index, Index, int)> run;
};

template <class Policy>
Config config(std::string name, typename Policy::Arguments args, std::optional<std::vector<float>> bias = std::nullopt) {
  return {std::move(name), [args, bias](const std::vector<float>& logits, Index M, Index E, int k) {
            return select<Policy>(logits, M, E, k, args, bias ? &*bias : nullptr);
          }};
}

std::vector<Config> all_configs(int E) {
  std::vector<float> bias(static_cast<std::size_t>(E));
  for (int i = 0; i < E; ++i) bias[i] = 0.01f * static_cast<float>((i * 7) % E);
  using GS = routing::GroupedTopK<routing::Softmax>;
  using GG = routing::GroupedTopK<routing::Sigmoid>;
  std::vector<Config> c;
  for (bool renorm : {false, true}) {
    const std::string r = renorm ? " renorm" : "";
    c.push_back(config<routing::SoftmaxTopK>("softmax" + r, {renorm, 1.0f}));
    c.push_back(config<routing::SoftmaxTopK>("softmax+bias" + r, {renorm, 2.0f}, bias));
    c.push_back(config<routing::SigmoidTopK>("sigmoid" + r, {renorm, 1.0f}));
    c.push_back(config<routing::SigmoidTopK>("sigmoid+bias" + r, {renorm, 2.0f}, bias));
    c.push_back(config<GS>("grouped_softmax" + r, {4, 2, renorm, 1.0f}));
    c.push_back(config<GG>("grouped_sigmoid+bias" + r, {4, 2, renorm, 2.5f}, bias));
  }
  c.push_back(config<routing::Llama4TopK>("llama4", {}));
  return c;
}

// Routes a batch of good rows with `bad` inserted at row `at`, checks that every row is well
// formed, and that the good rows are bit-identical to a run without the bad row. Returns the
// bad row's result.
Routed route_with_bad_row(const Config& c, const std::vector<float>& bad, int k, std::uint64_t seed) {
  const Index E = static_cast<Index>(bad.size());
  const Index good_rows = 6, at = 3;
  Random rng(seed);
  const std::vector<float> good = rng.gapped_logits(good_rows, E);
  std::vector<float> with = good;
  with.insert(with.begin() + at * E, bad.begin(), bad.end());
  const Routed a = c.run(with, good_rows + 1, E, k);
  const Routed b = c.run(good, good_rows, E, k);
  EXPECT_TRUE(well_formed(a, good_rows + 1, E, k)) << c.name;
  EXPECT_TRUE(well_formed(b, good_rows, E, k)) << c.name;
  Routed row;
  row.status = a.status;
  if (!a.status.is_ok() || !b.status.is_ok()) return row;
  for (Index m = 0, g = 0; m < good_rows + 1; ++m) {
    if (m == at) continue;
    for (int j = 0; j < k; ++j) {
      EXPECT_EQ(a.ids[m * k + j], b.ids[g * k + j]) << c.name << " token " << m;
      EXPECT_EQ(std::bit_cast<std::uint32_t>(a.weights[m * k + j]), std::bit_cast<std::uint32_t>(b.weights[g * k + j]))
          << c.name << " token " << m;
    }
    ++g;
  }
  row.ids.assign(a.ids.begin() + at * k, a.ids.begin() + (at + 1) * k);
  row.weights.assign(a.weights.begin() + at * k, a.weights.begin() + (at + 1) * k);
  return row;
}

std::vector<std::int32_t> iota_ids(int k) {
  std::vector<std::int32_t> v(static_cast<std::size_t>(k));
  std::iota(v.begin(), v.end(), 0);
  return v;
}

TEST(RoutingNonFinite, BadRowsAreContainedForEveryPolicy) {
  const int E = 16;
  std::vector<std::vector<float>> bad_rows;
  bad_rows.push_back(std::vector<float>(E, kNaN));
  bad_rows.push_back(std::vector<float>(E, -kInf));
  bad_rows.push_back(std::vector<float>(E, kInf));
  bad_rows.push_back(std::vector<float>(E, 0.25f));
  bad_rows.push_back(std::vector<float>(E, -100.0f));
  bad_rows.push_back(std::vector<float>(E, 100.0f));
  {
    std::vector<float> mixed(E, 0.5f);
    mixed[1] = kNaN, mixed[4] = kInf, mixed[6] = -kInf, mixed[9] = kInf, mixed[11] = kNaN, mixed[15] = -kInf;
    bad_rows.push_back(mixed);
  }
  {
    std::vector<float> mixed(E, kNaN);
    mixed[7] = -kInf, mixed[8] = 1.0f, mixed[12] = std::numeric_limits<float>::max();
    mixed[0] = -std::numeric_limits<float>::max();
    bad_rows.push_back(mixed);
  }
  {
    std::vector<float> big(E);
    for (int i = 0; i < E; ++i) big[i] = (i % 2 ? 1.0f : -1.0f) * std::numeric_limits<float>::max();
    bad_rows.push_back(big);
  }
  std::uint64_t seed = 600;
  for (const Config& c : all_configs(E)) {
    for (int k : {1, 3, 8, 16}) {
      if (c.name.rfind("grouped", 0) == 0 && k > 8) continue;  // topk_group * E / groups = 8
      for (const auto& bad : bad_rows) {
        const Routed r = route_with_bad_row(c, bad, k, ++seed);
        EXPECT_TRUE(r.status.is_ok()) << c.name << ": " << r.status.to_string();
      }
    }
  }
}

TEST(RoutingNonFinite, AllNaNRow) {
  const int E = 8, k = 3;
  const std::vector<float> bad(E, kNaN);
  for (bool renorm : {false, true}) {
    // Softmax: uniform 1/E (NaN counts as -inf; no finite entry) -> ids 0..k-1.
    Routed s = route_with_bad_row(config<routing::SoftmaxTopK>("softmax", {renorm, 1.0f}), bad, k, 1);
    EXPECT_EQ(s.ids, iota_ids(k));
    for (float w : s.weights) EXPECT_NEAR(w, renorm ? 1.0 / k : 1.0 / E, 1e-7);
    // Sigmoid: NaN -> 0; renormalize leaves an all-zero selection at zero.
    Routed g = route_with_bad_row(config<routing::SigmoidTopK>("sigmoid", {renorm, 1.0f}), bad, k, 2);
    EXPECT_EQ(g.ids, iota_ids(k));
    for (float w : g.weights) EXPECT_EQ(w, 0.0f);
    // Grouped softmax: uniform scores, groups tie -> lowest groups and ids.
    Routed gs = route_with_bad_row(config<routing::GroupedTopK<routing::Softmax>>("grouped", {4, 2, renorm, 1.0f}), bad, k, 3);
    EXPECT_EQ(gs.ids, iota_ids(k));
    for (float w : gs.weights) EXPECT_NEAR(w, renorm ? 1.0 / k : 1.0 / E, 1e-7);
  }
  // With a bias the uniform scores are ordered by the bias; weights stay 1/E.
  const std::vector<float> bias = {0.0f, 0.3f, -0.1f, 0.5f, 0.2f, 0.0f, 0.1f, 0.4f};
  Routed b = route_with_bad_row(config<routing::SoftmaxTopK>("softmax+bias", {false, 1.0f}, bias), bad, k, 4);
  EXPECT_EQ(b.ids, (std::vector<std::int32_t>{3, 7, 1}));
  for (float w : b.weights) EXPECT_NEAR(w, 1.0 / E, 1e-7);
  // Llama4: NaN ranks last, all tie -> 0..k-1, weight sigmoid(NaN) = 0.
  Routed l = route_with_bad_row(config<routing::Llama4TopK>("llama4", {}), bad, k, 5);
  EXPECT_EQ(l.ids, iota_ids(k));
  for (float w : l.weights) EXPECT_EQ(w, 0.0f);
}

TEST(RoutingNonFinite, PositiveInfinityEntries) {
  const int k = 3;
  std::vector<float> bad = {0.5f, 1.0f, kInf, -2.0f, 3.0f, kInf, 0.0f, 2.0f};
  for (bool renorm : {false, true}) {
    // Softmax: the two +inf entries share the mass; the rest are 0 and tie -> lowest id (0).
    Routed s = route_with_bad_row(config<routing::SoftmaxTopK>("softmax", {renorm, 1.0f}), bad, k, 11);
    EXPECT_EQ(s.ids, (std::vector<std::int32_t>{2, 5, 0}));
    EXPECT_EQ(s.weights, (std::vector<float>{0.5f, 0.5f, 0.0f}));
    // Sigmoid: +inf -> 1; the third is the best finite logit (3.0 at id 4).
    Routed g = route_with_bad_row(config<routing::SigmoidTopK>("sigmoid", {renorm, 1.0f}), bad, k, 12);
    EXPECT_EQ(g.ids, (std::vector<std::int32_t>{2, 5, 4}));
    const double s3 = naive::sigmoid(3.0), d = renorm ? 2.0 + s3 : 1.0;
    EXPECT_NEAR(g.weights[0], 1.0 / d, 1e-6);
    EXPECT_NEAR(g.weights[1], 1.0 / d, 1e-6);
    EXPECT_NEAR(g.weights[2], s3 / d, 1e-6);
  }
  // Single +inf: all the softmax mass.
  std::vector<float> one = {0.5f, 1.0f, -2.0f, kInf, 3.0f, 1.0f, 0.0f, 2.0f};
  Routed s1 = route_with_bad_row(config<routing::SoftmaxTopK>("softmax", {false, 1.0f}), one, 2, 13);
  EXPECT_EQ(s1.ids, (std::vector<std::int32_t>{3, 0}));
  EXPECT_EQ(s1.weights, (std::vector<float>{1.0f, 0.0f}));
  Routed l = route_with_bad_row(config<routing::Llama4TopK>("llama4", {}), bad, k, 14);
  EXPECT_EQ(l.ids, (std::vector<std::int32_t>{2, 5, 4}));
  EXPECT_EQ(l.weights[0], 1.0f);
  EXPECT_EQ(l.weights[1], 1.0f);
  EXPECT_NEAR(l.weights[2], naive::sigmoid(3.0), 1e-6);
}

TEST(RoutingNonFinite, NegativeInfinityEntries) {
  const int E = 8, k = 3;
  // Only two finite entries; -inf entries have probability 0 and tie among themselves.
  std::vector<float> bad = {-kInf, 1.0f, -kInf, -kInf, 0.0f, -kInf, -kInf, -kInf};
  const std::vector<double> p = naive::softmax(bad);
  EXPECT_DOUBLE_EQ(p[0], 0.0);
  for (bool renorm : {false, true}) {
    Routed s = route_with_bad_row(config<routing::SoftmaxTopK>("softmax", {renorm, 1.0f}), bad, k, 21);
    EXPECT_EQ(s.ids, (std::vector<std::int32_t>{1, 4, 0}));
    EXPECT_NEAR(s.weights[0], p[1], 1e-6);
    EXPECT_NEAR(s.weights[1], p[4], 1e-6);
    EXPECT_EQ(s.weights[2], 0.0f);
    Routed g = route_with_bad_row(config<routing::SigmoidTopK>("sigmoid", {renorm, 1.0f}), bad, k, 22);
    EXPECT_EQ(g.ids, (std::vector<std::int32_t>{1, 4, 0}));
    EXPECT_EQ(g.weights[2], 0.0f);
    const double d = renorm ? naive::sigmoid(1.0) + 0.5 : 1.0;
    EXPECT_NEAR(g.weights[0], naive::sigmoid(1.0) / d, 1e-6);
    EXPECT_NEAR(g.weights[1], 0.5 / d, 1e-6);
  }
  // All -inf: softmax uniform, sigmoid zero.
  const std::vector<float> all(E, -kInf);
  Routed s = route_with_bad_row(config<routing::SoftmaxTopK>("softmax", {false, 1.0f}), all, k, 23);
  EXPECT_EQ(s.ids, iota_ids(k));
  for (float w : s.weights) EXPECT_EQ(w, 1.0f / E);
  Routed g = route_with_bad_row(config<routing::SigmoidTopK>("sigmoid", {true, 1.0f}), all, k, 24);
  EXPECT_EQ(g.ids, iota_ids(k));
  for (float w : g.weights) EXPECT_EQ(w, 0.0f);
}

TEST(RoutingNonFinite, AllEqualRowTiesGoToLowestIds) {
  const int E = 16;
  const std::vector<float> bad(E, 0.75f);
  for (int k : {1, 3, 16}) {
    for (bool renorm : {false, true}) {
      Routed s = route_with_bad_row(config<routing::SoftmaxTopK>("softmax", {renorm, 1.0f}), bad, k, 31);
      EXPECT_EQ(s.ids, iota_ids(k));
      for (float w : s.weights) EXPECT_NEAR(w, renorm ? 1.0 / k : 1.0 / E, 1e-7);
      Routed g = route_with_bad_row(config<routing::SigmoidTopK>("sigmoid", {renorm, 1.0f}), bad, k, 32);
      EXPECT_EQ(g.ids, iota_ids(k));
      for (float w : g.weights) EXPECT_NEAR(w, renorm ? 1.0 / k : naive::sigmoid(0.75), 1e-7);
      Routed gg = route_with_bad_row(config<routing::GroupedTopK<routing::Sigmoid>>("grouped", {4, 2, renorm, 1.0f}), bad,
                                     std::min(k, 8), 33);
      EXPECT_EQ(gg.ids, iota_ids(std::min(k, 8)));
    }
    Routed l = route_with_bad_row(config<routing::Llama4TopK>("llama4", {}), bad, k, 34);
    EXPECT_EQ(l.ids, iota_ids(k));
  }
}

TEST(RoutingNonFinite, TieAtTheKthPlaceGoesToTheLowerId) {
  const int E = 16, k = 4;
  std::vector<float> bad(E, -1.0f);
  bad[12] = 3.0f, bad[1] = 2.5f, bad[3] = 2.0f;  // clear winners
  bad[9] = 1.0f, bad[5] = 1.0f;                   // tie for the 4th place: 5 wins
  for (const Config& c : {config<routing::SoftmaxTopK>("softmax", {true, 1.0f}),
                          config<routing::SigmoidTopK>("sigmoid", {false, 1.0f}), config<routing::Llama4TopK>("llama4", {}),
                          config<routing::GroupedTopK<routing::Softmax>>("grouped", {2, 2, false, 1.0f})}) {
    Routed r = route_with_bad_row(c, bad, k, 41);
    EXPECT_EQ(r.ids, (std::vector<std::int32_t>{12, 1, 3, 5})) << c.name;
  }
  // With k = 5 both tied experts are selected, the lower id first.
  Routed r = route_with_bad_row(config<routing::SoftmaxTopK>("softmax", {false, 1.0f}), bad, 5, 42);
  EXPECT_EQ(r.ids, (std::vector<std::int32_t>{12, 1, 3, 5, 9}));
  EXPECT_EQ(r.weights[3], r.weights[4]);
}

TEST(RoutingNonFinite, SigmoidUnderflowWithRenormalizeStaysFinite) {
  const int E = 16;
  for (float v : {-100.0f, -88.5f, -87.0f, -80.0f}) {
    const std::vector<float> bad(E, v);
    for (int k : {1, 4, 16}) {
      Routed g = route_with_bad_row(config<routing::SigmoidTopK>("sigmoid", {true, 1.0f}), bad, k, 51);
      EXPECT_EQ(g.ids, iota_ids(k)) << v;
      double sum = 0;
      for (float w : g.weights) {
        EXPECT_TRUE(std::isfinite(w)) << v;
        EXPECT_GE(w, 0.0f) << v;
        sum += w;
      }
      // Either the scores underflowed to zero (sum stays 0) or they renormalize to 1.
      EXPECT_TRUE(sum == 0.0 || std::abs(sum - 1.0) < 1e-6) << "logit " << v << " k " << k << " sum " << sum;
      if (v >= -87.0f) {
        EXPECT_NEAR(sum, 1.0, 1e-6) << v;  // sigmoid(-87) is a normal float
      }
      Routed gg = route_with_bad_row(config<routing::GroupedTopK<routing::Sigmoid>>("grouped", {4, 4, true, 1.0f}), bad,
                                     k, 52);
      for (float w : gg.weights) EXPECT_TRUE(std::isfinite(w)) << v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Validation: kInvalidArgument naming the argument; outputs untouched.

template <class Policy>
void expect_rejected(const std::string& what, const std::vector<float>& logits, Index M, Index E, int k,
                     const typename Policy::Arguments& args, const std::vector<float>* bias, const std::string& names,
                     Index ids_rows = -1, Index ids_cols = -1, Index w_rows = -1, Index w_cols = -1) {
  const Routed r = select<Policy>(logits, M, E, k, args, bias, ids_rows, ids_cols, w_rows, w_cols);
  EXPECT_EQ(r.status.code(), StatusCode::kInvalidArgument) << what << ": " << r.status.to_string();
  EXPECT_NE(r.status.message().find(names), std::string::npos) << what << ": message \"" << r.status.message()
                                                               << "\" does not name " << names;
  for (std::int32_t id : r.ids) ASSERT_EQ(id, -12345) << what << ": topk_ids written";
  for (float w : r.weights) ASSERT_EQ(std::bit_cast<std::uint32_t>(w), 0x7fa5a5a5u) << what << ": topk_weights written";
}

TEST(RoutingValidation, RejectsBadArgumentsWithoutWriting) {
  const Index M = 4, E = 8;
  const std::vector<float> logits(M * E, 0.5f);
  const std::vector<float> bias(E, 0.0f), short_bias(E - 1, 0.0f), long_bias(E + 1, 0.0f);
  using S = routing::SoftmaxTopK;
  using G = routing::GroupedTopK<routing::Sigmoid>;
  using L = routing::Llama4TopK;
  const S::Arguments sa{};
  expect_rejected<S>("top_k > E", logits, M, E, 9, sa, nullptr, "top_k");
  expect_rejected<S>("top_k = 0", logits, M, E, 0, sa, nullptr, "top_k", M, 1, M, 1);
  expect_rejected<S>("top_k < 0", logits, M, E, -1, sa, nullptr, "top_k", M, 1, M, 1);
  expect_rejected<L>("llama4 top_k > E", logits, M, E, 9, {}, nullptr, "top_k");
  expect_rejected<S>("E = 0", {}, M, 0, 1, sa, nullptr, "router_logits");
  // Output shapes.
  expect_rejected<S>("topk_ids rows", logits, M, E, 2, sa, nullptr, "topk_ids", M + 1, 2, M, 2);
  expect_rejected<S>("topk_ids cols", logits, M, E, 2, sa, nullptr, "topk_ids", M, 3, M, 2);
  expect_rejected<S>("topk_weights rows", logits, M, E, 2, sa, nullptr, "topk_weights", M, 2, M - 1, 2);
  expect_rejected<S>("topk_weights cols", logits, M, E, 2, sa, nullptr, "topk_weights", M, 2, M, 1);
  // Bias.
  expect_rejected<S>("bias too short", logits, M, E, 2, sa, &short_bias, "correction_bias");
  expect_rejected<S>("bias too long", logits, M, E, 2, sa, &long_bias, "correction_bias");
  expect_rejected<G>("grouped bias too short", logits, M, E, 2, {2, 1}, &short_bias, "correction_bias");
  expect_rejected<L>("bias given to Llama4TopK", logits, M, E, 1, {}, &bias, "correction_bias");
  // Grouping.
  expect_rejected<G>("E % groups != 0", logits, M, E, 2, {3, 1}, nullptr, "num_expert_group");
  expect_rejected<G>("groups > E", logits, M, E, 2, {16, 1}, nullptr, "num_expert_group");
  expect_rejected<G>("groups = 0", logits, M, E, 2, {0, 1}, nullptr, "num_expert_group");
  expect_rejected<G>("topk_group > groups", logits, M, E, 2, {4, 5}, nullptr, "topk_group");
  expect_rejected<G>("topk_group = 0", logits, M, E, 2, {4, 0}, nullptr, "topk_group");
  expect_rejected<G>("top_k > topk_group * E / groups", logits, M, E, 5, {4, 2}, nullptr, "top_k");
  expect_rejected<routing::GroupedTopK<routing::Softmax>>("top_k unreachable (softmax)", logits, M, E, 3, {8, 2}, &bias,
                                                          "top_k");
  // routed_scaling_factor NaN.
  expect_rejected<S>("rsf NaN", logits, M, E, 2, {true, kNaN}, nullptr, "routed_scaling_factor");
  expect_rejected<G>("grouped rsf NaN", logits, M, E, 2, {2, 1, true, kNaN}, nullptr, "routed_scaling_factor");
  // The same calls with valid arguments succeed (the rejections above are not spurious).
  EXPECT_TRUE(select<G>(logits, M, E, 4, {4, 2}, &bias).status.is_ok());
  EXPECT_TRUE(select<S>(logits, M, E, 8, sa, &bias).status.is_ok());
  EXPECT_TRUE(select<L>(logits, M, E, 1, {}).status.is_ok());
}

// A grouped row with E = 10, groups = 4 (reliability.md 3.1 #14a) is an error, not vLLM's
// silent fallback to plain top-k.
TEST(RoutingValidation, GroupedNonDivisibleIsAnError) {
  const std::vector<float> logits(10, 0.0f);
  expect_rejected<routing::GroupedTopK<routing::Softmax>>("E=10 groups=4", logits, 1, 10, 2, {4, 2}, nullptr,
                                                          "num_expert_group");
}

}  // namespace
}  // namespace moe::testing::routing_tests
