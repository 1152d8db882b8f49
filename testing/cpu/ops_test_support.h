// Shared by the tests of the standalone CPU ops in moe/cpu/ops.h (testing/cpu/*_ops_test.cc, one
// binary): buffers poisoned with a sentinel, seeded inputs, and the naive definitions.
//
// Every op is checked against a naive definition written here from the documented semantics
// (the comments of moe/cpu/ops.h and vLLM, ../shared/reference/vllm-semantics.md sections 5-7):
// plain loops, double precision for the arithmetic ops, exact equality for every index output.
// Bad inputs must return kInvalidArgument naming the argument and leave every output
// bit-identical to the sentinel it was filled with.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "moe/cpu/ops.h"
#include "moe/expert_map.h"
#include "testing/lib/compare.h"
#include "testing/lib/random.h"


namespace moe::testing::cpu_ops {

using moe::bfloat16;
using moe::half;
using moe::HostView;
using moe::Index;
using moe::StatusCode;
using moe::cpu::ReplicaChoice;
using moe::testing::Random;
using moe::testing::Tolerance;
using i32 = std::int32_t;
using i64 = std::int64_t;

constexpr i32 kI32Max = std::numeric_limits<i32>::max();
constexpr i32 kI32Min = std::numeric_limits<i32>::min();

// ---------------------------------------------------------------------------------------------
// Helpers.

constexpr unsigned char kSentinel = 0x5A;  // 0x5A5A5A5A in every 32-bit word
constexpr std::size_t kSlack = 64;         // spare elements so over-long wrong-shape views stay in bounds

template <class T>
void poison(std::vector<T>& v, unsigned char byte = kSentinel) {
  if (!v.empty()) std::memset(static_cast<void*>(v.data()), byte, v.size() * sizeof(T));
}
template <class T>
bool is_poisoned(const std::vector<T>& v, unsigned char byte = kSentinel) {
  const auto* p = reinterpret_cast<const unsigned char*>(v.data());
  for (std::size_t i = 0; i < v.size() * sizeof(T); ++i) {
    if (p[i] != byte) return false;
  }
  return true;
}

// A caller-allocated output buffer with slack, filled with the sentinel.
template <class T>
struct Buf {
  std::vector<T> v;
  explicit Buf(std::size_t n) : v(n + kSlack) { poison(v); }
  T* data() { return v.data(); }
  bool untouched() const { return is_poisoned(v); }
};

template <class T>
HostView<T, 1> view1(std::vector<T>& v) { return HostView<T, 1>(v.data(), {static_cast<Index>(v.size())}); }
template <class T>
HostView<const T, 1> cview1(const std::vector<T>& v) { return HostView<const T, 1>(v.data(), {static_cast<Index>(v.size())}); }
template <class T>
HostView<T, 2> view2(std::vector<T>& v, Index a, Index b) { return HostView<T, 2>(v.data(), {a, b}); }
template <class T>
HostView<const T, 2> cview2(const std::vector<T>& v, Index a, Index b) { return HostView<const T, 2>(v.data(), {a, b}); }

inline ::testing::AssertionResult IsInvalidArgument(const moe::Status& s, std::string_view name) {
  if (s.code() != StatusCode::kInvalidArgument) {
    return ::testing::AssertionFailure() << "expected kInvalidArgument naming '" << name << "', got " << s.to_string();
  }
  if (s.message().find(name) == std::string::npos) {
    return ::testing::AssertionFailure() << "message does not name '" << name << "': " << s.message();
  }
  return ::testing::AssertionSuccess();
}

using moe::testing::BitwiseEqual;
using moe::testing::ExactlyEqual;

template <class T>
std::vector<float> to_floats(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = moe::to_float(v[i]);
  return out;
}

template <class T>
Tolerance tolerance_for() {
  if constexpr (std::is_same_v<T, float>) return {1e-6, 1e-5};
  if constexpr (std::is_same_v<T, half>) return {1e-6, 2e-3};  // one rounding to 11 bits
  return {1e-6, 1.6e-2};                                          // bf16: one rounding to 8 bits
}

// Invalid ids of every kind the ops must drop: -1 (EP/CUDA-graph padding), == E (off by one),
// stale huge ids and the int32 extremes.
inline i32 random_invalid_id(Random& rng, Index E) {
  const i32 choices[] = {-1, static_cast<i32>(E), static_cast<i32>(E + 1), 123456789, kI32Max, kI32Min, -2};
  return choices[rng.integer(0, 6)];
}

enum class IdKind { kDistinct, kWithDuplicates, kWithInvalid, kOneExpert };

inline std::vector<i32> make_ids(Random& rng, Index M, Index k, Index E, IdKind kind) {
  std::vector<i32> ids;
  switch (kind) {
    case IdKind::kDistinct:
      ids = rng.distinct_ids(static_cast<std::size_t>(M), static_cast<int>(E), static_cast<int>(k));
      break;
    case IdKind::kWithDuplicates:
      ids.resize(static_cast<std::size_t>(M * k));
      for (auto& x : ids) x = rng.integer(0, static_cast<int>(E - 1));
      break;
    case IdKind::kWithInvalid:
      ids.resize(static_cast<std::size_t>(M * k));
      for (auto& x : ids) x = rng.integer(0, 4) == 0 ? random_invalid_id(rng, E) : rng.integer(0, static_cast<int>(E - 1));
      break;
    case IdKind::kOneExpert: {
      const i32 e = rng.integer(0, static_cast<int>(E - 1));
      ids.assign(static_cast<std::size_t>(M * k), e);
      break;
    }
  }
  return ids;
}

// Expert maps for the ops under test. Linear and round-robin maps come from determine_expert_map
// (tested on its own in expert_map_test.cc); random maps are written here: a random subset of
// global experts gets a random permutation of local ids, so local order differs from global order.
enum class MapKind { kNone, kLinear, kRoundRobin, kRandom, kAllRemote };

struct MapSetup {
  Index num_local = 0;
  bool has_map = false;
  std::vector<i32> map;
};

inline MapSetup make_map(Random& rng, MapKind kind, Index E) {
  MapSetup s;
  switch (kind) {
    case MapKind::kNone:
      s.num_local = E;
      break;
    case MapKind::kLinear:
    case MapKind::kRoundRobin: {
      const int P = static_cast<int>(std::min<Index>(E, rng.integer(2, 9)));
      if (P < 2) {  // E == 1: a single rank
        s.num_local = E;
        break;
      }
      moe::ExpertMap em;
      const auto st = moe::determine_expert_map(P, rng.integer(0, P - 1), E,
                                                kind == MapKind::kLinear ? moe::ExpertPlacement::kLinear
                                                                         : moe::ExpertPlacement::kRoundRobin,
                                                &em);
      EXPECT_TRUE(st.is_ok()) << st.to_string();
      s.num_local = em.num_local_experts;
      s.map = em.map;
      s.has_map = true;
      break;
    }
    case MapKind::kRandom: {
      s.num_local = rng.integer(1, static_cast<int>(E));
      const Index mapped = rng.integer(0, 2) == 0 ? rng.integer(0, static_cast<int>(s.num_local)) : s.num_local;
      std::vector<i32> globals(static_cast<std::size_t>(E)), locals(static_cast<std::size_t>(s.num_local));
      std::iota(globals.begin(), globals.end(), 0);
      std::iota(locals.begin(), locals.end(), 0);
      std::shuffle(globals.begin(), globals.end(), rng.engine());
      std::shuffle(locals.begin(), locals.end(), rng.engine());
      s.map.assign(static_cast<std::size_t>(E), -1);
      for (Index i = 0; i < mapped; ++i) s.map[globals[i]] = locals[i];
      s.has_map = true;
      break;
    }
    case MapKind::kAllRemote:  // this rank owns nothing that is routed to
      s.num_local = 1;
      s.map.assign(static_cast<std::size_t>(E), -1);
      s.has_map = true;
      break;
  }
  return s;
}

inline const char* map_kind_name(MapKind k) {
  switch (k) {
    case MapKind::kNone: return "none";
    case MapKind::kLinear: return "linear";
    case MapKind::kRoundRobin: return "round_robin";
    case MapKind::kRandom: return "random";
    case MapKind::kAllRemote: return "all_remote";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------
// Naive definitions.

// Local expert of slot s's id, or -1 (not routed to this rank / invalid).
inline i64 naive_local(i32 id, Index E, const MapSetup& ms) {
  if (id < 0 || static_cast<Index>(id) >= E) return -1;
  return ms.has_map ? ms.map[static_cast<std::size_t>(id)] : id;
}

struct PermuteRef {
  Index R = 0;
  std::vector<i64> offsets;  // [E_local + 1]
  std::vector<i32> inv;      // [M*k]
  std::vector<i32> pidx;     // [R]
  std::vector<i32> m_idx;    // [R]
  std::vector<Index> src;    // [R]: token whose hidden row lands there, -1 for zero rows
};

// From the header: local slots grouped by local expert in ascending slot order, each segment
// starting at a multiple of A (A > 0) and padded to one; unaligned, the non-local slots follow,
// by global id then the out-of-range ids, each in ascending slot order; aligned, they all point
// at the aligned total. Rows without a local slot: zero hidden, permuted_idx = M*k, m_indices =
// fill (padding inside an expert's segment: that expert).
inline PermuteRef naive_permute(const std::vector<i32>& ids, Index M, Index k, Index E, const MapSetup& ms, Index A,
                         i32 fill) {
  PermuteRef r;
  const Index slots = M * k, El = ms.num_local;
  r.R = A > 0 ? (slots + El * (A - 1) + A - 1) / A * A : slots;
  r.offsets.assign(static_cast<std::size_t>(El + 1), -1);
  r.inv.assign(static_cast<std::size_t>(slots), -1);
  r.pidx.assign(static_cast<std::size_t>(r.R), static_cast<i32>(slots));
  r.m_idx.assign(static_cast<std::size_t>(r.R), fill);
  r.src.assign(static_cast<std::size_t>(r.R), -1);
  Index row = 0;
  for (Index e = 0; e < El; ++e) {
    r.offsets[e] = row;
    for (Index s = 0; s < slots; ++s) {
      if (naive_local(ids[s], E, ms) != e) continue;
      r.inv.at(s) = static_cast<i32>(row);
      r.pidx.at(row) = static_cast<i32>(s);
      r.m_idx.at(row) = static_cast<i32>(e);
      r.src.at(row) = s / k;
      ++row;
    }
    if (A > 0) {
      while (row % A != 0) r.m_idx.at(row++) = static_cast<i32>(e);
    }
  }
  r.offsets[El] = row;
  if (A > 0) {
    for (Index s = 0; s < slots; ++s) {
      if (naive_local(ids[s], E, ms) < 0) r.inv[s] = static_cast<i32>(row);
    }
  } else {
    for (Index g = 0; g < E; ++g) {
      for (Index s = 0; s < slots; ++s) {
        if (ids[s] == g && naive_local(ids[s], E, ms) < 0) r.inv[s] = static_cast<i32>(row++);
      }
    }
    for (Index s = 0; s < slots; ++s) {
      if (ids[s] < 0 || ids[s] >= E) r.inv[s] = static_cast<i32>(row++);
    }
    EXPECT_EQ(row, slots);
  }
  return r;
}

// out[m] = sum_j w[m,j] * permuted[inv[m*k+j]] in double; with `valid`, rows >= valid skipped.
inline std::vector<double> naive_unpermute(const std::vector<float>& permuted, Index H, const std::vector<float>& w, Index M,
                                    Index k, const std::vector<i32>& inv, std::optional<i64> valid) {
  std::vector<double> out(static_cast<std::size_t>(M * H), 0.0);
  for (Index m = 0; m < M; ++m) {
    for (Index j = 0; j < k; ++j) {
      const i64 r = inv[m * k + j];
      if (valid && r >= *valid) continue;
      for (Index c = 0; c < H; ++c) out[m * H + c] += static_cast<double>(w[m * k + j]) * permuted[r * H + c];
    }
  }
  return out;
}

struct AlignRef {
  std::vector<i32> sorted;
  std::vector<i32> expert_ids;
  i32 total = 0;
};

// From the header: buffer length numel + E*(B-1) (rounded up to B when pad_sorted_ids; at most
// numel*B when numel < E); slots bucketed by global expert (ids outside [0, E) dropped; labels
// expert_map[e]) or, with ignore_invalid_experts, by local expert (non-local slots dropped;
// labels are local ids); each bucket in ascending slot order, padded to a multiple of B with
// the sentinel M*k; unused blocks are -1.
inline AlignRef naive_align(const std::vector<i32>& ids, Index numel, Index E, Index B, const MapSetup& ms, bool pad,
                     bool ignore_invalid) {
  AlignRef r;
  Index n = numel + E * (B - 1);
  if (pad) n = (n + B - 1) / B * B;
  if (numel < E) n = std::min(n, numel * B);
  const Index blocks = (n + B - 1) / B;
  r.sorted.assign(static_cast<std::size_t>(n), static_cast<i32>(numel));
  r.expert_ids.assign(static_cast<std::size_t>(blocks), -1);
  auto bucket = [&](Index s) -> i64 {
    const i32 id = ids[s];
    if (id < 0 || id >= E) return -1;
    if (ignore_invalid) return ms.has_map ? ms.map[id] : id;
    return id;
  };
  Index pos = 0;
  for (Index e = 0; e < E; ++e) {
    const Index begin = pos;
    for (Index s = 0; s < numel; ++s) {
      if (bucket(s) == e) r.sorted.at(pos++) = static_cast<i32>(s);
    }
    while (pos % B != 0) ++pos;
    const i32 label = (!ignore_invalid && ms.has_map) ? ms.map[e] : static_cast<i32>(e);
    for (Index b = begin / B; b < pos / B; ++b) r.expert_ids.at(b) = label;
  }
  EXPECT_LE(pos, n);
  r.total = static_cast<i32>(pos);
  return r;
}

}  // namespace moe::testing::cpu_ops
