// Shared by the CUDA standalone-op tests (testing/cuda/*_ops_test.cu, one binary): the CUDA ops
// (moe/cuda/ops.cuh) against the CPU ops (moe/cpu/ops.h, the spec), on the same seeded inputs.
//
// Comparisons, and why:
//  * Index outputs (topk ids, offsets, inv_permuted_idx, permuted_idx, m_indices, sorted token
//    ids, expert ids, num_tokens_post_padded, physical ids, expert loads) are compared exactly,
//    every element.
//  * moe_permute's float outputs (permuted hidden states and scales) are copies: bitwise.
//  * moe_unpermute and moe_fused_mul_sum: bitwise. Both backends accumulate in float in ascending
//    j, one rounding per multiply and per add, then round once to T. The device uses
//    __fmul_rn/__fadd_rn (never an FMA); this test's host code, hence the CPU op, is compiled with
//    -ffp-contract=off (BUILD.bazel), so the CPU does the same.
//  * select_experts' weights: moe::testing::all_close with atol 1e-6 and rtol 1e-5 (relative to
//    the largest weight). The device's expf is within 2 ulp and glibc's exp within 1; the rest of
//    the routing arithmetic is the same operations in the same order, so the weights differ by a
//    few ulp (~1e-7 relative) at most. The ids are exact: the logits are gapped (distinct by at
//    least min(0.05, 6/E), within the sigmoid's unsaturated range), so no selection is a near-tie.
// Each case runs the CUDA op twice: outputs poisoned 0xFF then 0x5A (an unwritten element
// differs from the CPU, and between the runs), workspace poisoned 0xD5 then 0x2A, and the second
// run's workspace misaligned by 3 bytes. Where both runs are compared exactly (or bitwise) with
// the CPU they are bitwise identical to each other; select_experts' weights are compared between
// the runs bitwise.
//
// Ops run on a non-blocking stream; uploads and poisoning (legacy default stream) are followed
// by cudaDeviceSynchronize, results are read after cudaStreamSynchronize.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moe/cpu/ops.h"
#include "moe/cuda/ops.cuh"
#include "moe/expert_map.h"
#include "testing/lib/compare.h"
#include "testing/lib/gpu.h"
#include "testing/lib/random.h"

namespace {

using moe::bfloat16;
using moe::DeviceView;
using moe::half;
using moe::HostView;
using moe::Index;
using moe::Status;
using moe::StatusCode;
using moe::testing::DeviceBuffer;
using moe::testing::Random;
using i32 = std::int32_t;
using i64 = std::int64_t;

constexpr i32 kI32Max = std::numeric_limits<i32>::max();
constexpr i32 kI32Min = std::numeric_limits<i32>::min();
constexpr unsigned char kWorkspacePoison[2] = {0xD5, 0x2A};
constexpr unsigned char kOutputPoison[2] = {0xFF, 0x5A};
constexpr unsigned char kUntouched = 0x77;  // outputs of rejected calls
constexpr moe::testing::Tolerance kSelectTolerance{1e-6, 1e-5};

void device_sync() { moe::testing::cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }
void stream_sync(cudaStream_t s) { moe::testing::cuda_ok(cudaStreamSynchronize(s), "cudaStreamSynchronize"); }

}  // namespace

// One fixture type for every translation unit of the binary (gtest requires a suite's tests to
// share it), so it lives outside the anonymous namespace.
namespace moe::testing {
class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    MOE_SKIP_WITHOUT_GPU();
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), cudaSuccess);
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  cudaStream_t stream_ = nullptr;
};
}  // namespace moe::testing

