// moe::cpu::moe_align_block_size against its naive definition (testing/cpu/ops_test_support.h).
#include <gtest/gtest.h>

#include "testing/cpu/ops_test_support.h"

namespace {

using namespace moe::testing::cpu_ops;

// ---------------------------------------------------------------------------------------------
// moe_align_block_size

struct AlignRun {
  moe::Status status;
  std::vector<i32> sorted, expert_ids, total;
};

AlignRun run_align(const std::vector<i32>& ids, Index M, Index k, Index B, Index E, const MapSetup& ms, bool pad,
                   bool ignore, Index n, Index blocks, unsigned char byte = kSentinel) {
  AlignRun run;
  run.sorted.resize(static_cast<std::size_t>(n));
  run.expert_ids.resize(static_cast<std::size_t>(blocks));
  run.total.resize(1);
  poison(run.sorted, byte);
  poison(run.expert_ids, byte);
  poison(run.total, byte);
  std::optional<HostView<const i32, 1>> map_v;
  if (ms.has_map) map_v = cview1(ms.map);
  run.status = moe::cpu::moe_align_block_size(cview2(ids, M, k), B, E, map_v, pad, ignore, view1(run.sorted),
                                              view1(run.expert_ids), view1(run.total));
  return run;
}

void check_align(const std::vector<i32>& ids, Index M, Index k, Index B, Index E, const MapSetup& ms, bool pad,
                 bool ignore) {
  SCOPED_TRACE(::testing::Message() << "M=" << M << " k=" << k << " block=" << B << " E=" << E << " map="
                                    << ms.has_map << " num_local=" << ms.num_local << " pad=" << pad
                                    << " ignore_invalid=" << ignore);
  const AlignRef ref = naive_align(ids, M * k, E, B, ms, pad, ignore);
  const moe::cpu::AlignSizes sz = moe::cpu::moe_align_block_size_sizes(M * k, E, B, pad);
  EXPECT_EQ(sz.max_num_tokens_padded, static_cast<Index>(ref.sorted.size()));
  EXPECT_EQ(sz.num_blocks, static_cast<Index>(ref.expert_ids.size()));
  for (unsigned char byte : {static_cast<unsigned char>(0x5A), static_cast<unsigned char>(0xA5)}) {
    const AlignRun run = run_align(ids, M, k, B, E, ms, pad, ignore, static_cast<Index>(ref.sorted.size()),
                                   static_cast<Index>(ref.expert_ids.size()), byte);
    ASSERT_TRUE(run.status.is_ok()) << run.status.to_string();
    EXPECT_TRUE(ExactlyEqual(run.sorted, ref.sorted)) << "sorted_token_ids";
    EXPECT_TRUE(ExactlyEqual(run.expert_ids, ref.expert_ids)) << "expert_ids";
    EXPECT_EQ(run.total[0], ref.total) << "num_tokens_post_padded";
  }
}

// Hand-derived: 3 tokens, k = 1, ids [2, 0, 2], E = 3, block 4. Buffer 3 + 3*3 = 12 (3 blocks).
// Expert 0: slot 1 then 3 padding; expert 1: empty; expert 2: slots 0, 2 then 2 padding.
TEST(MoeAlignBlockSize, HandExampleBlock4) {
  const std::vector<i32> ids = {2, 0, 2};
  MapSetup ms;
  ms.num_local = 3;
  const AlignRun run = run_align(ids, 3, 1, 4, 3, ms, false, false, 12, 3);
  ASSERT_TRUE(run.status.is_ok()) << run.status.to_string();
  EXPECT_EQ(run.sorted, (std::vector<i32>{1, 3, 3, 3, 0, 2, 3, 3, 3, 3, 3, 3}));
  EXPECT_EQ(run.expert_ids, (std::vector<i32>{0, 2, -1}));
  EXPECT_EQ(run.total[0], 8);
}

// Hand-derived small batch (numel < E): M=1, k=2, E=8, block 16: buffer min(2*16, 2 + 8*15) = 32.
TEST(MoeAlignBlockSize, HandExampleSmallBatch) {
  const std::vector<i32> ids = {5, 1};
  MapSetup ms;
  ms.num_local = 8;
  const AlignRun run = run_align(ids, 1, 2, 16, 8, ms, false, false, 32, 2);
  ASSERT_TRUE(run.status.is_ok()) << run.status.to_string();
  std::vector<i32> want(32, 2);
  want[0] = 1;   // expert 1: slot 1
  want[16] = 0;  // expert 5: slot 0
  EXPECT_EQ(run.sorted, want);
  EXPECT_EQ(run.expert_ids, (std::vector<i32>{1, 5}));
  EXPECT_EQ(run.total[0], 32);
}

// Hand-derived expert_map: E=4, map [-1, 0, -1, 1], ids [0, 1, 3, 7] (k = 1), block 2.
// ignore_invalid=false: counted per global expert, labels from the map (-1 for remote experts),
// id 7 dropped. ignore_invalid=true: only experts 1 (local 0) and 3 (local 1) count.
TEST(MoeAlignBlockSize, HandExampleExpertMap) {
  const std::vector<i32> ids = {0, 1, 3, 7};
  MapSetup ms;
  ms.num_local = 2;
  ms.has_map = true;
  ms.map = {-1, 0, -1, 1};
  {
    const AlignRun run = run_align(ids, 4, 1, 2, 4, ms, false, false, 8, 4);  // 4 + 4*1 = 8
    ASSERT_TRUE(run.status.is_ok()) << run.status.to_string();
    EXPECT_EQ(run.sorted, (std::vector<i32>{0, 4, 1, 4, 2, 4, 4, 4}));
    EXPECT_EQ(run.expert_ids, (std::vector<i32>{-1, 0, 1, -1}));
    EXPECT_EQ(run.total[0], 6);
  }
  {
    const AlignRun run = run_align(ids, 4, 1, 2, 4, ms, false, true, 8, 4);
    ASSERT_TRUE(run.status.is_ok()) << run.status.to_string();
    EXPECT_EQ(run.sorted, (std::vector<i32>{1, 4, 2, 4, 4, 4, 4, 4}));
    EXPECT_EQ(run.expert_ids, (std::vector<i32>{0, 1, -1, -1}));
    EXPECT_EQ(run.total[0], 4);
  }
}

TEST(MoeAlignBlockSize, RandomMatchesNaive) {
  Random rng(301);
  const MapKind maps[] = {MapKind::kNone, MapKind::kLinear, MapKind::kRoundRobin, MapKind::kRandom, MapKind::kAllRemote};
  const IdKind kinds[] = {IdKind::kDistinct, IdKind::kWithDuplicates, IdKind::kWithInvalid, IdKind::kOneExpert};
  for (Index E : {1, 2, 7, 64, 256, 512}) {
    for (Index B : {1, 16, 128}) {
      for (MapKind mk : maps) {
        for (IdKind ik : kinds) {
          const MapSetup ms = make_map(rng, mk, E);
          const Index M = std::vector<Index>{0, 1, 3, 33, 222}[rng.integer(0, 4)];
          const Index k = ik == IdKind::kDistinct ? rng.integer(1, static_cast<int>(std::min<Index>(E, 8)))
                                                  : rng.integer(1, 8);
          const std::vector<i32> ids = make_ids(rng, M, k, E, ik);
          for (bool pad : {false, true}) {
            for (bool ignore : {false, true}) check_align(ids, M, k, B, E, ms, pad, ignore);
          }
        }
      }
    }
  }
}

TEST(MoeAlignBlockSize, EmptyBatch) {
  Random rng(302);
  for (MapKind mk : {MapKind::kNone, MapKind::kLinear}) {
    const MapSetup ms = make_map(rng, mk, 64);
    for (bool pad : {false, true}) {
      for (bool ignore : {false, true}) check_align({}, 0, 8, 16, 64, ms, pad, ignore);
    }
  }
}

TEST(MoeAlignBlockSize, TopKEqualsNumExperts) {
  Random rng(303);
  for (Index E : {1, 8, 32}) {
    const std::vector<i32> ids = make_ids(rng, 5, E, E, IdKind::kDistinct);
    check_align(ids, 5, E, 16, E, make_map(rng, MapKind::kNone, E), true, false);
    check_align(ids, 5, E, 16, E, make_map(rng, MapKind::kLinear, E), false, true);
  }
}

TEST(MoeAlignBlockSize, AllTokensOnOneExpertLargeBatch) {
  Random rng(304);
  std::vector<i32> ids(4096, 7);
  check_align(ids, 4096, 1, 128, 512, make_map(rng, MapKind::kNone, 512), false, false);
  for (std::size_t i = 0; i < ids.size(); i += 2) ids[i] = 3;  // {7, 3} with k = 2
  check_align(ids, 2048, 2, 64, 256, make_map(rng, MapKind::kRoundRobin, 256), true, true);
  check_align(ids, 2048, 2, 64, 256, make_map(rng, MapKind::kRoundRobin, 256), true, false);
}

// Invalid ids are dropped in both modes; a buffer sized for the valid ids only is never overrun.
TEST(MoeAlignBlockSize, InvalidIdsAreDropped) {
  Random rng(305);
  const std::vector<i32> ids = {-1, 8, kI32Max, kI32Min, 123456789, 9, -2, 1};  // only the last is valid
  for (MapKind mk : {MapKind::kNone, MapKind::kRoundRobin}) {
    const MapSetup ms = make_map(rng, mk, 8);
    for (bool ignore : {false, true}) {
      for (bool pad : {false, true}) check_align(ids, 2, 4, 4, 8, ms, pad, ignore);
    }
    // Without an expert_map: exactly one slot (7) is counted: one block of expert 1.
    if (!ms.has_map) {
      const AlignRun run = run_align(ids, 2, 4, 4, 8, ms, false, false, 8 + 8 * 3, 8);
      ASSERT_TRUE(run.status.is_ok());
      EXPECT_EQ(run.total[0], 4);
      EXPECT_EQ(run.sorted[0], 7);
      EXPECT_EQ(run.expert_ids[0], 1);
    }
  }
}


}  // namespace
