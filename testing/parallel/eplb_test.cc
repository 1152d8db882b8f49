// EPLB's rebalancing (vLLM's default policy) and the weight moves to a new placement.
#include "moe/parallel/eplb.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <numeric>
#include <set>

#include "moe/parallel/in_process_group.h"
#include "testing/lib/random.h"

namespace {

using moe::Index;
using moe::Status;
using moe::parallel::EplbPlacement;

// The maps agree with each other and every rank holds the same number of physical experts.
void expect_consistent(const EplbPlacement& p) {
  ASSERT_EQ(static_cast<Index>(p.physical_to_logical.size()), p.num_physical);
  Index total = 0;
  for (Index e = 0; e < p.num_logical; ++e) {
    const std::int32_t c = p.replica_count[e];
    ASSERT_GE(c, 1) << "logical expert " << e << " has no replica";
    total += c;
    for (Index r = 0; r < p.max_replicas; ++r) {
      const std::int32_t phys = p.logical_to_physical[e * p.max_replicas + r];
      if (r < c) {
        ASSERT_GE(phys, 0);
        EXPECT_EQ(p.physical_to_logical[phys], e) << "replica " << r << " of expert " << e;
      } else {
        EXPECT_EQ(phys, -1);
      }
    }
  }
  EXPECT_EQ(total, p.num_physical);
}

std::vector<double> rank_loads(const EplbPlacement& p, const std::vector<double>& load, Index ranks) {
  std::vector<double> per_rank(static_cast<std::size_t>(ranks), 0.0);
  const Index n = p.num_physical / ranks;
  for (Index q = 0; q < p.num_physical; ++q) {
    const std::int32_t e = p.physical_to_logical[q];
    per_rank[q / n] += load[e] / p.replica_count[e];
  }
  return per_rank;
}

TEST(Eplb, InitialPlacementIsVllms) {
  EplbPlacement p;
  ASSERT_TRUE(EplbPlacement::initial(6, 10, &p).is_ok());
  expect_consistent(p);
  for (Index q = 0; q < 10; ++q) EXPECT_EQ(p.physical_to_logical[q], q % 6);
  EXPECT_EQ(p.replica_count[3], 2);
  EXPECT_EQ(p.replica_count[5], 1);
}

// Replicas minimise the largest load per replica: brute force over every split of the physical
// experts into per-expert counts.
TEST(Eplb, ReplicaCountsMinimiseTheLargestLoadPerReplica) {
  moe::testing::Random rng(5);
  for (int trial = 0; trial < 20; ++trial) {
    const Index L = 4, P = 8;
    const std::vector<float> f = rng.uniform_vector<float>(L, 0.0f, 100.0f);
    const std::vector<double> load(f.begin(), f.end());
    EplbPlacement p;
    ASSERT_TRUE(moe::parallel::rebalance_experts(load, P, 1, 1, 2, &p).is_ok());
    expect_consistent(p);
    double got = 0.0;
    for (Index e = 0; e < L; ++e) got = std::max(got, load[e] / p.replica_count[e]);
    double best = 1e30;
    std::function<void(Index, Index, double)> search = [&](Index e, Index left, double worst) {
      if (e == L - 1) {
        if (left >= 1) best = std::min(best, std::max(worst, load[e] / static_cast<double>(left)));
        return;
      }
      for (Index c = 1; c <= left - (L - 1 - e); ++c) search(e + 1, left - c, std::max(worst, load[e] / static_cast<double>(c)));
    };
    search(0, P, 0.0);
    EXPECT_DOUBLE_EQ(got, best) << "trial " << trial;
  }
}

TEST(Eplb, BalancesRanksBetterThanTheInitialPlacement) {
  moe::testing::Random rng(9);
  const Index L = 32, P = 40, ranks = 8;
  std::vector<double> load(static_cast<std::size_t>(L));
  const std::vector<float> f = rng.uniform_vector<float>(L, 0.0f, 1.0f);
  for (Index e = 0; e < L; ++e) load[e] = std::pow(f[e], 4.0) * 1000.0;  // a few hot experts
  EplbPlacement initial, balanced;
  ASSERT_TRUE(EplbPlacement::initial(L, P, &initial).is_ok());
  ASSERT_TRUE(moe::parallel::rebalance_experts(load, P, 1, 1, ranks, &balanced).is_ok());
  expect_consistent(balanced);
  const auto before = rank_loads(initial, load, ranks), after = rank_loads(balanced, load, ranks);
  const double total = std::accumulate(load.begin(), load.end(), 0.0);
  const double worst_after = *std::max_element(after.begin(), after.end());
  EXPECT_LT(worst_after, *std::max_element(before.begin(), before.end()));
  // Greedy packing with equal item counts stays within the largest replica load of the mean.
  double largest_replica = 0.0;
  for (Index e = 0; e < L; ++e) largest_replica = std::max(largest_replica, load[e] / balanced.replica_count[e]);
  EXPECT_LE(worst_after, total / ranks + largest_replica + 1e-9);
}

// Hierarchical: with groups dividing evenly over nodes, every expert of a group, and all its
// replicas, stay on the ranks of one node.
TEST(Eplb, HierarchicalKeepsEachGroupOnOneNode) {
  moe::testing::Random rng(13);
  const Index L = 16, groups = 4, nodes = 2, ranks = 4, P = 24;
  const std::vector<float> f = rng.uniform_vector<float>(L, 1.0f, 50.0f);
  const std::vector<double> load(f.begin(), f.end());
  EplbPlacement p;
  ASSERT_TRUE(moe::parallel::rebalance_experts(load, P, groups, nodes, ranks, &p).is_ok());
  expect_consistent(p);
  const Index per_node = P / nodes;
  std::vector<std::set<Index>> nodes_of_group(static_cast<std::size_t>(groups));
  for (Index q = 0; q < P; ++q) nodes_of_group[p.physical_to_logical[q] / (L / groups)].insert(q / per_node);
  for (Index g = 0; g < groups; ++g) EXPECT_EQ(nodes_of_group[g].size(), 1u) << "group " << g;
  // And each node holds half the groups.
  std::vector<int> groups_on(2, 0);
  for (Index g = 0; g < groups; ++g) ++groups_on[*nodes_of_group[g].begin()];
  EXPECT_EQ(groups_on[0], 2);
}

TEST(Eplb, EqualLoadsGoToTheLowerIds) {
  EplbPlacement p;
  ASSERT_TRUE(moe::parallel::rebalance_experts(std::vector<double>(4, 1.0), 6, 1, 1, 1, &p).is_ok());
  EXPECT_EQ(p.replica_count, (std::vector<std::int32_t>{2, 2, 1, 1}));
}

TEST(Eplb, BadArgumentsNameTheArgument) {
  EplbPlacement p;
  const std::vector<double> load(8, 1.0);
  EXPECT_NE(moe::parallel::rebalance_experts(load, 10, 1, 1, 4, &p).to_string().find("num_physical"), std::string::npos);
  EXPECT_NE(moe::parallel::rebalance_experts(load, 6, 1, 1, 2, &p).to_string().find("num_physical"), std::string::npos);
  EXPECT_NE(moe::parallel::rebalance_experts(load, 8, 3, 1, 2, &p).to_string().find("num_groups"), std::string::npos);
  EXPECT_NE(moe::parallel::rebalance_experts(load, 8, 1, 3, 2, &p).to_string().find("num_nodes"), std::string::npos);
  std::vector<double> bad = load;
  bad[3] = -1.0;
  EXPECT_NE(moe::parallel::rebalance_experts(bad, 8, 1, 1, 2, &p).to_string().find("load: entry 3"), std::string::npos);
  bad[3] = std::nan("");
  EXPECT_NE(moe::parallel::rebalance_experts(bad, 8, 1, 1, 2, &p).to_string().find("load: entry 3"), std::string::npos);
  moe::parallel::ExpertMoves m;
  const std::vector<std::int32_t> old_p2l = {0, 1, 2, 3}, orphan = {0, 1, 2, 4};
  EXPECT_NE(moe::parallel::plan_expert_moves(old_p2l, orphan, 2, &m).to_string().find("no rank holds"), std::string::npos);
  EXPECT_NE(moe::parallel::plan_expert_moves(old_p2l, old_p2l, 3, &m).to_string().find("ranks"), std::string::npos);
  // A logical id past the physical count is refused before anything is sized by it.
  const std::vector<std::int32_t> huge = {(1 << 30) - 1};
  EXPECT_NE(moe::parallel::plan_expert_moves(huge, huge, 1, &m).to_string().find("out of range for 1 physical"), std::string::npos);
}

// Each rank's weights after the move are the new placement's experts, and only slots whose expert
// was not already on the rank cross between ranks.
TEST(Eplb, MovingWeightsFillsTheNewPlacement) {
  moe::testing::Random rng(21);
  const Index L = 12, P = 16, ranks = 4, n = P / ranks;
  constexpr std::size_t kBytes = 24;
  const std::vector<float> f = rng.uniform_vector<float>(L, 0.0f, 1.0f);
  std::vector<double> load(f.begin(), f.end());
  load[5] = 30.0;
  EplbPlacement before, after;
  ASSERT_TRUE(EplbPlacement::initial(L, P, &before).is_ok());
  ASSERT_TRUE(moe::parallel::rebalance_experts(load, P, 1, 1, ranks, &after).is_ok());
  moe::parallel::ExpertMoves moves;
  ASSERT_TRUE(moe::parallel::plan_expert_moves(before.physical_to_logical, after.physical_to_logical, ranks, &moves).is_ok());
  Index expected_transfers = 0;
  for (Index q = 0; q < P; ++q) {
    bool on_rank = false;
    for (Index s = (q / n) * n; s < (q / n + 1) * n; ++s) on_rank = on_rank || before.physical_to_logical[s] == after.physical_to_logical[q];
    expected_transfers += on_rank ? 0 : 1;
  }
  EXPECT_EQ(moves.transfers(), expected_transfers);
  EXPECT_GT(moves.transfers(), 0);
  auto tag = [](std::int32_t logical, std::size_t i) { return static_cast<std::byte>(logical * 16 + static_cast<int>(i % 16)); };
  std::vector<std::vector<std::byte>> next(static_cast<std::size_t>(ranks));
  std::unique_ptr<moe::parallel::InProcessGroup> group;
  ASSERT_TRUE(moe::parallel::InProcessGroup::create(static_cast<int>(ranks), &group).is_ok());
  ASSERT_TRUE(group->run([&](moe::parallel::Communicator& comm) {
                   const int r = comm.rank();
                   std::vector<std::byte> current(n * kBytes);
                   for (Index q = 0; q < n; ++q) {
                     for (std::size_t i = 0; i < kBytes; ++i) current[q * kBytes + i] = tag(before.physical_to_logical[r * n + q], i);
                   }
                   next[r].assign(n * kBytes, std::byte{0xff});
                   return moe::parallel::move_expert_weights(comm, moves, kBytes, current, next[r]);
                 }).is_ok());
  for (Index q = 0; q < P; ++q) {
    for (std::size_t i = 0; i < kBytes; ++i) {
      ASSERT_EQ(next[q / n][(q % n) * kBytes + i], tag(after.physical_to_logical[q], i)) << "physical expert " << q;
    }
  }
}

}  // namespace