namespace {
using moe::testing::CudaOps;

// ---------------------------------------------------------------------------------------------
// Views and buffers.

template <class T>
HostView<const T, 2> hin(const std::vector<T>& v, Index r, Index c, Index ld = -1) {
  return HostView<const T, 2>(v.data(), {r, c}, {ld < 0 ? c : ld, 1});
}
template <class T>
HostView<T, 2> hout(std::vector<T>& v, Index r, Index c) {
  return HostView<T, 2>(v.data(), {r, c});
}
template <class T>
HostView<const T, 1> hin1(const std::vector<T>& v, Index n = -1) {
  return HostView<const T, 1>(v.data(), {n < 0 ? static_cast<Index>(v.size()) : n});
}
template <class T>
HostView<T, 1> hout1(std::vector<T>& v, Index n = -1) {
  return HostView<T, 1>(v.data(), {n < 0 ? static_cast<Index>(v.size()) : n});
}
template <class T>
DeviceView<const T, 2> din(const DeviceBuffer<T>& b, Index r, Index c, Index ld = -1) {
  return DeviceView<const T, 2>(b.data(), {r, c}, {ld < 0 ? c : ld, 1});
}
template <class T>
DeviceView<T, 2> dout(const DeviceBuffer<T>& b, Index r, Index c) {
  return DeviceView<T, 2>(b.data(), {r, c});
}
template <class T>
DeviceView<const T, 1> din1(const DeviceBuffer<T>& b, Index n = -1) {
  return DeviceView<const T, 1>(b.data(), {n < 0 ? static_cast<Index>(b.size()) : n});
}
template <class T>
DeviceView<T, 1> dout1(const DeviceBuffer<T>& b, Index n = -1) {
  return DeviceView<T, 1>(b.data(), {n < 0 ? static_cast<Index>(b.size()) : n});
}
template <class T>
DeviceBuffer<T> dbuf(Index n) {
  return DeviceBuffer<T>(static_cast<std::size_t>(n));
}

// A workspace of exactly `need` bytes: aligned in run 0, misaligned by 3 bytes in run 1.
struct Workspace {
  std::size_t need;
  DeviceBuffer<std::byte> buf;
  explicit Workspace(std::size_t n) : need(n), buf(n + 8) {}
  void poison(int run) { buf.fill_bytes(kWorkspacePoison[run]); }
  std::span<std::byte> span(int run) const {
    if (need == 0) return {};
    return std::span<std::byte>(buf.data() + (run ? 3 : 0), need);
  }
};

template <class T>
::testing::AssertionResult Untouched(const DeviceBuffer<T>& b, unsigned char byte = kUntouched) {
  device_sync();
  const std::vector<T> h = b.download();
  const auto* p = reinterpret_cast<const unsigned char*>(h.data());
  for (std::size_t i = 0; i < h.size() * sizeof(T); ++i) {
    if (p[i] != byte) return ::testing::AssertionFailure() << "byte " << i << " was written";
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// Comparisons.

using moe::testing::BitwiseEqual;
using moe::testing::ExactlyEqual;

// The CUDA op rejected the call exactly as the CPU op did: kInvalidArgument, the same message,
// naming `name`.
::testing::AssertionResult SameRejection(const Status& gpu, const Status& cpu, std::string_view name) {
  if (gpu.code() != StatusCode::kInvalidArgument) {
    return ::testing::AssertionFailure() << "expected kInvalidArgument naming '" << name << "', got " << gpu.to_string();
  }
  if (gpu.message().find(name) == std::string::npos) {
    return ::testing::AssertionFailure() << "message does not name '" << name << "': " << gpu.message();
  }
  if (cpu.code() != gpu.code() || cpu.message() != gpu.message()) {
    return ::testing::AssertionFailure() << "differs from the CPU op\n  CUDA: " << gpu.to_string()
                                         << "\n  CPU:  " << cpu.to_string();
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// Inputs.

// Ids in [0, E), and with `with_invalid` about one in five of every invalid kind the ops drop.
std::vector<i32> random_ids(Random& rng, Index M, Index k, Index E, bool with_invalid) {
  std::vector<i32> v(static_cast<std::size_t>(M * k));
  const i32 bad[] = {-1, static_cast<i32>(E), static_cast<i32>(E + 1), kI32Max, kI32Min, -2};
  for (auto& x : v) {
    x = (with_invalid && rng.integer(0, 4) == 0) ? bad[rng.integer(0, 5)] : rng.integer(0, static_cast<int>(E - 1));
  }
  return v;
}

struct MapSetup {
  Index num_local = 0;
  bool has_map = false;
  std::vector<i32> map;
};

MapSetup ep_map(int ep_size, int ep_rank, Index E, moe::ExpertPlacement placement) {
  MapSetup s;
  moe::ExpertMap em;
  const Status st = moe::determine_expert_map(ep_size, ep_rank, E, placement, &em);
  EXPECT_TRUE(st.is_ok()) << st.to_string();
  s.num_local = em.num_local_experts;
  s.map = em.map;
  s.has_map = !em.map.empty();
  return s;
}

struct Ep {
  int size;
  moe::ExpertPlacement placement;
};
constexpr Ep kEps[] = {{1, moe::ExpertPlacement::kLinear},
                       {4, moe::ExpertPlacement::kLinear},
                       {3, moe::ExpertPlacement::kRoundRobin}};
constexpr Index kTokenCounts[] = {0, 1, 7, 64, 1000, 65536};

}  // namespace
