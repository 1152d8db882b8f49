// One test per validation rule of moe::Kernel<Spec, moe::cpu::Eigen>. Each poisons the output
// before the call and checks: the status code, that the message names the argument, and that
// the output is bitwise untouched.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "moe/any_tensor.h"
#include "testing/lib/harness.h"

namespace {

using moe::Index;
using moe::testing::Case;
using moe::testing::Harness;

template <class A, class R = moe::routing::Precomputed, class PF = moe::StandardPrepareFinalize<>>
using SpecOf = moe::Spec<R, PF, moe::Experts<A, moe::quant::F32>>;
using Silu = SpecOf<moe::SiluAndMul>;
using SiluLogits = SpecOf<moe::SiluAndMul, moe::routing::SoftmaxTopK>;

// Runs `args` (built from `h` and then modified) and checks the failure contract.
template <class Spec>
void expect_rejected(Harness<Spec>& h, const typename Harness<Spec>::Kernel::Arguments& args, const std::string& names,
                     moe::StatusCode code = moe::StatusCode::kInvalidArgument, moe::cpu::Options options = {}) {
  std::fill(h.output.begin(), h.output.end(), std::bit_cast<float>(0x7fc0dead));
  const std::vector<float> before = h.output;
  typename Harness<Spec>::Kernel kernel(options);
  const moe::Status can = kernel.can_implement(args);
  const moe::Status s = kernel.run(args);
  EXPECT_EQ(s.code(), code) << s.to_string();
  EXPECT_NE(s.message().find(names), std::string::npos) << "message does not name '" << names << "': " << s.message();
  if (code != moe::StatusCode::kWorkspaceTooSmall) {
    EXPECT_EQ(can.code(), code) << "can_implement disagrees with run";
  }
  EXPECT_EQ(0, std::memcmp(before.data(), h.output.data(), before.size() * sizeof(float))) << "output was written";
}

TEST(BadInput, ValidArgumentsPass) {  // the baseline every other test perturbs
  Harness<Silu> h(Case{});
  EXPECT_TRUE(h.run().is_ok());
}

TEST(BadInput, HiddenStatesWidthDiffersFromWeights) {
  Harness<Silu> h(Case{});
  auto a = h.arguments();
  a.hidden_states = moe::HostView<const float, 2>(h.hidden.data(), {h.c.M, h.c.H - 1});
  expect_rejected(h, a, "w2");
}

TEST(BadInput, HiddenStatesLastDimensionNotContiguous) {
  Harness<Silu> h(Case{});
  auto a = h.arguments();
  a.hidden_states = moe::HostView<const float, 2>(h.hidden.data(), {h.c.M / 2, h.c.H}, {2 * h.c.H, 2});
  a.output = moe::HostView<float, 2>(h.output.data(), {h.c.M / 2, h.c.H});
  a.topk_ids = moe::HostView<const std::int32_t, 2>(h.ids.data(), {h.c.M / 2, h.c.top_k});
  a.topk_weights = moe::HostView<const float, 2>(h.weights.data(), {h.c.M / 2, h.c.top_k});
  expect_rejected(h, a, "hidden_states");
}

TEST(BadInput, NullDataForNonEmptyTensor) {
  Harness<Silu> h(Case{});
  auto a = h.arguments();
  a.hidden_states = moe::HostView<const float, 2>(nullptr, {h.c.M, h.c.H});
  expect_rejected(h, a, "hidden_states");
}

TEST(BadInput, W13HasUngatedWidthForGatedActivation) {
  Harness<Silu> h(Case{});
  auto a = h.arguments();
  a.w13 = moe::HostView<const float, 3>(h.w13.data(), {h.E_local, h.c.I, h.c.H});
  expect_rejected(h, a, "w13");
}

TEST(BadInput, W2ExpertCountDiffersFromW13) {
  Harness<Silu> h(Case{});
  auto a = h.arguments();
  a.w2 = moe::HostView<const float, 3>(h.w2.data(), {h.E_local - 1, h.c.H, h.c.I});
  expect_rejected(h, a, "w2");
}

TEST(BadInput, W2HiddenSizeMismatch) {
  Harness<Silu> h(Case{});
  auto a = h.arguments();
  a.w2 = moe::HostView<const float, 3>(h.w2.data(), {h.E_local, h.c.H / 2, h.c.I});
  expect_rejected(h, a, "w2");
}

TEST(BadInput, OutputShape) {
  Harness<Silu> h(Case{});
  auto a = h.arguments();
  a.output = moe::HostView<float, 2>(h.output.data(), {h.c.M - 1, h.c.H});
  expect_rejected(h, a, "output");
}

TEST(BadInput, BiasShapes) {
  Case c;
  c.bias = true;
  Harness<Silu> h(c);
  auto a = h.arguments();
  a.w13_bias = moe::HostView<const float, 2>(h.b13.data(), {h.E_local, h.c.I});
  expect_rejected(h, a, "w13_bias");
  a = h.arguments();
  a.w2_bias = moe::HostView<const float, 2>(h.b2.data(), {h.E_local, h.c.H - 1});
  expect_rejected(h, a, "w2_bias");
}

TEST(BadInput, TopKLargerThanNumExperts) {
  Case c;
  c.E = 4;
  c.top_k = 4;
  Harness<SiluLogits> h(c);
  auto a = h.arguments();
  a.top_k = 6;
  expect_rejected(h, a, "top_k");
}

TEST(BadInput, TopKZero) {
  Harness<SiluLogits> h(Case{});
  auto a = h.arguments();
  a.top_k = 0;
  expect_rejected(h, a, "top_k");
}

TEST(BadInput, RouterLogitsWidthIsNotNumExperts) {
  Harness<SiluLogits> h(Case{});
  auto a = h.arguments();
  a.router_logits = moe::HostView<const float, 2>(h.logits.data(), {h.c.M, h.c.E - 1});
  expect_rejected(h, a, "router_logits");
}

TEST(BadInput, PrecomputedIdsMissing) {
  Harness<Silu> h(Case{});
  auto a = h.arguments();
  a.topk_ids.reset();
  expect_rejected(h, a, "topk_ids");
}

TEST(BadInput, PrecomputedIdsShape) {
  Harness<Silu> h(Case{});
  auto a = h.arguments();
  a.topk_ids = moe::HostView<const std::int32_t, 2>(h.ids.data(), {h.c.M, 1});
  expect_rejected(h, a, "topk_ids");
}

TEST(BadInput, PrecomputedIdOutOfRange) {
  Harness<Silu> h(Case{});
  h.ids[5] = static_cast<std::int32_t>(h.c.E);
  expect_rejected(h, h.arguments(), "topk_ids");
}

TEST(BadInput, PrecomputedIdNegative) {
  Harness<Silu> h(Case{});
  h.ids[3] = -1;
  expect_rejected(h, h.arguments(), "topk_ids");
}

TEST(BadInput, IdsGivenToALogitsPolicy) {
  Harness<SiluLogits> h(Case{});
  auto a = h.arguments();
  a.topk_ids = moe::HostView<const std::int32_t, 2>(h.ids.data(), {h.c.M, h.c.top_k});
  expect_rejected(h, a, "topk_ids");
}

TEST(BadInput, ExpertMapShorterThanLocalExperts) {
  Harness<Silu> h(Case{});
  std::vector<std::int32_t> map = {0, 1, 2};
  auto a = h.arguments();
  a.expert_map = moe::HostView<const std::int32_t, 1>(map.data(), {3});
  expect_rejected(h, a, "expert_map");
}

TEST(BadInput, ExpertMapEntryOutOfRange) {
  Case c;
  c.ep_size = 2;
  Harness<Silu> h(c);
  h.map[0] = static_cast<std::int32_t>(h.E_local);
  expect_rejected(h, h.arguments(), "expert_map");
}

TEST(BadInput, ExpertMapDuplicateLocalId) {
  Case c;
  c.ep_size = 2;
  Harness<Silu> h(c);
  h.map[h.c.E - 1] = 0;  // rank 0 of 2 owns 0..3; global 7 now also claims local 0
  expect_rejected(h, h.arguments(), "expert_map");
}

TEST(BadInput, ApplyRouterWeightOnInputNeedsTopKOne) {
  using S = SpecOf<moe::SiluAndMul, moe::routing::Precomputed, moe::StandardPrepareFinalize<true>>;
  Case c;
  c.top_k = 2;
  Harness<S> h(c);
  expect_rejected(h, h.arguments(), "apply_router_weight_on_input");
}

TEST(BadInput, CorrectionBiasLength) {
  Case c;
  c.with_correction_bias = true;
  Harness<SiluLogits> h(c);
  auto a = h.arguments();
  a.correction_bias = moe::HostView<const float, 1>(h.correction_bias.data(), {h.c.E - 1});
  expect_rejected(h, a, "correction_bias");
}

TEST(BadInput, CorrectionBiasGivenToLlama4Routing) {
  using S = SpecOf<moe::SiluAndMul, moe::routing::Llama4TopK>;
  Case c;
  c.top_k = 1;
  Harness<S> h(c);
  std::vector<float> bias(c.E, 0.0f);
  auto a = h.arguments();
  a.correction_bias = moe::HostView<const float, 1>(bias.data(), {c.E});
  expect_rejected(h, a, "correction_bias");
}

TEST(BadInput, GroupedTopKGroupsDoNotDivideExperts) {
  using S = SpecOf<moe::SiluAndMul, moe::routing::GroupedTopK<moe::routing::Softmax>>;
  Case c;
  c.E = 10;
  Harness<S> h(c);
  h.routing_args.num_expert_group = 4;
  h.routing_args.topk_group = 2;
  expect_rejected(h, h.arguments(), "num_expert_group");
}

TEST(BadInput, GroupedTopKTooFewReachableExperts) {
  using S = SpecOf<moe::SiluAndMul, moe::routing::GroupedTopK<moe::routing::Softmax>>;
  Case c;
  c.E = 8;
  c.top_k = 3;
  Harness<S> h(c);
  h.routing_args.num_expert_group = 4;  // 2 experts per group
  h.routing_args.topk_group = 1;        // only 2 reachable < top_k
  expect_rejected(h, h.arguments(), "top_k");
}

TEST(BadInput, BatchedCapacityMustBePositive) {
  using S = SpecOf<moe::SiluAndMul, moe::routing::Precomputed, moe::BatchedPrepareFinalize<>>;
  Harness<S> h(Case{});
  h.pf_args.max_tokens_per_expert = 0;
  expect_rejected(h, h.arguments(), "max_tokens_per_expert");
}

TEST(BadInput, WorkspaceTooSmall) {
  Harness<Silu> h(Case{});
  const auto a = h.arguments();
  typename Harness<Silu>::Kernel kernel;
  std::vector<std::byte> ws(kernel.workspace_bytes(a) - 1);
  std::fill(h.output.begin(), h.output.end(), -3.0f);
  const moe::Status s = kernel.run(a, ws);
  EXPECT_EQ(s.code(), moe::StatusCode::kWorkspaceTooSmall);
  EXPECT_NE(s.message().find("workspace"), std::string::npos) << s.message();
  for (float v : h.output) ASSERT_EQ(v, -3.0f);
}

TEST(BadInput, ChunkTokensMustBePositive) {
  Harness<Silu> h(Case{});
  moe::cpu::Options o;
  o.chunk_tokens = 0;
  expect_rejected(h, h.arguments(), "chunk_tokens", moe::StatusCode::kInvalidArgument, o);
}

// Run-time dtypes and ranks (tensors described by files or configs) are checked by moe::bind.
TEST(BadInput, BindRejectsWrongDtype) {
  std::vector<float> data(12);
  moe::AnyTensor t{data.data(), moe::DType::kF32, {3, 4}, {}};
  moe::HostView<const moe::bfloat16, 2> v;
  const moe::Status s = moe::bind(t, "hidden_states", &v);
  EXPECT_EQ(s.code(), moe::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("hidden_states"), std::string::npos);
  EXPECT_NE(s.message().find("bf16"), std::string::npos) << s.message();
  EXPECT_EQ(v.data(), nullptr) << "view written on failure";
}

TEST(BadInput, BindRejectsWrongRank) {
  std::vector<std::int32_t> data(12);
  moe::AnyTensor t{data.data(), moe::DType::kI32, {12}, {}};
  moe::HostView<const std::int32_t, 2> v;
  const moe::Status s = moe::bind(t, "topk_ids", &v);
  EXPECT_EQ(s.code(), moe::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("topk_ids"), std::string::npos);
  EXPECT_NE(s.message().find("rank 2"), std::string::npos) << s.message();
}

TEST(BadInput, BindAcceptsMatchingTensor) {
  std::vector<std::int32_t> data(12);
  moe::AnyTensor t{data.data(), moe::DType::kI32, {3, 4}, {}};
  moe::HostView<const std::int32_t, 2> v;
  ASSERT_TRUE(moe::bind(t, "topk_ids", &v).is_ok());
  EXPECT_EQ(v.extent(0), 3);
  EXPECT_EQ(v.stride(0), 4);
  EXPECT_EQ(&v(2, 1), data.data() + 9);
}

}  // namespace

namespace {

// A typed view over misaligned bytes (a tensor at an odd offset of a legal safetensors file) would
// be undefined behaviour to read: bind refuses it, naming the tensor and the alignment.
TEST(BadInput, BindRefusesMisalignedData) {
  alignas(8) unsigned char bytes[64] = {};
  moe::AnyTensor t;
  t.dtype = moe::DType::kF32;
  t.extents = {2, 3};
  t.data = bytes + 2;
  moe::HostView<const float, 2> v;
  EXPECT_EQ(moe::bind(t, "router_logits", &v).message(), "router_logits: data is not aligned to 4 bytes");
  t.data = bytes + 4;
  EXPECT_TRUE(moe::bind(t, "router_logits", &v).is_ok());
}

}  // namespace
