// Tests of the expert-parallel helpers in moe/expert_map.h: determine_expert_map (vLLM's
// semantics: base = E / P, the first E % P ranks own one extra expert; linear ranges or round
// robin r, r + P, ...; no map when P == 1), local_expert_id and validate_expert_map.
// Expected maps are computed here with independent formulas; all comparisons are exact.
#include <gtest/gtest.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "moe/expert_map.h"
#include "testing/lib/random.h"

namespace {

using moe::ExpertMap;
using moe::ExpertPlacement;
using moe::HostView;
using moe::Index;
using moe::StatusCode;
using i32 = std::int32_t;

constexpr ExpertPlacement kPlacements[] = {ExpertPlacement::kLinear, ExpertPlacement::kRoundRobin};

const char* name(ExpertPlacement p) { return p == ExpertPlacement::kLinear ? "linear" : "round_robin"; }

::testing::AssertionResult IsInvalidArgument(const moe::Status& s, std::string_view arg) {
  if (s.code() != StatusCode::kInvalidArgument) {
    return ::testing::AssertionFailure() << "expected kInvalidArgument naming '" << arg << "', got " << s.to_string();
  }
  if (s.message().find(arg) == std::string::npos) {
    return ::testing::AssertionFailure() << "message does not name '" << arg << "': " << s.message();
  }
  return ::testing::AssertionSuccess();
}

// Number of experts rank r owns: E / P, plus one for the first E % P ranks.
Index naive_count(Index E, Index P, Index r) { return E / P + (r < E % P ? 1 : 0); }

// The map rank r should get, written from the documented placement.
std::vector<i32> naive_map(Index E, Index P, Index r, ExpertPlacement placement) {
  std::vector<i32> map(static_cast<std::size_t>(E), -1);
  if (placement == ExpertPlacement::kLinear) {
    Index start = 0;  // the experts of all lower ranks come first
    for (Index q = 0; q < r; ++q) start += naive_count(E, P, q);
    for (Index g = start; g < start + naive_count(E, P, r); ++g) map[g] = static_cast<i32>(g - start);
  } else {
    for (Index g = 0; g < E; ++g) {
      if (g % P == r) map[g] = static_cast<i32>(g / P);
    }
  }
  return map;
}

ExpertMap call(int P, int r, Index E, ExpertPlacement placement) {
  ExpertMap out;
  out.num_local_experts = -123;
  out.map.assign(3, 77);  // stale contents must be replaced
  const moe::Status s = moe::determine_expert_map(P, r, E, placement, &out);
  EXPECT_TRUE(s.is_ok()) << s.to_string();
  return out;
}

TEST(DetermineExpertMap, SingleRankGivesNoMapAndAllExpertsLocal) {
  for (ExpertPlacement placement : kPlacements) {
    for (Index E : {1, 8, 256, 512}) {
      SCOPED_TRACE(::testing::Message() << name(placement) << " E=" << E);
      const ExpertMap m = call(1, 0, E, placement);
      EXPECT_EQ(m.num_local_experts, E);
      EXPECT_TRUE(m.map.empty()) << "vLLM returns None for ep_size == 1";
    }
  }
}

// Hand-derived: E = 10 over P = 4 ranks: 10 / 4 = 2, 10 % 4 = 2, so ranks 0 and 1 own 3 experts,
// ranks 2 and 3 own 2 (the extras go to the FIRST ranks, not the last).
TEST(DetermineExpertMap, HandExampleTenExpertsFourRanks) {
  const std::vector<std::vector<i32>> linear = {
      {0, 1, 2, -1, -1, -1, -1, -1, -1, -1},
      {-1, -1, -1, 0, 1, 2, -1, -1, -1, -1},
      {-1, -1, -1, -1, -1, -1, 0, 1, -1, -1},
      {-1, -1, -1, -1, -1, -1, -1, -1, 0, 1},
  };
  const std::vector<std::vector<i32>> round_robin = {
      {0, -1, -1, -1, 1, -1, -1, -1, 2, -1},  // 0, 4, 8
      {-1, 0, -1, -1, -1, 1, -1, -1, -1, 2},  // 1, 5, 9
      {-1, -1, 0, -1, -1, -1, 1, -1, -1, -1},  // 2, 6
      {-1, -1, -1, 0, -1, -1, -1, 1, -1, -1},  // 3, 7
  };
  const Index counts[] = {3, 3, 2, 2};
  for (int r = 0; r < 4; ++r) {
    SCOPED_TRACE(::testing::Message() << "rank " << r);
    const ExpertMap lin = call(4, r, 10, ExpertPlacement::kLinear);
    EXPECT_EQ(lin.num_local_experts, counts[r]);
    EXPECT_EQ(lin.map, linear[r]);
    const ExpertMap rr = call(4, r, 10, ExpertPlacement::kRoundRobin);
    EXPECT_EQ(rr.num_local_experts, counts[r]);
    EXPECT_EQ(rr.map, round_robin[r]);
  }
}

TEST(DetermineExpertMap, MatchesNaiveForManyShapes) {
  for (ExpertPlacement placement : kPlacements) {
    for (Index E = 2; E <= 70; ++E) {
      for (Index P = 2; P <= std::min<Index>(E, 17); ++P) {
        for (Index r = 0; r < P; ++r) {
          SCOPED_TRACE(::testing::Message() << name(placement) << " E=" << E << " P=" << P << " rank=" << r);
          const ExpertMap m = call(static_cast<int>(P), static_cast<int>(r), E, placement);
          ASSERT_EQ(m.num_local_experts, naive_count(E, P, r));
          ASSERT_EQ(m.map, naive_map(E, P, r, placement));
        }
      }
    }
  }
}

TEST(DetermineExpertMap, LargeExpertCountsMatchNaive) {
  moe::testing::Random rng(11);
  for (ExpertPlacement placement : kPlacements) {
    for (Index E : {128, 256, 384, 512, 1025}) {
      for (int trial = 0; trial < 6; ++trial) {
        const Index P = rng.integer(2, 64);
        const Index r = rng.integer(0, static_cast<int>(P - 1));
        SCOPED_TRACE(::testing::Message() << name(placement) << " E=" << E << " P=" << P << " rank=" << r);
        const ExpertMap m = call(static_cast<int>(P), static_cast<int>(r), E, placement);
        EXPECT_EQ(m.num_local_experts, naive_count(E, P, r));
        EXPECT_EQ(m.map, naive_map(E, P, r, placement));
      }
    }
  }
}

// Over all ranks every global expert is owned exactly once, each rank's local ids are exactly
// 0 .. n-1, and the counts are 18 for the first 256 % 15 = 1 rank and 17 for the others.
TEST(DetermineExpertMap, UnionOverRanksCoversEveryExpertOnce) {
  struct Shape {
    Index E, P;
  };
  for (ExpertPlacement placement : kPlacements) {
    for (Shape sh : {Shape{256, 15}, Shape{256, 8}, Shape{512, 7}, Shape{60, 60}, Shape{61, 60}, Shape{7, 3}}) {
      SCOPED_TRACE(::testing::Message() << name(placement) << " E=" << sh.E << " P=" << sh.P);
      std::vector<int> owners(static_cast<std::size_t>(sh.E), 0);
      Index total = 0;
      for (Index r = 0; r < sh.P; ++r) {
        const ExpertMap m = call(static_cast<int>(sh.P), static_cast<int>(r), sh.E, placement);
        ASSERT_EQ(static_cast<Index>(m.map.size()), sh.E);
        std::vector<int> local_uses(static_cast<std::size_t>(m.num_local_experts), 0);
        for (Index g = 0; g < sh.E; ++g) {
          const i32 l = m.map[g];
          ASSERT_GE(l, -1);
          ASSERT_LT(l, m.num_local_experts);
          if (l >= 0) {
            ++owners[g];
            ++local_uses[l];
          }
        }
        for (int u : local_uses) EXPECT_EQ(u, 1) << "rank " << r << ": each local id exactly once";
        const Index base = sh.E / sh.P, rem = sh.E % sh.P;
        EXPECT_EQ(m.num_local_experts, r < rem ? base + 1 : base) << "rank " << r;
        total += m.num_local_experts;
      }
      EXPECT_EQ(total, sh.E);
      for (Index g = 0; g < sh.E; ++g) EXPECT_EQ(owners[g], 1) << "global expert " << g;
    }
  }
  // The case of the brief spelled out: E = 256 over 15 ranks.
  EXPECT_EQ(call(15, 0, 256, ExpertPlacement::kLinear).num_local_experts, 18);
  EXPECT_EQ(call(15, 1, 256, ExpertPlacement::kLinear).num_local_experts, 17);
  EXPECT_EQ(call(15, 14, 256, ExpertPlacement::kRoundRobin).num_local_experts, 17);
}

// Linear: rank r's experts are the contiguous range [r*base + min(r, rem), + count) in order;
// round robin: local id i is global r + i*P.
TEST(DetermineExpertMap, PlacementFormulas) {
  for (Index E : {17, 100, 256}) {
    for (Index P : {2, 3, 15, 16}) {
      const Index base = E / P, rem = E % P;
      for (Index r = 0; r < P; ++r) {
        SCOPED_TRACE(::testing::Message() << "E=" << E << " P=" << P << " rank=" << r);
        const ExpertMap lin = call(static_cast<int>(P), static_cast<int>(r), E, ExpertPlacement::kLinear);
        const Index start = r * base + std::min(r, rem);
        for (Index i = 0; i < lin.num_local_experts; ++i) EXPECT_EQ(lin.map[start + i], i);
        const ExpertMap rr = call(static_cast<int>(P), static_cast<int>(r), E, ExpertPlacement::kRoundRobin);
        for (Index i = 0; i < rr.num_local_experts; ++i) EXPECT_EQ(rr.map[r + i * P], i);
        EXPECT_EQ(r + rr.num_local_experts * P >= E, true) << "round robin must not stop early";
      }
    }
  }
}

// Bad inputs: kInvalidArgument naming the argument, *out untouched.
struct DetermineBad {
  ExpertMap out;
  DetermineBad() {
    std::memset(&out.num_local_experts, 0x5A, sizeof(out.num_local_experts));
    out.map.assign(5, 0x5A5A5A5A);
  }
  void expect_rejected(int P, int r, Index E, std::string_view arg) {
    for (ExpertPlacement placement : kPlacements) {
      SCOPED_TRACE(::testing::Message() << name(placement) << " P=" << P << " rank=" << r << " E=" << E);
      const moe::Status s = moe::determine_expert_map(P, r, E, placement, &out);
      EXPECT_TRUE(IsInvalidArgument(s, arg));
      EXPECT_EQ(out.num_local_experts, static_cast<Index>(0x5A5A5A5A5A5A5A5Aull));
      EXPECT_EQ(out.map, std::vector<i32>(5, 0x5A5A5A5A));
    }
  }
};

TEST(DetermineExpertMapBadInput, EpSizeZero) { DetermineBad().expect_rejected(0, 0, 8, "ep_size"); }
TEST(DetermineExpertMapBadInput, EpSizeNegative) { DetermineBad().expect_rejected(-2, 0, 8, "ep_size"); }
TEST(DetermineExpertMapBadInput, EpRankNegative) { DetermineBad().expect_rejected(4, -1, 8, "ep_rank"); }
TEST(DetermineExpertMapBadInput, EpRankEqualsEpSize) { DetermineBad().expect_rejected(4, 4, 8, "ep_rank"); }
TEST(DetermineExpertMapBadInput, EpRankOnSingleRank) { DetermineBad().expect_rejected(1, 1, 8, "ep_rank"); }
TEST(DetermineExpertMapBadInput, FewerExpertsThanRanks) { DetermineBad().expect_rejected(9, 0, 8, "num_experts"); }
TEST(DetermineExpertMapBadInput, ZeroExperts) { DetermineBad().expect_rejected(1, 0, 0, "num_experts"); }

// ---------------------------------------------------------------------------------------------
// local_expert_id

TEST(LocalExpertId, WithoutMapIdentityInRange) {
  for (std::int64_t id = 0; id < 8; ++id) EXPECT_EQ(moe::local_expert_id(id, nullptr, 8), id);
  for (std::int64_t id : {std::int64_t{-1}, std::int64_t{8}, std::int64_t{9}, std::int64_t{-2147483648LL},
                          std::int64_t{2147483647}, (std::int64_t{1} << 32) + 3, std::numeric_limits<std::int64_t>::min()}) {
    EXPECT_EQ(moe::local_expert_id(id, nullptr, 8), -1) << "id " << id;
  }
}

// Bounds come from the global table: an id == E is rejected even if memory past the table holds
// a plausible local id; 2^32 + 3 is not expert 3 (no narrowing before the check).
TEST(LocalExpertId, WithMapBoundsFromGlobalTable) {
  const std::vector<i32> buf = {-1, 0, -1, 1, /* past E = 4: */ 0, 1};
  EXPECT_EQ(moe::local_expert_id(0, buf.data(), 4), -1);
  EXPECT_EQ(moe::local_expert_id(1, buf.data(), 4), 0);
  EXPECT_EQ(moe::local_expert_id(2, buf.data(), 4), -1);
  EXPECT_EQ(moe::local_expert_id(3, buf.data(), 4), 1);
  EXPECT_EQ(moe::local_expert_id(4, buf.data(), 4), -1);
  EXPECT_EQ(moe::local_expert_id(5, buf.data(), 4), -1);
  EXPECT_EQ(moe::local_expert_id(-1, buf.data(), 4), -1);
  EXPECT_EQ(moe::local_expert_id((std::int64_t{1} << 32) + 3, buf.data(), 4), -1);
}

// ---------------------------------------------------------------------------------------------
// validate_expert_map

HostView<const i32, 1> v(const std::vector<i32>& m) { return HostView<const i32, 1>(m.data(), {static_cast<Index>(m.size())}); }

TEST(ValidateExpertMap, AcceptsDetermineExpertMapOutputs) {
  for (ExpertPlacement placement : kPlacements) {
    for (int r = 0; r < 15; ++r) {
      const ExpertMap m = call(15, r, 256, placement);
      EXPECT_TRUE(moe::validate_expert_map(v(m.map), m.num_local_experts).is_ok());
    }
  }
}

TEST(ValidateExpertMap, AcceptsAllRemoteAndEmpty) {
  EXPECT_TRUE(moe::validate_expert_map(v(std::vector<i32>(16, -1)), 1).is_ok());
  EXPECT_TRUE(moe::validate_expert_map(v(std::vector<i32>{}), 0).is_ok());
  EXPECT_TRUE(moe::validate_expert_map(v(std::vector<i32>{-1, 2, -1, 0}), 4).is_ok());  // unused local ids allowed
}

TEST(ValidateExpertMap, RejectsEntryEqualToLocalCount) {
  EXPECT_TRUE(IsInvalidArgument(moe::validate_expert_map(v({-1, 0, 2, 1}), 2), "expert_map"));
}
TEST(ValidateExpertMap, RejectsHugeEntry) {
  EXPECT_TRUE(IsInvalidArgument(moe::validate_expert_map(v({0, std::numeric_limits<i32>::max()}), 2), "expert_map"));
}
TEST(ValidateExpertMap, RejectsEntryBelowMinusOne) {
  EXPECT_TRUE(IsInvalidArgument(moe::validate_expert_map(v({0, -2}), 2), "expert_map"));
  EXPECT_TRUE(IsInvalidArgument(moe::validate_expert_map(v({std::numeric_limits<i32>::min(), 0}), 2), "expert_map"));
}
TEST(ValidateExpertMap, RejectsDuplicateLocalId) {
  EXPECT_TRUE(IsInvalidArgument(moe::validate_expert_map(v({1, -1, 0, 1}), 2), "expert_map"));
}
TEST(ValidateExpertMap, RejectsAnyLocalIdWhenCountIsZero) {
  EXPECT_TRUE(IsInvalidArgument(moe::validate_expert_map(v({-1, 0}), 0), "expert_map"));
}

}  // namespace
