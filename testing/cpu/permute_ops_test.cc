// moe::cpu::moe_permute and moe_unpermute against their naive definitions (testing/cpu/ops_test_support.h).
#include <gtest/gtest.h>

#include "testing/cpu/ops_test_support.h"

namespace {

using namespace moe::testing::cpu_ops;

// ---------------------------------------------------------------------------------------------
// moe_permute

struct PermuteRun {
  moe::Status status;
  std::vector<i64> offsets;
  std::vector<i32> inv, pidx, m_idx;
  std::vector<float> scales;
};

template <class T>
PermuteRun run_permute(const std::vector<T>& hidden, Index M, Index H, Index row_stride, const std::vector<float>* scales,
                       Index S, const std::vector<i32>& ids, Index k, Index E, const MapSetup& ms, Index A, i32 fill,
                       Index R, std::vector<T>* permuted, unsigned char poison_byte, bool with_m_indices = true) {
  PermuteRun run;
  const Index El = ms.num_local;
  permuted->assign(static_cast<std::size_t>(R * H), T{});
  poison(*permuted, poison_byte);
  run.offsets.resize(static_cast<std::size_t>(El + 1));
  run.inv.resize(static_cast<std::size_t>(M * k));
  run.pidx.resize(static_cast<std::size_t>(R));
  run.m_idx.resize(static_cast<std::size_t>(R));
  run.scales.resize(static_cast<std::size_t>(R * S));
  poison(run.offsets, poison_byte);
  poison(run.inv, poison_byte);
  poison(run.pidx, poison_byte);
  poison(run.m_idx, poison_byte);
  poison(run.scales, poison_byte);
  moe::cpu::PermuteOutputs<T> out{view2(*permuted, R, H), std::nullopt, view1(run.offsets), view1(run.inv),
                                  view1(run.pidx), std::nullopt};
  if (with_m_indices) out.m_indices = view1(run.m_idx);
  std::optional<HostView<const float, 2>> scales_v;
  if (scales) {
    scales_v = cview2(*scales, M, S);
    out.permuted_scales = view2(run.scales, R, S);
  }
  std::optional<HostView<const i32, 1>> map_v;
  if (ms.has_map) map_v = cview1(ms.map);
  const HostView<const T, 2> hidden_v(hidden.data(), {M, H}, {row_stride, 1});
  run.status = moe::cpu::moe_permute<T>(hidden_v, scales_v, cview2(ids, M, k), E, El, map_v, A, fill, out);
  return run;
}

struct PermuteCase {
  Index M, k, H, E;
  MapKind map_kind;
  Index A;
  IdKind id_kind;
  bool scales;
};

std::string describe(const PermuteCase& c) {
  std::ostringstream os;
  os << "M=" << c.M << " k=" << c.k << " H=" << c.H << " E=" << c.E << " map=" << map_kind_name(c.map_kind)
     << " align=" << c.A << " ids=" << static_cast<int>(c.id_kind) << " scales=" << c.scales;
  return os.str();
}

// Runs one case twice (outputs poisoned with two different bytes) and checks both runs exactly
// against naive_permute.
template <class T>
void check_permute_case(const PermuteCase& c, Random& rng, const MapSetup* given_map = nullptr,
                        const std::vector<i32>* given_ids = nullptr, Index row_pad = 0) {
  SCOPED_TRACE(describe(c));
  const MapSetup ms = given_map ? *given_map : make_map(rng, c.map_kind, c.E);
  const std::vector<i32> ids = given_ids ? *given_ids : make_ids(rng, c.M, c.k, c.E, c.id_kind);
  const Index stride = c.H + row_pad;
  const std::vector<T> hidden = rng.normal_vector<T>(static_cast<std::size_t>(std::max<Index>(c.M * stride, 1)));
  const Index S = 3;
  const std::vector<float> scales = rng.uniform_vector<float>(static_cast<std::size_t>(c.M * S), 0.5f, 2.0f);
  const i32 fill = rng.integer(0, 1) ? -1 : -7;
  const PermuteRef ref = naive_permute(ids, c.M, c.k, c.E, ms, c.A, fill);
  ASSERT_EQ(ref.R, moe::cpu::moe_permute_rows(c.M, static_cast<int>(c.k), ms.num_local, c.A));

  // Expected permuted rows: the token's row, or zeros.
  std::vector<T> want_hidden(static_cast<std::size_t>(ref.R * c.H), moe::from_float<T>(0.0f));
  std::vector<float> want_scales(static_cast<std::size_t>(ref.R * S), 0.0f);
  const Index slots = c.M * c.k;
  for (Index r = 0; r < ref.R; ++r) {
    if (ref.src[r] >= 0) {
      for (Index h = 0; h < c.H; ++h) want_hidden[r * c.H + h] = hidden[ref.src[r] * stride + h];
    }
    if (slots > 0) {  // vLLM: a1q_scale[permuted_idx.clamp(max=M*k-1) // k]
      const Index token = std::min<Index>(ref.pidx[r], slots - 1) / c.k;
      for (Index s = 0; s < S; ++s) want_scales[r * S + s] = scales[token * S + s];
    }
  }
  for (unsigned char byte : {static_cast<unsigned char>(0x5A), static_cast<unsigned char>(0xA5)}) {
    std::vector<T> permuted;
    const PermuteRun run = run_permute<T>(hidden, c.M, c.H, stride, c.scales ? &scales : nullptr, S, ids, c.k, c.E, ms,
                                          c.A, fill, ref.R, &permuted, byte);
    ASSERT_TRUE(run.status.is_ok()) << run.status.to_string();
    EXPECT_TRUE(ExactlyEqual(run.offsets, ref.offsets)) << "expert_first_token_offset";
    EXPECT_TRUE(ExactlyEqual(run.inv, ref.inv)) << "inv_permuted_idx";
    EXPECT_TRUE(ExactlyEqual(run.pidx, ref.pidx)) << "permuted_idx";
    EXPECT_TRUE(ExactlyEqual(run.m_idx, ref.m_idx)) << "m_indices";
    EXPECT_TRUE(BitwiseEqual(permuted, want_hidden)) << "permuted_hidden_states";
    if (c.scales) {
      EXPECT_TRUE(BitwiseEqual(run.scales, want_scales)) << "permuted_scales";
    }
  }
}

// Hand-derived: M=2, k=2, E=3, no map, ids [[2, 0], [0, 5]] (5 is out of range).
// Slots s = m*k + j: s0->2, s1->0, s2->0, s3->5.
TEST(MoePermute, HandExampleUnaligned) {
  const std::vector<float> hidden = {1, 2, 3, 4};  // H = 2: token 0 = (1, 2), token 1 = (3, 4)
  const std::vector<i32> ids = {2, 0, 0, 5};
  MapSetup ms;
  ms.num_local = 3;
  std::vector<float> permuted;
  const PermuteRun run = run_permute<float>(hidden, 2, 2, 2, nullptr, 0, ids, 2, 3, ms, 0, -1, 4, &permuted, kSentinel);
  ASSERT_TRUE(run.status.is_ok()) << run.status.to_string();
  // Expert 0 gets s1, s2 (rows 0, 1); expert 1 nothing; expert 2 gets s0 (row 2); s3 follows.
  EXPECT_EQ(run.offsets, (std::vector<i64>{0, 2, 2, 3}));
  EXPECT_EQ(run.inv, (std::vector<i32>{2, 0, 1, 3}));
  EXPECT_EQ(run.pidx, (std::vector<i32>{1, 2, 0, 4}));
  EXPECT_EQ(run.m_idx, (std::vector<i32>{0, 0, 2, -1}));
  EXPECT_EQ(permuted, (std::vector<float>{1, 2, 3, 4, 1, 2, 0, 0}));
}

// The same with align_block_size = 4: R = round_up(4 + 3*3, 4) = 16, expert 0's segment is rows
// [0, 4), expert 2's [4, 8); the out-of-range slot points at the aligned total 8.
TEST(MoePermute, HandExampleAligned) {
  const std::vector<float> hidden = {1, 2, 3, 4};
  const std::vector<i32> ids = {2, 0, 0, 5};
  MapSetup ms;
  ms.num_local = 3;
  std::vector<float> permuted;
  const PermuteRun run = run_permute<float>(hidden, 2, 2, 2, nullptr, 0, ids, 2, 3, ms, 4, -1, 16, &permuted, kSentinel);
  ASSERT_TRUE(run.status.is_ok()) << run.status.to_string();
  EXPECT_EQ(run.offsets, (std::vector<i64>{0, 4, 4, 8}));
  EXPECT_EQ(run.inv, (std::vector<i32>{4, 0, 1, 8}));
  EXPECT_EQ(run.pidx, (std::vector<i32>{1, 2, 4, 4, 0, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4}));
  EXPECT_EQ(run.m_idx, (std::vector<i32>{0, 0, 0, 0, 2, 2, 2, 2, -1, -1, -1, -1, -1, -1, -1, -1}));
  std::vector<float> want(32, 0.0f);
  want[0] = 1, want[1] = 2, want[2] = 3, want[3] = 4, want[8] = 1, want[9] = 2;  // rows 0, 1, 4
  EXPECT_EQ(permuted, want);
}

template <class T>
void permute_random_sweep(std::uint64_t seed) {
  Random rng(seed);
  const MapKind maps[] = {MapKind::kNone, MapKind::kLinear, MapKind::kRoundRobin, MapKind::kRandom, MapKind::kAllRemote};
  const IdKind kinds[] = {IdKind::kDistinct, IdKind::kWithDuplicates, IdKind::kWithInvalid, IdKind::kOneExpert};
  const Index aligns[] = {0, 1, 16, 128};
  const Index Es[] = {1, 3, 8, 64, 512};
  for (Index E : Es) {
    for (MapKind mk : maps) {
      for (IdKind ik : kinds) {
        for (Index A : aligns) {
          const Index M = std::vector<Index>{0, 1, 2, 7, 33, 100}[rng.integer(0, 5)];
          const Index k = ik == IdKind::kDistinct ? rng.integer(1, static_cast<int>(std::min<Index>(E, 8)))
                                                  : rng.integer(1, 8);
          check_permute_case<T>({M, k, rng.integer(1, 9), E, mk, A, ik, rng.integer(0, 1) == 1}, rng);
        }
      }
    }
  }
}

TEST(MoePermute, RandomMatchesNaiveFloat) { permute_random_sweep<float>(101); }
TEST(MoePermute, RandomMatchesNaiveBf16) { permute_random_sweep<bfloat16>(102); }
TEST(MoePermute, RandomMatchesNaiveHalf) { permute_random_sweep<half>(103); }

TEST(MoePermute, EmptyBatch) {
  Random rng(104);
  for (MapKind mk : {MapKind::kNone, MapKind::kLinear, MapKind::kRandom}) {
    for (Index A : {0, 16}) {
      check_permute_case<float>({0, 2, 8, 16, mk, A, IdKind::kDistinct, true}, rng);
    }
  }
}

TEST(MoePermute, SingleTokenSingleExpert) {
  Random rng(105);
  for (Index A : {0, 4}) check_permute_case<float>({1, 1, 5, 1, MapKind::kNone, A, IdKind::kDistinct, true}, rng);
}

TEST(MoePermute, TopKEqualsNumExperts) {
  Random rng(106);
  for (Index E : {1, 4, 8, 32}) {
    for (Index A : {0, 16}) check_permute_case<float>({9, E, 4, E, MapKind::kNone, A, IdKind::kDistinct, true}, rng);
  }
}

TEST(MoePermute, AllTokensOnOneExpertOthersEmpty) {
  Random rng(107);
  for (Index A : {0, 128}) {
    check_permute_case<float>({300, 2, 4, 64, MapKind::kNone, A, IdKind::kOneExpert, true}, rng);
    check_permute_case<float>({300, 2, 4, 64, MapKind::kLinear, A, IdKind::kOneExpert, true}, rng);
  }
}

// Every kind of invalid id in every slot of a row: none is copied, none changes a local row.
TEST(MoePermute, InvalidIdsAreNeverRouted) {
  Random rng(108);
  const std::vector<i32> ids = {-1, 8, kI32Max, kI32Min, 3, 123456789, -2, 3, 0, 9, 7, -1};  // M=3, k=4, E=8
  for (MapKind mk : {MapKind::kNone, MapKind::kLinear, MapKind::kRoundRobin}) {
    const MapSetup ms = make_map(rng, mk, 8);
    for (Index A : {0, 16}) check_permute_case<float>({3, 4, 6, 8, mk, A, IdKind::kWithInvalid, true}, rng, &ms, &ids);
  }
}

// Scales are gathered by the token of each row; padding rows take the clamped (last) token.
TEST(MoePermute, ScalesGatheredByTokenWithClamp) {
  const std::vector<float> hidden = {1, 2, 3};            // M = 3, H = 1
  const std::vector<float> scales = {10, 11, 20, 21, 30, 31};  // S = 2
  const std::vector<i32> ids = {1, 0, 1};                 // k = 1, E = 2
  MapSetup ms;
  ms.num_local = 2;
  std::vector<float> permuted;
  // A = 2: R = round_up(3 + 2, 2) = 6. Expert 0: slot 1 at row 0, padding row 1; expert 1: slots
  // 0, 2 at rows 2, 3; rows 4, 5 unused. Padding rows have permuted_idx = 3 -> clamp 2 -> token 2.
  const PermuteRun run = run_permute<float>(hidden, 3, 1, 1, &scales, 2, ids, 1, 2, ms, 2, -1, 6, &permuted, kSentinel);
  ASSERT_TRUE(run.status.is_ok()) << run.status.to_string();
  EXPECT_EQ(run.pidx, (std::vector<i32>{1, 3, 0, 2, 3, 3}));
  EXPECT_EQ(run.scales, (std::vector<float>{20, 21, 30, 31, 10, 11, 30, 31, 30, 31, 30, 31}));
  EXPECT_EQ(permuted, (std::vector<float>{2, 0, 1, 3, 0, 0}));
}

// hidden_states given as a column slice of a wider buffer (row stride > H) is read correctly.
TEST(MoePermute, RowStridedHidden) {
  Random rng(109);
  for (Index A : {0, 16}) check_permute_case<float>({20, 3, 5, 16, MapKind::kRandom, A, IdKind::kWithInvalid, true}, rng, nullptr, nullptr, 7);
}

// Without m_indices the other outputs are the same.
TEST(MoePermute, WithoutMIndices) {
  Random rng(110);
  const MapSetup ms = make_map(rng, MapKind::kRoundRobin, 32);
  const std::vector<i32> ids = make_ids(rng, 40, 4, 32, IdKind::kWithInvalid);
  const std::vector<float> hidden = rng.normal_vector<float>(40 * 8);
  const PermuteRef ref = naive_permute(ids, 40, 4, 32, ms, 16, -1);
  std::vector<float> permuted;
  const PermuteRun run = run_permute<float>(hidden, 40, 8, 8, nullptr, 0, ids, 4, 32, ms, 16, -1, ref.R, &permuted, kSentinel, false);
  ASSERT_TRUE(run.status.is_ok()) << run.status.to_string();
  EXPECT_TRUE(ExactlyEqual(run.offsets, ref.offsets));
  EXPECT_TRUE(ExactlyEqual(run.inv, ref.inv));
  EXPECT_TRUE(ExactlyEqual(run.pidx, ref.pidx));
  EXPECT_TRUE(is_poisoned(run.m_idx)) << "m_indices was not passed, its buffer must be untouched";
}

// ---------------------------------------------------------------------------------------------
// moe_unpermute

template <class T>
void check_unpermute(Random& rng, Index M, Index k, Index H, Index R, bool with_eft, Index row_pad = 0) {
  SCOPED_TRACE(::testing::Message() << "M=" << M << " k=" << k << " H=" << H << " R=" << R << " eft=" << with_eft);
  const Index stride = H + row_pad;
  const std::vector<T> permuted = rng.normal_vector<T>(static_cast<std::size_t>(std::max<Index>(R * stride, 1)));
  const std::vector<float> w = rng.uniform_vector<float>(static_cast<std::size_t>(M * k), -1.0f, 1.0f);
  // The last offset: rows at or past it are non-local and must be skipped, whatever their value.
  const i64 valid = R == 0 ? 0 : rng.integer(0, static_cast<int>(R));
  std::vector<i64> eft = {0, valid / 2, valid};
  std::vector<i32> inv(static_cast<std::size_t>(M * k));
  for (auto& r : inv) {
    if (with_eft && rng.integer(0, 3) == 0) {
      const i32 skipped[] = {static_cast<i32>(valid), static_cast<i32>(R), kI32Max};
      r = skipped[rng.integer(0, 2)];
    } else {
      const Index hi = with_eft ? valid : R;
      if (hi == 0) {
        r = with_eft ? static_cast<i32>(valid) : 0;  // R == 0 only with M*k == 0 below
      } else {
        r = rng.integer(0, static_cast<int>(hi - 1));  // duplicates allowed
      }
    }
  }
  std::vector<float> permuted_f(static_cast<std::size_t>(R * H));
  for (Index r = 0; r < R; ++r) {
    for (Index c = 0; c < H; ++c) permuted_f[r * H + c] = moe::to_float(permuted[r * stride + c]);
  }
  const std::vector<double> want =
      naive_unpermute(permuted_f, H, w, M, k, inv, with_eft ? std::optional<i64>(valid) : std::nullopt);
  std::vector<T> out(static_cast<std::size_t>(M * H));
  poison(out);
  std::optional<HostView<const i64, 1>> eft_v;
  if (with_eft) eft_v = cview1(eft);
  const auto st = moe::cpu::moe_unpermute<T>(HostView<const T, 2>(permuted.data(), {R, H}, {stride, 1}),
                                             cview2(w, M, k), cview1(inv), eft_v, view2(out, M, H));
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  EXPECT_TRUE(moe::testing::all_close(to_floats(out), want, tolerance_for<T>()));
}

template <class T>
void unpermute_random_sweep(std::uint64_t seed) {
  Random rng(seed);
  for (int i = 0; i < 60; ++i) {
    const Index M = std::vector<Index>{1, 2, 17, 64}[rng.integer(0, 3)];
    const Index k = rng.integer(1, 8);
    check_unpermute<T>(rng, M, k, rng.integer(1, 40), M * k + rng.integer(0, 64), i % 2 == 0);
  }
}

TEST(MoeUnpermute, RandomMatchesNaiveFloat) { unpermute_random_sweep<float>(201); }
TEST(MoeUnpermute, RandomMatchesNaiveBf16) { unpermute_random_sweep<bfloat16>(202); }
TEST(MoeUnpermute, RandomMatchesNaiveHalf) { unpermute_random_sweep<half>(203); }

TEST(MoeUnpermute, EmptyBatch) {
  Random rng(204);
  check_unpermute<float>(rng, 0, 2, 8, 0, false);
  check_unpermute<float>(rng, 0, 2, 8, 0, true);
  check_unpermute<float>(rng, 0, 4, 8, 48, true);  // aligned buffer of an empty batch
}

TEST(MoeUnpermute, RowStridedPermuted) {
  Random rng(205);
  check_unpermute<float>(rng, 13, 3, 6, 60, true, 5);
  check_unpermute<bfloat16>(rng, 13, 3, 6, 60, false, 5);
}

// Duplicate expert in one row: both slots contribute (0.25 + 0.5) * x; no lost update.
TEST(MoeUnpermute, DuplicateExpertInRow) {
  Random rng(206);
  const Index H = 16;
  const std::vector<float> x = rng.normal_vector<float>(H);
  const std::vector<float> hidden = x;  // M = 1
  const std::vector<i32> ids = {3, 3};
  MapSetup ms;
  ms.num_local = 8;
  for (Index A : {0, 4}) {
    const PermuteRef ref = naive_permute(ids, 1, 2, 8, ms, A, -1);
    std::vector<float> permuted;
    const PermuteRun run = run_permute<float>(hidden, 1, H, H, nullptr, 0, ids, 2, 8, ms, A, -1, ref.R, &permuted, kSentinel);
    ASSERT_TRUE(run.status.is_ok());
    EXPECT_NE(run.inv[0], run.inv[1]) << "the two slots of the duplicate must get distinct rows";
    const std::vector<float> w = {0.25f, 0.5f};
    std::vector<float> out(H);
    poison(out);
    const auto st = moe::cpu::moe_unpermute<float>(cview2(permuted, ref.R, H), cview2(w, 1, 2), cview1(run.inv),
                                                   cview1(run.offsets), view2(out, 1, H));
    ASSERT_TRUE(st.is_ok()) << st.to_string();
    std::vector<double> want(H);
    for (Index c = 0; c < H; ++c) want[c] = 0.75 * x[c];
    EXPECT_TRUE(moe::testing::all_close(out, want, {1e-7, 1e-6}));
  }
}

// permute then unpermute: out[m] = (sum of the weights of m's local slots) * hidden[m], the
// non-local slots skipped through expert_first_token_offset; a token routed only to other ranks
// gets exactly 0 even though its output row held garbage.
TEST(MoeUnpermute, RoundTripAfterPermute) {
  Random rng(207);
  for (MapKind mk : {MapKind::kNone, MapKind::kLinear, MapKind::kRoundRobin, MapKind::kRandom, MapKind::kAllRemote}) {
    for (Index A : {0, 16}) {
      SCOPED_TRACE(::testing::Message() << "map=" << map_kind_name(mk) << " align=" << A);
      const Index M = 50, k = 4, E = 32, H = 12;
      const MapSetup ms = make_map(rng, mk, E);
      std::vector<i32> ids = make_ids(rng, M, k, E, IdKind::kWithInvalid);
      for (Index j = 0; j < k; ++j) ids[j] = -1;  // token 0: routed nowhere
      const std::vector<float> hidden = rng.normal_vector<float>(M * H);
      const std::vector<float> w = rng.uniform_vector<float>(M * k, 0.0f, 1.0f);
      const Index R = moe::cpu::moe_permute_rows(M, k, ms.num_local, A);
      std::vector<float> permuted;
      const PermuteRun run = run_permute<float>(hidden, M, H, H, nullptr, 0, ids, k, E, ms, A, -1, R, &permuted, kSentinel);
      ASSERT_TRUE(run.status.is_ok()) << run.status.to_string();
      std::vector<float> out(M * H);
      poison(out);
      const auto st = moe::cpu::moe_unpermute<float>(cview2(permuted, R, H), cview2(w, M, k), cview1(run.inv),
                                                     cview1(run.offsets), view2(out, M, H));
      ASSERT_TRUE(st.is_ok()) << st.to_string();
      std::vector<double> want(M * H, 0.0);
      for (Index m = 0; m < M; ++m) {
        double wsum = 0;
        for (Index j = 0; j < k; ++j) {
          if (naive_local(ids[m * k + j], E, ms) >= 0) wsum += w[m * k + j];
        }
        for (Index c = 0; c < H; ++c) want[m * H + c] = wsum * hidden[m * H + c];
      }
      EXPECT_TRUE(moe::testing::all_close(out, want, {1e-6, 1e-5}));
      for (Index c = 0; c < H; ++c) EXPECT_EQ(std::bit_cast<std::uint32_t>(out[c]), 0u) << "token 0 must be +0";
    }
  }
}


}  // namespace
