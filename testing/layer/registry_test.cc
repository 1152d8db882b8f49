// The run-time registry is built from the policy lists of moe/layer/built_policies.h: every listed
// combination is found under its policies' names and runs exactly the typed kernel of those
// policies; names not built are errors that list what is.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "moe/cpu/kernel.h"
#include "moe/layer/built_policies.h"
#include "moe/layer/registry.h"
#include "moe/quant/none.h"

namespace moe::layer {
namespace {

constexpr Index kTokens = 5, kHidden = 16, kInter = 8, kExperts = 4;
constexpr int kTopK = 2;

template <class T>
std::vector<T> random_values(std::size_t n, unsigned seed, float scale) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<T> v(n);
  for (T& x : v) x = T(nd(gen));
  return v;
}

// The registry's entry for (E, T) against moe::Kernel<Spec of E, cpu::Eigen> called directly on
// the same inputs: the outputs must be the same bits (the table maps the key to that kernel).
template <class E, class T>
void expect_entry_runs_its_policies() {
  using Activation = typename E::Activation;
  SCOPED_TRACE(::testing::Message() << Activation::kName << " " << to_string(dtype_of<T>)
                                    << (E::kWeightOnInput ? " weight on input" : ""));
  const int top_k = E::kWeightOnInput ? 1 : kTopK;  // the router weight on the input needs top-1
  auto x = random_values<T>(kTokens * kHidden, 1, 1.0f);
  auto w13 = random_values<T>(kExperts * 2 * kInter * kHidden, 2, 0.3f);
  auto w2 = random_values<T>(kExperts * kHidden * kInter, 3, 0.3f);
  std::vector<std::int32_t> ids(kTokens * top_k);
  std::vector<float> weights(kTokens * top_k);
  for (Index m = 0; m < kTokens; ++m) {
    for (int j = 0; j < top_k; ++j) {
      ids[m * top_k + j] = static_cast<std::int32_t>((m + 3 * j) % kExperts);
      weights[m * top_k + j] = 0.25f + 0.5f * static_cast<float>(j);
    }
  }
  ActivationParams params;
  params.swiglu_alpha = 1.5f;  // not the defaults: the entry must pass them through
  params.swiglu_limit = 3.0f;

  std::vector<T> via_registry(kTokens * kHidden, T(0.0f)), direct(kTokens * kHidden, T(0.0f));
  ForwardRequest r;
  r.hidden_states = AnyTensor{x.data(), dtype_of<T>, {kTokens, kHidden}, {}};
  r.topk_ids = AnyTensor{ids.data(), DType::kI32, {kTokens, top_k}, {}};
  r.topk_weights = AnyTensor{weights.data(), DType::kF32, {kTokens, top_k}, {}};
  r.top_k = top_k;
  r.w13 = AnyTensor{w13.data(), dtype_of<T>, {kExperts, 2 * kInter, kHidden}, {}};
  r.w2 = AnyTensor{w2.data(), dtype_of<T>, {kExperts, kHidden, kInter}, {}};
  r.activation = params;
  r.output = AnyTensor{via_registry.data(), dtype_of<T>, {kTokens, kHidden}, {}};
  ForwardFn fn = nullptr;
  ASSERT_TRUE(find_kernel({std::string(Activation::kName), dtype_of<T>, E::kWeightOnInput}, &fn).is_ok());
  const Status s = fn(r);
  ASSERT_TRUE(s.is_ok()) << s.message();

  using Spec = moe::Spec<routing::Precomputed, StandardPrepareFinalize<E::kWeightOnInput>,
                         Experts<Activation, quant::None<T>>>;
  typename Kernel<Spec, cpu::Eigen>::Arguments a;
  a.hidden_states = HostView<const T, 2>(x.data(), {kTokens, kHidden});
  a.topk_ids = HostView<const std::int32_t, 2>(ids.data(), {kTokens, top_k});
  a.topk_weights = HostView<const float, 2>(weights.data(), {kTokens, top_k});
  a.top_k = top_k;
  a.w13 = HostView<const T, 3>(w13.data(), {kExperts, 2 * kInter, kHidden});
  a.w2 = HostView<const T, 3>(w2.data(), {kExperts, kHidden, kInter});
  a.output = HostView<T, 2>(direct.data(), {kTokens, kHidden});
  a.activation = activation_arguments<Activation>(params);
  const Status d = Kernel<Spec, cpu::Eigen>().run(a);
  ASSERT_TRUE(d.is_ok()) << d.message();
  EXPECT_EQ(std::memcmp(via_registry.data(), direct.data(), direct.size() * sizeof(T)), 0);
}

template <class... E>
void expect_every_entry(PolicyList<E...>) {
  (expect_entry_runs_its_policies<E, float>(), ...);
  (expect_entry_runs_its_policies<E, bfloat16>(), ...);
  (expect_entry_runs_its_policies<E, half>(), ...);
}

TEST(Registry, EveryBuiltExpertsEntryRunsItsOwnPolicies) { expect_every_entry(BuiltExperts{}); }

TEST(Registry, TheActivationsDiffer) {
  // Guards the test above: if two entries computed the same function, a table that mapped every
  // key to one kernel would still pass it. silu_and_mul and swigluoai must give different outputs.
  std::vector<float> x = random_values<float>(kTokens * kHidden, 1, 1.0f);
  std::vector<float> w13 = random_values<float>(kExperts * 2 * kInter * kHidden, 2, 0.3f);
  std::vector<float> w2 = random_values<float>(kExperts * kHidden * kInter, 3, 0.3f);
  std::vector<std::int32_t> ids(kTokens, 1);
  std::vector<float> weights(kTokens, 1.0f);
  std::vector<float> out[2];
  int i = 0;
  for (std::string_view name : {SiluAndMul::kName, SwigluOai::kName}) {
    out[i].assign(kTokens * kHidden, 0.0f);
    ForwardRequest r;
    r.hidden_states = AnyTensor{x.data(), DType::kF32, {kTokens, kHidden}, {}};
    r.topk_ids = AnyTensor{ids.data(), DType::kI32, {kTokens, 1}, {}};
    r.topk_weights = AnyTensor{weights.data(), DType::kF32, {kTokens, 1}, {}};
    r.w13 = AnyTensor{w13.data(), DType::kF32, {kExperts, 2 * kInter, kHidden}, {}};
    r.w2 = AnyTensor{w2.data(), DType::kF32, {kExperts, kHidden, kInter}, {}};
    r.output = AnyTensor{out[i].data(), DType::kF32, {kTokens, kHidden}, {}};
    ForwardFn fn = nullptr;
    ASSERT_TRUE(find_kernel({std::string(name), DType::kF32, false}, &fn).is_ok());
    ASSERT_TRUE(fn(r).is_ok());
    ++i;
  }
  EXPECT_NE(out[0], out[1]);
}

TEST(Registry, AKeyNotBuiltIsAnErrorListingTheBuiltOnes) {
  ForwardFn fn = nullptr;
  const Status s = find_kernel({"gelu_and_mul", DType::kBF16, false}, &fn);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("gelu_and_mul @ bf16"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("swigluoai @ bf16"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("silu_and_mul @ f16 (router weight on input)"), std::string::npos) << s.message();
  EXPECT_EQ(fn, nullptr);
  // weight on input is part of the key: swigluoai is built without it only
  EXPECT_FALSE(find_kernel({std::string(SwigluOai::kName), DType::kF32, true}, &fn).is_ok());
}

template <class... R>
void expect_names_reach_their_types(PolicyList<R...> list) {
  auto check = [&]<class Want>() {
    bool reached = false;
    const Status s = visit_policy(list, "routing", Want::kName, [&]<class Got>() {
      reached = std::is_same_v<Got, Want>;
      return Status::ok();
    });
    EXPECT_TRUE(s.is_ok() && reached) << Want::kName;
  };
  (check.template operator()<R>(), ...);
}

TEST(Registry, RoutingNamesReachTheirPolicies) {
  expect_names_reach_their_types(BuiltRoutings{});
  const Status s = visit_policy(BuiltRoutings{}, "config.routing", "softmax", []<class R>() { return Status::ok(); });
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("config.routing: \"softmax\""), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("grouped_sigmoid_topk"), std::string::npos) << s.message();
  // The visitor's own error is passed through.
  const Status inner = visit_policy(BuiltRoutings{}, "routing", routing::Llama4TopK::kName,
                                    []<class R>() { return invalid_argument("from the visitor"); });
  EXPECT_EQ(inner.message(), "from the visitor");
}

TEST(Registry, PolicyTraitsComeFromThePolicies) {
  EXPECT_TRUE(routes_by_group(routing::GroupedTopK<routing::Sigmoid>::kName));
  EXPECT_TRUE(routes_by_group(routing::GroupedTopK<routing::Softmax>::kName));
  EXPECT_FALSE(routes_by_group(routing::SoftmaxTopK::kName));
  EXPECT_FALSE(routes_by_group("not_a_policy"));
  EXPECT_EQ(gate_up_layout(SwigluOai::kName), GateUpLayout::kInterleaved);
  EXPECT_EQ(gate_up_layout(SiluAndMul::kName), GateUpLayout::kSplit);

  RoutingParams p;
  p.renormalize = true;
  p.routed_scaling_factor = 2.5f;
  p.num_expert_group = 8;
  p.topk_group = 4;
  const auto g = routing_arguments<routing::GroupedTopK<routing::Sigmoid>>(p);
  EXPECT_TRUE(g.renormalize);
  EXPECT_EQ(g.routed_scaling_factor, 2.5f);
  EXPECT_EQ(g.num_expert_group, 8);
  EXPECT_EQ(g.topk_group, 4);
  const auto s = routing_arguments<routing::SoftmaxTopK>(p);
  EXPECT_TRUE(s.renormalize);
  EXPECT_EQ(s.routed_scaling_factor, 2.5f);
  ActivationParams ap;
  ap.swiglu_alpha = 1.25f;
  ap.swiglu_limit = 9.0f;
  const auto a = activation_arguments<SwigluOai>(ap);
  EXPECT_EQ(a.alpha, 1.25f);
  EXPECT_EQ(a.limit, 9.0f);
}

}  // namespace
}  // namespace moe::layer
