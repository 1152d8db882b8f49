// The all-to-all expert-parallel forward on in-process ranks, each holding its own tokens and its
// physical experts, against the single-rank kernel: the same bits for any number of ranks, both
// dispatch modes, and EPLB replicas (logical ids mapped to physical ones by the routing's
// eplb_logical_to_physical op). Bad arguments are errors that write nothing.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "moe/cpu/experts_stage.h"
#include "moe/cpu/kernel.h"
#include "moe/cpu/ops.h"
#include "moe/parallel/ep_all_to_all.h"
#include "moe/parallel/eplb.h"
#include "moe/parallel/in_process_group.h"
#include "testing/lib/harness.h"

namespace {

using moe::Index;
using moe::Status;
using moe::parallel::DispatchMode;

template <class A, class IO = moe::bfloat16>
using PrecomputedSpec = moe::Spec<moe::routing::Precomputed, moe::StandardPrepareFinalize<>,
                                  moe::Experts<A, moe::quant::None<IO>>>;

struct Layout {
  int ranks = 2;
  Index redundant = 0;  // EPLB replicas beyond the logical experts
  DispatchMode mode = DispatchMode::kNormal;
};

// Token range of rank r when M tokens are dealt unevenly (rank r gets about (r + 1) parts).
std::pair<Index, Index> token_range(Index M, int ranks, int r) {
  const Index parts = ranks * (ranks + 1) / 2;
  Index begin = 0;
  for (int q = 0; q < r; ++q) begin += M * (q + 1) / parts;
  const Index end = r == ranks - 1 ? M : begin + M * (r + 1) / parts;
  return {begin, end};
}

template <class Spec>
void expect_ep_matches_single_rank(moe::testing::Case c, Layout layout) {
  using IO = typename Spec::ElementIO;
  using Stage = moe::cpu::ExpertsStage<typename Spec::Experts, IO>;
  moe::testing::Harness<Spec> h(c);
  ASSERT_TRUE(h.run().is_ok());
  const Index N1 = h.N1, num_physical = c.E + layout.redundant;
  ASSERT_EQ(num_physical % layout.ranks, 0);
  const Index n = num_physical / layout.ranks;

  // A placement from a skewed load (replicas for the busiest experts), spread over the ranks.
  std::vector<double> load(static_cast<std::size_t>(c.E));
  for (Index e = 0; e < c.E; ++e) load[e] = static_cast<double>((e * 7919) % 13 + (e == 2 ? 40 : 0));
  moe::parallel::EplbPlacement placement;
  ASSERT_TRUE(moe::parallel::rebalance_experts(load, num_physical, 1, 1, layout.ranks, &placement).is_ok());

  std::vector<IO> out(h.output.size(), moe::from_float<IO>(-3.0f));
  std::unique_ptr<moe::parallel::InProcessGroup> group;
  ASSERT_TRUE(moe::parallel::InProcessGroup::create(layout.ranks, &group).is_ok());
  const Status s = group->run([&](moe::parallel::Communicator& comm) -> Status {
    const int r = comm.rank();
    const auto [m0, m1] = token_range(c.M, layout.ranks, r);
    const Index M = m1 - m0;
    // This rank's physical experts: copies of their logical experts' weights.
    std::vector<IO> w13(static_cast<std::size_t>(n * N1 * c.H)), w2(static_cast<std::size_t>(n * c.H * c.I));
    std::vector<IO> b13, b2;
    for (Index q = 0; q < n; ++q) {
      const Index e = placement.physical_to_logical[static_cast<std::size_t>(r * n + q)];
      std::copy_n(h.w13.begin() + e * N1 * c.H, N1 * c.H, w13.begin() + q * N1 * c.H);
      std::copy_n(h.w2.begin() + e * c.H * c.I, c.H * c.I, w2.begin() + q * c.H * c.I);
      if (c.bias) {
        b13.insert(b13.end(), h.b13.begin() + e * N1, h.b13.begin() + (e + 1) * N1);
        b2.insert(b2.end(), h.b2.begin() + e * c.H, h.b2.begin() + (e + 1) * c.H);
      }
    }
    // Routing: logical ids -> physical ids (token-hash replica choice), as the routing stage does.
    std::vector<std::int32_t> physical(static_cast<std::size_t>(M * c.top_k));
    MOE_RETURN_IF_ERROR(moe::cpu::eplb_logical_to_physical(
        moe::HostView<const std::int32_t, 2>(h.ids.data() + m0 * c.top_k, {M, c.top_k}),
        moe::HostView<const std::int32_t, 2>(placement.logical_to_physical.data(), {c.E, placement.max_replicas}),
        moe::HostView<const std::int32_t, 1>(placement.replica_count.data(), {c.E}), num_physical,
        moe::ReplicaChoice::kTokenHash, moe::HostView<std::int32_t, 2>(physical.data(), {M, c.top_k}), std::nullopt));
    moe::parallel::EpTokens<IO> tokens;
    tokens.hidden = moe::HostView<const IO, 2>(h.hidden.data() + m0 * c.H, {M, c.H});
    tokens.topk_ids = moe::HostView<const std::int32_t, 2>(physical.data(), {M, c.top_k});
    tokens.topk_weights = moe::HostView<const float, 2>(h.weights.data() + m0 * c.top_k, {M, c.top_k});
    moe::parallel::EpConfig config;
    config.experts_per_rank = n;
    config.mode = layout.mode;
    config.max_tokens_per_rank = c.M;  // every rank's share fits
    moe::parallel::LocalExperts<IO> experts = [&](const moe::ExpertRows<IO, moe::HostSpace>& rows) {
      typename Stage::Weights w;
      w.w13 = moe::HostView<const IO, 3>(w13.data(), {n, N1, c.H});
      w.w2 = moe::HostView<const IO, 3>(w2.data(), {n, c.H, c.I});
      if (c.bias) {
        w.w13_bias = moe::HostView<const IO, 2>(b13.data(), {n, N1});
        w.w2_bias = moe::HostView<const IO, 2>(b2.data(), {n, c.H});
      }
      std::vector<std::byte> ws(Stage::workspace_bytes(w, rows));
      return Stage::run(w, rows, ws);
    };
    return moe::parallel::ep_forward<IO>(comm, config, tokens, experts, moe::HostView<IO, 2>(out.data() + m0 * c.H, {M, c.H}));
  });
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(0, std::memcmp(out.data(), h.output.data(), out.size() * sizeof(IO)))
      << Spec::Activation::kName << " ranks=" << layout.ranks << " redundant=" << layout.redundant
      << (layout.mode == DispatchMode::kLowLatency ? " low-latency" : " normal") << " M=" << c.M
      << ": the all-to-all forward differs from the single-rank one";
}

moe::testing::Case ep_case(Index M, bool bias = false) {
  moe::testing::Case c;
  c.M = M;
  c.E = 8;
  c.top_k = 3;
  c.H = 40;
  c.I = 24;
  c.bias = bias;
  c.seed = static_cast<std::uint64_t>(M + 11);
  return c;
}

TEST(EpAllToAll, MatchesTheSingleRankForwardBitForBit) {
  for (DispatchMode mode : {DispatchMode::kNormal, DispatchMode::kLowLatency}) {
    for (int ranks : {1, 2, 4, 8}) {
      for (Index M : {1, 7, 200}) {
        expect_ep_matches_single_rank<PrecomputedSpec<moe::SiluAndMul>>(ep_case(M), {ranks, 0, mode});
      }
    }
  }
}

TEST(EpAllToAll, EplbReplicasGiveTheSameBits) {
  for (DispatchMode mode : {DispatchMode::kNormal, DispatchMode::kLowLatency}) {
    expect_ep_matches_single_rank<PrecomputedSpec<moe::SiluAndMul>>(ep_case(90), {2, 4, mode});
    expect_ep_matches_single_rank<PrecomputedSpec<moe::SiluAndMul>>(ep_case(90), {4, 8, mode});
    expect_ep_matches_single_rank<PrecomputedSpec<moe::SiluAndMul>>(ep_case(33), {3, 1, mode});
  }
}

TEST(EpAllToAll, BiasesUngatedActivationsAndOtherTypes) {
  expect_ep_matches_single_rank<PrecomputedSpec<moe::SwigluOai>>(ep_case(33, true), {4, 0, DispatchMode::kNormal});
  expect_ep_matches_single_rank<PrecomputedSpec<moe::Gelu, moe::half>>(ep_case(33, true), {2, 2, DispatchMode::kLowLatency});
  expect_ep_matches_single_rank<PrecomputedSpec<moe::SiluAndMul, float>>(ep_case(33), {2, 0, DispatchMode::kNormal});
}

// Bad arguments: an error naming the argument on the rank that has it, the other ranks released
// (not hung), and no output written anywhere.
// Four tokens of two slots over four experts, for the error tests.
struct SmallTokens {
  using IO = moe::bfloat16;
  static constexpr Index M = 4, H = 8, k = 2;
  std::vector<IO> hidden = std::vector<IO>(M * H, moe::from_float<IO>(1.0f));
  std::vector<float> weights = std::vector<float>(M * k, 0.5f);
  std::vector<std::int32_t> ids = {0, 1, 2, 3, 1, 2, 0, 3};
};

TEST(EpAllToAll, BadArgumentsAreErrorsThatWriteNothing) {
  using IO = SmallTokens::IO;
  constexpr Index M = SmallTokens::M, H = SmallTokens::H, k = SmallTokens::k;
  SmallTokens small;
  std::vector<IO>& hidden = small.hidden;
  std::vector<float>& weights = small.weights;
  std::vector<std::int32_t>& ids = small.ids;
  std::vector<std::int32_t> repeated = {0, 0, 2, 3, 1, 2, 0, 3};
  struct Bad {
    const char* name;
    Index experts_per_rank;
    DispatchMode mode;
    Index max_tokens;
    const std::vector<std::int32_t>* ids;
    const char* message;
  };
  const Bad cases[] = {
      {"no experts", 0, DispatchMode::kNormal, 0, &ids, "experts_per_rank"},
      {"no capacity", 2, DispatchMode::kLowLatency, 0, &ids, "max_tokens_per_rank"},
      {"over capacity", 2, DispatchMode::kLowLatency, M - 1, &ids, "max_tokens_per_rank"},
      {"repeated id", 2, DispatchMode::kLowLatency, M, &repeated, "slots 0 and 1"},
      {"overflowing capacity", 2, DispatchMode::kLowLatency, Index{1} << 60, &ids, "overflows"},
  };
  std::unique_ptr<moe::parallel::InProcessGroup> group;
  ASSERT_TRUE(moe::parallel::InProcessGroup::create(2, &group).is_ok());
  for (const Bad& b : cases) {
    std::vector<IO> out(2 * M * H, moe::from_float<IO>(7.0f));
    bool experts_ran = false;
    const Status s = group->run([&](moe::parallel::Communicator& comm) {
      moe::parallel::EpTokens<IO> t;
      t.hidden = moe::HostView<const IO, 2>(hidden.data(), {M, H});
      // Only rank 1 has the bad ids; both have the bad config.
      t.topk_ids = moe::HostView<const std::int32_t, 2>((comm.rank() == 1 ? *b.ids : ids).data(), {M, k});
      t.topk_weights = moe::HostView<const float, 2>(weights.data(), {M, k});
      moe::parallel::EpConfig config{b.experts_per_rank, b.mode, b.max_tokens};
      moe::parallel::LocalExperts<IO> experts = [&](const moe::ExpertRows<IO, moe::HostSpace>&) {
        experts_ran = true;
        return Status::ok();
      };
      return moe::parallel::ep_forward<IO>(comm, config, t, experts, moe::HostView<IO, 2>(out.data() + comm.rank() * M * H, {M, H}));
    });
    EXPECT_NE(s.to_string().find(b.message), std::string::npos) << b.name << ": " << s.to_string();
    EXPECT_FALSE(experts_ran) << b.name;
    for (const IO& x : out) ASSERT_EQ(moe::to_float(x), 7.0f) << b.name << ": output written";
  }
}

// One rank's experts stage fails: that rank still joins the combine (with zeros), so the others
// finish the forward instead of being released with kAborted; the failing rank returns its own
// error and writes nothing.
TEST(EpAllToAll, AFailingExpertsStageStillJoinsTheCombine) {
  using IO = SmallTokens::IO;
  constexpr Index M = SmallTokens::M, H = SmallTokens::H, k = SmallTokens::k;
  const SmallTokens small;
  std::unique_ptr<moe::parallel::InProcessGroup> group;
  ASSERT_TRUE(moe::parallel::InProcessGroup::create(2, &group).is_ok());
  for (DispatchMode mode : {DispatchMode::kNormal, DispatchMode::kLowLatency}) {
    std::vector<IO> out(2 * M * H, moe::from_float<IO>(7.0f));
    std::vector<Status> per_rank(2);
    const Status s = group->run([&](moe::parallel::Communicator& comm) {
      moe::parallel::EpTokens<IO> t;
      t.hidden = moe::HostView<const IO, 2>(small.hidden.data(), {M, H});
      t.topk_ids = moe::HostView<const std::int32_t, 2>(small.ids.data(), {M, k});
      t.topk_weights = moe::HostView<const float, 2>(small.weights.data(), {M, k});
      const moe::parallel::LocalExperts<IO> experts = [&](const moe::ExpertRows<IO, moe::HostSpace>&) {
        return comm.rank() == 1 ? moe::invalid_argument("rank 1's experts failed") : Status::ok();
      };
      per_rank[comm.rank()] = moe::parallel::ep_forward<IO>(comm, {2, mode, M}, t, experts,
                                                             moe::HostView<IO, 2>(out.data() + comm.rank() * M * H, {M, H}));
      return per_rank[comm.rank()];
    });
    EXPECT_NE(s.to_string().find("rank 1's experts failed"), std::string::npos) << s.to_string();
    EXPECT_TRUE(per_rank[0].is_ok()) << "rank 0 was not left waiting: " << per_rank[0].to_string();
    for (Index i = M * H; i < 2 * M * H; ++i) ASSERT_EQ(moe::to_float(out[i]), 7.0f) << "the failing rank wrote its output";
  }
}

}  // namespace
