// moe::cpu::moe_fused_mul_sum and eplb_logical_to_physical against their naive definitions.
#include <gtest/gtest.h>

#include "testing/cpu/ops_test_support.h"

namespace {

using namespace moe::testing::cpu_ops;

// ---------------------------------------------------------------------------------------------
// moe_fused_mul_sum

template <class T>
void check_fused_mul_sum(Random& rng, Index M, Index k, Index H, Index E, MapKind mk, IdKind ik, bool pass_ids) {
  SCOPED_TRACE(::testing::Message() << "M=" << M << " k=" << k << " H=" << H << " E=" << E << " map="
                                    << map_kind_name(mk) << " ids=" << static_cast<int>(ik) << " pass_ids=" << pass_ids);
  const MapSetup ms = make_map(rng, mk, E);
  const std::vector<i32> ids = make_ids(rng, M, k, E, ik);
  const std::vector<T> x = rng.normal_vector<T>(static_cast<std::size_t>(M * k * H));
  const std::vector<float> w = rng.uniform_vector<float>(static_cast<std::size_t>(M * k), -1.0f, 1.0f);
  // Naive: with an expert_map, slots whose id is outside [0, E) or maps to -1 are skipped;
  // without one every slot counts (the ids are not even read).
  std::vector<double> want(static_cast<std::size_t>(M * H), 0.0);
  for (Index m = 0; m < M; ++m) {
    for (Index j = 0; j < k; ++j) {
      if (ms.has_map && naive_local(ids[m * k + j], E, ms) < 0) continue;
      for (Index c = 0; c < H; ++c) want[m * H + c] += static_cast<double>(w[m * k + j]) * moe::to_float(x[(m * k + j) * H + c]);
    }
  }
  std::vector<T> out(static_cast<std::size_t>(M * H));
  poison(out);
  std::optional<HostView<const i32, 2>> ids_v;
  if (pass_ids || ms.has_map) ids_v = cview2(ids, M, k);
  std::optional<HostView<const i32, 1>> map_v;
  if (ms.has_map) map_v = cview1(ms.map);
  const auto st = moe::cpu::moe_fused_mul_sum<T>(HostView<const T, 3>(x.data(), {M, k, H}), cview2(w, M, k),
                                                 view2(out, M, H), ids_v, map_v);
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  EXPECT_TRUE(moe::testing::all_close(to_floats(out), want, tolerance_for<T>()));
}

template <class T>
void fused_mul_sum_sweep(std::uint64_t seed) {
  Random rng(seed);
  const MapKind maps[] = {MapKind::kNone, MapKind::kLinear, MapKind::kRoundRobin, MapKind::kRandom, MapKind::kAllRemote};
  const IdKind kinds[] = {IdKind::kDistinct, IdKind::kWithDuplicates, IdKind::kWithInvalid, IdKind::kOneExpert};
  for (Index E : {1, 8, 64, 512}) {
    for (MapKind mk : maps) {
      for (IdKind ik : kinds) {
        const Index M = std::vector<Index>{0, 1, 5, 40}[rng.integer(0, 3)];
        const Index k = ik == IdKind::kDistinct ? rng.integer(1, static_cast<int>(std::min<Index>(E, 8))) : rng.integer(1, 8);
        check_fused_mul_sum<T>(rng, M, k, rng.integer(1, 48), E, mk, ik, rng.integer(0, 1) == 1);
      }
    }
  }
}

TEST(MoeFusedMulSum, RandomMatchesNaiveFloat) { fused_mul_sum_sweep<float>(401); }
TEST(MoeFusedMulSum, RandomMatchesNaiveBf16) { fused_mul_sum_sweep<bfloat16>(402); }
TEST(MoeFusedMulSum, RandomMatchesNaiveHalf) { fused_mul_sum_sweep<half>(403); }

// Duplicate ids [3, 3] with weights [0.25, 0.5]: 0.75 * x, both slots summed (each its own input).
TEST(MoeFusedMulSum, DuplicateExpertInRow) {
  const Index H = 4;
  const std::vector<float> x = {1, 2, 3, 4, 1, 2, 3, 4};  // the same expert output in both slots
  const std::vector<float> w = {0.25f, 0.5f};
  const std::vector<i32> ids = {3, 3};
  const std::vector<i32> map = {-1, -1, -1, 0};
  std::vector<float> out(H);
  poison(out);
  const auto st = moe::cpu::moe_fused_mul_sum<float>(HostView<const float, 3>(x.data(), {1, 2, H}), cview2(w, 1, 2),
                                                     view2(out, 1, H), cview2(ids, 1, 2), cview1(map));
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  EXPECT_EQ(out, (std::vector<float>{0.75f, 1.5f, 2.25f, 3.0f}));
}

// With an expert_map, a row whose slots are all skipped (-1, == E, remote) is exactly +0 even
// though the output held the sentinel.
TEST(MoeFusedMulSum, SkippedRowIsZero) {
  const Index H = 3;
  const std::vector<float> x = {1, 1, 1, 2, 2, 2, 3, 3, 3, 9, 9, 9, 9, 9, 9, 9, 9, 9};  // M=2, k=3
  const std::vector<float> w = {1, 1, 1, 0.5f, 0.5f, 0.5f};
  const std::vector<i32> ids = {-1, 4, 0, 1, 2, 1};  // E = 4; token 0: -1, ==E, remote
  const std::vector<i32> map = {-1, 0, 1, -1};
  std::vector<float> out(2 * H);
  poison(out);
  const auto st = moe::cpu::moe_fused_mul_sum<float>(HostView<const float, 3>(x.data(), {2, 3, H}), cview2(w, 2, 3),
                                                     view2(out, 2, H), cview2(ids, 2, 3), cview1(map));
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  EXPECT_EQ(out, (std::vector<float>{0, 0, 0, 13.5f, 13.5f, 13.5f}));
  for (Index c = 0; c < H; ++c) EXPECT_EQ(std::bit_cast<std::uint32_t>(out[c]), 0u);
}

// ---------------------------------------------------------------------------------------------
// eplb_logical_to_physical

struct EplbSetup {
  Index L, max_rep, P;
  std::vector<i32> map;    // [L, max_rep]; entries past the count hold -1 (as vLLM pads)
  std::vector<i32> count;  // [L]
};

EplbSetup make_eplb(Random& rng, Index L, Index max_rep, Index P) {
  EplbSetup s{L, max_rep, P, std::vector<i32>(static_cast<std::size_t>(L * max_rep), -1),
              std::vector<i32>(static_cast<std::size_t>(L))};
  for (Index e = 0; e < L; ++e) {
    s.count[e] = rng.integer(1, static_cast<int>(max_rep));
    for (Index r = 0; r < s.count[e]; ++r) s.map[e * max_rep + r] = rng.integer(0, static_cast<int>(P - 1));
  }
  return s;
}

// From the header: kTokenHash: replica = ((m * 2654435769) mod 2^32) mod count; kSlotPosition:
// (m*k + j) mod count. Ids outside [0, L) give -1. Loads count valid ids of tokens m <
// num_unpadded_tokens (all tokens when negative), on top of what the buffer held.
void naive_eplb(const EplbSetup& s, const std::vector<i32>& ids, Index M, Index k, ReplicaChoice choice,
                Index unpadded, std::vector<i32>* phys, std::vector<i64>* load) {
  phys->assign(static_cast<std::size_t>(M * k), -1);
  for (Index m = 0; m < M; ++m) {
    const std::uint32_t hash = static_cast<std::uint32_t>(m) * 2654435769u;  // wraps mod 2^32
    for (Index j = 0; j < k; ++j) {
      const i32 id = ids[m * k + j];
      if (id < 0 || id >= s.L) continue;
      const std::uint64_t c = static_cast<std::uint64_t>(s.count[id]);
      const std::uint64_t replica = choice == ReplicaChoice::kTokenHash ? hash % c : static_cast<std::uint64_t>(m * k + j) % c;
      const i32 p = s.map[id * s.max_rep + static_cast<Index>(replica)];
      (*phys)[m * k + j] = p;
      if (unpadded < 0 || m < unpadded) ++(*load)[p];
    }
  }
}

void check_eplb(Random& rng, Index M, Index k, Index L, Index max_rep, Index P, ReplicaChoice choice, Index unpadded,
                bool with_load, bool invalid_ids) {
  SCOPED_TRACE(::testing::Message() << "M=" << M << " k=" << k << " L=" << L << " max_rep=" << max_rep << " P=" << P
                                    << " choice=" << static_cast<int>(choice) << " unpadded=" << unpadded
                                    << " load=" << with_load << " invalid=" << invalid_ids);
  const EplbSetup s = make_eplb(rng, L, max_rep, P);
  const std::vector<i32> ids = make_ids(rng, M, k, L, invalid_ids ? IdKind::kWithInvalid : IdKind::kWithDuplicates);
  std::vector<i64> initial_load(static_cast<std::size_t>(P));
  for (auto& x : initial_load) x = rng.integer(0, 1000);  // loads accumulate (vLLM scatter_add_)
  std::vector<i32> want_phys;
  std::vector<i64> want_load = initial_load;
  naive_eplb(s, ids, M, k, choice, unpadded, &want_phys, &want_load);
  std::vector<i32> phys(static_cast<std::size_t>(M * k));
  poison(phys);
  std::vector<i64> load = initial_load;
  std::optional<HostView<i64, 1>> load_v;
  if (with_load) load_v = view1(load);
  const auto st = moe::cpu::eplb_logical_to_physical(cview2(ids, M, k), cview2(s.map, L, max_rep), cview1(s.count), P,
                                                     choice, view2(phys, M, k), load_v, unpadded);
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  EXPECT_TRUE(ExactlyEqual(phys, want_phys)) << "physical_ids";
  EXPECT_TRUE(ExactlyEqual(load, with_load ? want_load : initial_load)) << "expert_load";
}

TEST(Eplb, RandomMatchesNaive) {
  Random rng(501);
  for (ReplicaChoice choice : {ReplicaChoice::kTokenHash, ReplicaChoice::kSlotPosition}) {
    for (Index L : {1, 8, 256, 512}) {
      for (Index max_rep : {1, 2, 3, 5}) {
        for (bool invalid : {false, true}) {
          const Index M = std::vector<Index>{0, 1, 7, 300}[rng.integer(0, 3)];
          const Index unpadded = std::vector<Index>{-1, 0, M / 2, M, M + 3}[rng.integer(0, 4)];
          check_eplb(rng, M, rng.integer(1, 8), L, max_rep, L + rng.integer(0, 40), choice, unpadded,
                     rng.integer(0, 3) != 0, invalid);
        }
      }
    }
  }
}

// Hand-derived: one logical expert with 3 replicas (physical 10, 11, 12), M = 4, k = 2.
// kSlotPosition: replica = (m*2 + j) % 3 over slots 0..7 -> 0 1 2 0 1 2 0 1.
// kTokenHash: m * 2654435769 mod 2^32 = 0, 2654435769, 1013904242, 3668340011 -> mod 3 = 0, 0, 2, 2.
TEST(Eplb, HandExampleBothModes) {
  const std::vector<i32> map = {10, 11, 12};
  const std::vector<i32> count = {3};
  const std::vector<i32> ids(8, 0);
  std::vector<i32> phys(8);
  for (ReplicaChoice choice : {ReplicaChoice::kSlotPosition, ReplicaChoice::kTokenHash}) {
    std::vector<i64> load(13, 0);
    poison(phys);
    const auto st = moe::cpu::eplb_logical_to_physical(cview2(ids, 4, 2), cview2(map, 1, 3), cview1(count), 13, choice,
                                                       view2(phys, 4, 2), view1(load), 3);
    ASSERT_TRUE(st.is_ok()) << st.to_string();
    if (choice == ReplicaChoice::kSlotPosition) {
      EXPECT_EQ(phys, (std::vector<i32>{10, 11, 12, 10, 11, 12, 10, 11}));
      EXPECT_EQ(load[10], 2);  // tokens 0..2 only (num_unpadded_tokens = 3): slots 0, 3
      EXPECT_EQ(load[11], 2);  // slots 1, 4
      EXPECT_EQ(load[12], 2);  // slots 2, 5
    } else {
      EXPECT_EQ(phys, (std::vector<i32>{10, 10, 10, 10, 12, 12, 12, 12}));
      EXPECT_EQ(load[10], 4);
      EXPECT_EQ(load[11], 0);
      EXPECT_EQ(load[12], 2);
    }
  }
}

// Invalid logical ids map to -1 and are not counted; large token indices hash without overflow.
TEST(Eplb, InvalidIdsAndPaddingNotCounted) {
  Random rng(502);
  for (ReplicaChoice choice : {ReplicaChoice::kTokenHash, ReplicaChoice::kSlotPosition}) {
    check_eplb(rng, 5000, 4, 16, 4, 20, choice, 4000, true, true);
    check_eplb(rng, 5000, 4, 16, 4, 20, choice, -1, true, true);
  }
  const std::vector<i32> map = {0, 1};
  const std::vector<i32> count = {2};
  const std::vector<i32> ids = {-1, 1, kI32Max, kI32Min};  // L = 1: none valid
  std::vector<i32> phys(4);
  poison(phys);
  std::vector<i64> load(2, 0);
  const auto st = moe::cpu::eplb_logical_to_physical(cview2(ids, 2, 2), cview2(map, 1, 2), cview1(count), 2,
                                                     ReplicaChoice::kTokenHash, view2(phys, 2, 2), view1(load));
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  EXPECT_EQ(phys, (std::vector<i32>{-1, -1, -1, -1}));
  EXPECT_EQ(load, (std::vector<i64>{0, 0}));
}


}  // namespace
