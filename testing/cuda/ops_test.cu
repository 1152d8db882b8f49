// The CUDA standalone ops (moe/cuda/ops.cuh) against the CPU ops (moe/cpu/ops.h, the spec), on
// the same seeded inputs, compiled into this one .cu.
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

// ---------------------------------------------------------------------------------------------
// select_experts

template <class Policy>
void check_select(cudaStream_t stream, Index M, Index E, int k, const typename Policy::Arguments& args, bool with_bias,
                  Index pad, std::uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << Policy::kName << " M=" << M << " E=" << E << " k=" << k << " bias=" << with_bias
                                    << " pad=" << pad);
  Random rng(seed);
  const Index ld = E + pad;
  const float gap = std::min(0.05f, 6.0f / static_cast<float>(E));
  const std::vector<float> gapped = rng.gapped_logits(static_cast<std::size_t>(M), static_cast<std::size_t>(E), gap);
  std::vector<float> logits(static_cast<std::size_t>(M * ld), 1e30f);  // padding: selected if ever read
  for (Index m = 0; m < M; ++m) {
    for (Index e = 0; e < E; ++e) logits[m * ld + e] = gapped[m * E + e];
  }
  const std::vector<float> bias = with_bias ? rng.uniform_vector<float>(static_cast<std::size_t>(E), -0.3f, 0.3f)
                                            : std::vector<float>{};
  std::vector<i32> ids(static_cast<std::size_t>(M * k), -7);
  std::vector<float> weights(static_cast<std::size_t>(M * k), -7.0f);
  std::optional<HostView<const float, 1>> h_bias;
  if (with_bias) h_bias = hin1(bias);
  const Status cpu = moe::cpu::select_experts<Policy>(hin(logits, M, E, ld), k, args, h_bias, hout(ids, M, k),
                                                      hout(weights, M, k));
  ASSERT_TRUE(cpu.is_ok()) << cpu.to_string();

  DeviceBuffer<float> d_logits(logits), d_bias(bias), d_weights = dbuf<float>(M * k);
  DeviceBuffer<i32> d_ids = dbuf<i32>(M * k);
  moe::cuda::OptDeviceView<const float, 1> dv_bias;
  if (with_bias) dv_bias = din1(d_bias);
  Workspace ws(moe::cuda::select_experts_workspace_bytes(M, E));
  std::vector<float> first_weights;
  for (int run = 0; run < 2; ++run) {
    ws.poison(run);
    d_ids.fill_bytes(kOutputPoison[run]);
    d_weights.fill_bytes(kOutputPoison[run]);
    device_sync();
    const Status s = moe::cuda::select_experts<Policy>(din(d_logits, M, E, ld), k, args, dv_bias, dout(d_ids, M, k),
                                                       dout(d_weights, M, k), ws.span(run), stream);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    stream_sync(stream);
    const std::vector<float> w = d_weights.download();
    EXPECT_TRUE(ExactlyEqual(d_ids.download(), ids)) << "run " << run;
    EXPECT_TRUE(moe::testing::all_close(w, weights, kSelectTolerance)) << "run " << run;
    if (run == 0) first_weights = w;
    else EXPECT_TRUE(BitwiseEqual(w, first_weights)) << "weights differ between runs";
  }
}

TEST_F(CudaOps, SelectExpertsSoftmaxMatchesCpu) {
  using P = moe::routing::SoftmaxTopK;
  const std::pair<Index, int> shapes[] = {{1, 1}, {8, 2}, {64, 8}, {512, 16}};
  std::uint64_t seed = 100;
  for (Index M : {0, 1, 7, 64, 1000}) {
    for (const auto& [E, k] : shapes) {
      for (bool renormalize : {false, true}) {
        check_select<P>(stream_, M, E, k, {renormalize, 1.0f}, false, M == 7 ? 5 : 0, seed++);
        if (HasFailure()) return;
      }
    }
  }
  check_select<P>(stream_, 65536, 8, 2, {true, 1.0f}, false, 0, seed++);
  check_select<P>(stream_, 65536, 64, 8, {false, 1.0f}, false, 3, seed++);
}

TEST_F(CudaOps, SelectExpertsSigmoidWithCorrectionBiasMatchesCpu) {
  using P = moe::routing::SigmoidTopK;
  std::uint64_t seed = 200;
  for (Index M : {0, 1, 7, 64, 1000}) {
    const std::pair<Index, int> shapes[] = {{16, 4}, {128, 8}, {512, 16}};
    for (const auto& [E, k] : shapes) {
      check_select<P>(stream_, M, E, k, {true, 2.5f}, true, M == 64 ? 2 : 0, seed++);
      check_select<P>(stream_, M, E, k, {false, 1.0f}, false, 0, seed++);
      if (HasFailure()) return;
    }
  }
}

TEST_F(CudaOps, SelectExpertsGroupedSigmoidMatchesCpu) {
  using P = moe::routing::GroupedTopK<moe::routing::Sigmoid>;
  std::uint64_t seed = 300;
  for (Index M : {1, 7, 64, 1000}) {
    check_select<P>(stream_, M, 64, 8, {8, 4, true, 2.5f}, true, 0, seed++);       // DeepSeek-V3-like
    check_select<P>(stream_, M, 256, 8, {8, 4, true, 2.5f}, true, 1, seed++);
    check_select<P>(stream_, M, 32, 4, {4, 2, false, 1.0f}, false, 0, seed++);     // group key = max
    check_select<P>(stream_, M, 512, 16, {16, 16, true, 1.0f}, true, 0, seed++);  // every group kept
    if (HasFailure()) return;
  }
}

TEST_F(CudaOps, SelectExpertsLlama4MatchesCpu) {
  std::uint64_t seed = 400;
  for (Index M : {0, 1, 7, 64, 1000, 65536}) {
    check_select<moe::routing::Llama4TopK>(stream_, M, 16, 1, {}, false, 0, seed++);
    if (HasFailure()) return;
  }
}

TEST_F(CudaOps, SelectExpertsRejectsBadInputs) {
  using Softmax = moe::routing::SoftmaxTopK;
  using Llama4 = moe::routing::Llama4TopK;
  using Grouped = moe::routing::GroupedTopK<moe::routing::Sigmoid>;
  const Index M = 4, E = 8;
  const int k = 2;
  Random rng(7);
  const std::vector<float> logits = rng.gapped_logits(M, E);
  const std::vector<float> bias(E, 0.1f);
  std::vector<i32> h_ids(64);
  std::vector<float> h_w(64);
  DeviceBuffer<float> d_logits(logits), d_bias(bias), d_w = dbuf<float>(64);
  DeviceBuffer<i32> d_ids = dbuf<i32>(64);
  Workspace ws(moe::cuda::select_experts_workspace_bytes(M, E));
  d_ids.fill_bytes(kUntouched);
  d_w.fill_bytes(kUntouched);
  device_sync();
  auto rejected = [&](const Status& gpu, const Status& cpu, std::string_view name) {
    EXPECT_TRUE(SameRejection(gpu, cpu, name));
    EXPECT_TRUE(Untouched(d_ids));
    EXPECT_TRUE(Untouched(d_w));
  };
  {  // top_k > E
    const int bad = E + 1;
    rejected(moe::cuda::select_experts<Softmax>(din(d_logits, M, E), bad, {}, std::nullopt, dout(d_ids, M, bad),
                                                dout(d_w, M, bad), ws.span(0), stream_),
             moe::cpu::select_experts<Softmax>(hin(logits, M, E), bad, {}, std::nullopt, hout(h_ids, M, bad),
                                               hout(h_w, M, bad)),
             "top_k");
  }
  {  // topk_ids with the wrong number of rows
    rejected(moe::cuda::select_experts<Softmax>(din(d_logits, M, E), k, {}, std::nullopt, dout(d_ids, M - 1, k),
                                                dout(d_w, M, k), ws.span(0), stream_),
             moe::cpu::select_experts<Softmax>(hin(logits, M, E), k, {}, std::nullopt, hout(h_ids, M - 1, k),
                                               hout(h_w, M, k)),
             "topk_ids");
  }
  {  // topk_weights with the wrong number of columns
    rejected(moe::cuda::select_experts<Softmax>(din(d_logits, M, E), k, {}, std::nullopt, dout(d_ids, M, k),
                                                dout(d_w, M, k + 1), ws.span(0), stream_),
             moe::cpu::select_experts<Softmax>(hin(logits, M, E), k, {}, std::nullopt, hout(h_ids, M, k),
                                               hout(h_w, M, k + 1)),
             "topk_weights");
  }
  {  // a correction bias for a policy that has none
    rejected(moe::cuda::select_experts<Llama4>(din(d_logits, M, E), 1, {}, din1(d_bias), dout(d_ids, M, 1),
                                               dout(d_w, M, 1), ws.span(0), stream_),
             moe::cpu::select_experts<Llama4>(hin(logits, M, E), 1, {}, hin1(bias), hout(h_ids, M, 1), hout(h_w, M, 1)),
             "correction_bias");
  }
  {  // correction bias of the wrong length
    rejected(moe::cuda::select_experts<Softmax>(din(d_logits, M, E), k, {}, din1(d_bias, E - 1), dout(d_ids, M, k),
                                                dout(d_w, M, k), ws.span(0), stream_),
             moe::cpu::select_experts<Softmax>(hin(logits, M, E), k, {}, hin1(bias, E - 1), hout(h_ids, M, k),
                                               hout(h_w, M, k)),
             "correction_bias");
  }
  {  // a group count that does not divide E
    const Grouped::Arguments a{3, 1, false, 1.0f};
    rejected(moe::cuda::select_experts<Grouped>(din(d_logits, M, E), k, a, std::nullopt, dout(d_ids, M, k),
                                                dout(d_w, M, k), ws.span(0), stream_),
             moe::cpu::select_experts<Grouped>(hin(logits, M, E), k, a, std::nullopt, hout(h_ids, M, k), hout(h_w, M, k)),
             "routing.num_expert_group");
  }
  {  // null logits
    rejected(moe::cuda::select_experts<Softmax>(DeviceView<const float, 2>(nullptr, {M, E}), k, {}, std::nullopt,
                                                dout(d_ids, M, k), dout(d_w, M, k), ws.span(0), stream_),
             moe::cpu::select_experts<Softmax>(HostView<const float, 2>(nullptr, {M, E}), k, {}, std::nullopt,
                                               hout(h_ids, M, k), hout(h_w, M, k)),
             "router_logits");
  }
  {  // workspace one byte short
    const Status s = moe::cuda::select_experts<Softmax>(din(d_logits, M, E), k, {}, std::nullopt, dout(d_ids, M, k),
                                                        dout(d_w, M, k), ws.span(0).first(ws.need - 1), stream_);
    EXPECT_EQ(s.code(), StatusCode::kWorkspaceTooSmall) << s.to_string();
    EXPECT_NE(s.message().find("workspace"), std::string::npos) << s.message();
    EXPECT_TRUE(Untouched(d_ids));
    EXPECT_TRUE(Untouched(d_w));
  }
}

// ---------------------------------------------------------------------------------------------
// moe_permute

struct PermuteCase {
  Index M;
  int k;
  Index E;
  int ep_size;
  int ep_rank;
  moe::ExpertPlacement placement;
  Index A;
  bool invalid_ids;
  bool scales;
  bool m_indices;
  i32 fill;
  Index H;
  Index pad;
  bool checked;
};

std::string describe(const PermuteCase& c) {
  std::ostringstream os;
  os << "M=" << c.M << " k=" << c.k << " E=" << c.E << " ep=" << c.ep_size << "/" << c.ep_rank
     << (c.placement == moe::ExpertPlacement::kLinear ? " linear" : " round_robin") << " A=" << c.A
     << " invalid=" << c.invalid_ids << " scales=" << c.scales << " m_indices=" << c.m_indices << " fill=" << c.fill
     << " H=" << c.H << " pad=" << c.pad << " checked=" << c.checked;
  return os.str();
}

std::vector<PermuteCase> permute_cases() {
  std::vector<PermuteCase> cases;
  const Index Es[] = {8, 64, 512, 13};
  const int ks[] = {1, 2, 8, 16};
  int i = 0;
  for (Index M : kTokenCounts) {
    for (const Ep& ep : kEps) {
      for (Index A : {0, 16, 128}) {
        const bool big = M >= 65536;
        PermuteCase c{};
        c.M = M;
        c.E = big ? 256 : Es[i % 4];
        c.k = big ? 4 : ks[(i / 4) % 4];
        c.ep_size = ep.size;
        c.ep_rank = i % ep.size;
        c.placement = ep.placement;
        c.A = A;
        c.invalid_ids = i % 2 == 0;
        c.scales = (i / 2) % 2 == 0;
        c.m_indices = i % 3 != 0;
        c.fill = i % 2 ? -1 : 7;
        c.H = M >= 1000 ? 8 : 40;
        c.pad = i % 4 == 1 ? 3 : 0;
        c.checked = i % 5 == 0;
        cases.push_back(c);
        ++i;
      }
    }
  }
  // A single expert; every slot on one expert.
  cases.push_back({64, 2, 1, 1, 0, moe::ExpertPlacement::kLinear, 0, true, true, true, -1, 16, 0, true});
  cases.push_back({64, 2, 1, 1, 0, moe::ExpertPlacement::kLinear, 16, false, true, true, 3, 16, 0, false});
  return cases;
}

template <class T>
void check_permute(cudaStream_t stream, const PermuteCase& c, std::uint64_t seed) {
  SCOPED_TRACE(describe(c));
  Random rng(seed);
  const Index M = c.M, k = c.k, H = c.H, ld = c.H + c.pad, S = 3;
  const MapSetup ms = ep_map(c.ep_size, c.ep_rank, c.E, c.placement);
  const Index El = ms.num_local;
  const Index R = moe::cpu::moe_permute_rows(M, c.k, El, c.A);
  ASSERT_EQ(R, moe::cuda::moe_permute_rows(M, c.k, El, c.A));
  const std::vector<T> hidden = rng.normal_vector<T>(static_cast<std::size_t>(M * ld));
  const std::vector<float> scales = rng.uniform_vector<float>(static_cast<std::size_t>(M * S), 0.5f, 2.0f);
  std::vector<i32> ids = random_ids(rng, M, k, c.E, c.invalid_ids);
  if (c.E == 1 && !ids.empty()) ids[0] = 0;

  // CPU reference.
  std::vector<T> ph(static_cast<std::size_t>(R * H));
  std::vector<float> psc(static_cast<std::size_t>(R * S));
  std::vector<i64> eft(static_cast<std::size_t>(El + 1));
  std::vector<i32> inv(static_cast<std::size_t>(M * k)), pidx(static_cast<std::size_t>(R)), midx(static_cast<std::size_t>(R));
  moe::cpu::PermuteOutputs<T> h_out{hout(ph, R, H), std::nullopt, hout1(eft), hout1(inv), hout1(pidx), std::nullopt};
  if (c.m_indices) h_out.m_indices = hout1(midx);
  std::optional<HostView<const float, 2>> h_scales;
  if (c.scales) {
    h_scales = hin(scales, M, S);
    h_out.permuted_scales = hout(psc, R, S);
  }
  std::optional<HostView<const i32, 1>> h_map;
  if (ms.has_map) h_map = hin1(ms.map);
  const Status cpu = moe::cpu::moe_permute<T>(hin(hidden, M, H, ld), h_scales, hin(ids, M, k), c.E, El, h_map, c.A,
                                              c.fill, h_out);
  ASSERT_TRUE(cpu.is_ok()) << cpu.to_string();

  // CUDA.
  DeviceBuffer<T> d_hidden(hidden), d_ph = dbuf<T>(R * H);
  DeviceBuffer<float> d_scales(scales), d_psc = dbuf<float>(R * S);
  DeviceBuffer<i32> d_ids(ids), d_map(ms.map), d_inv = dbuf<i32>(M * k), d_pidx = dbuf<i32>(R), d_midx = dbuf<i32>(R);
  DeviceBuffer<i64> d_eft = dbuf<i64>(El + 1);
  moe::cuda::PermuteOutputs<T> d_out{dout(d_ph, R, H), std::nullopt, dout1(d_eft), dout1(d_inv), dout1(d_pidx), std::nullopt};
  if (c.m_indices) d_out.m_indices = dout1(d_midx);
  moe::cuda::OptDeviceView<const float, 2> dv_scales;
  if (c.scales) {
    dv_scales = din(d_scales, M, S);
    d_out.permuted_scales = dout(d_psc, R, S);
  }
  moe::cuda::OptDeviceView<const i32, 1> dv_map;
  if (ms.has_map) dv_map = din1(d_map);
  Workspace ws(moe::cuda::moe_permute_workspace_bytes(M, c.k, c.E, El, c.A));
  for (int run = 0; run < 2; ++run) {
    ws.poison(run);
    d_ph.fill_bytes(kOutputPoison[run]);
    d_psc.fill_bytes(kOutputPoison[run]);
    d_inv.fill_bytes(kOutputPoison[run]);
    d_pidx.fill_bytes(kOutputPoison[run]);
    d_midx.fill_bytes(kOutputPoison[run]);
    d_eft.fill_bytes(kOutputPoison[run]);
    device_sync();
    const Status s = moe::cuda::moe_permute<T>(din(d_hidden, M, H, ld), dv_scales, din(d_ids, M, k), c.E, El, dv_map,
                                               c.A, c.fill, d_out, ws.span(run), stream, c.checked);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    stream_sync(stream);
    EXPECT_TRUE(ExactlyEqual(d_eft.download(), eft)) << "expert_first_token_offset, run " << run;
    EXPECT_TRUE(ExactlyEqual(d_inv.download(), inv)) << "inv_permuted_idx, run " << run;
    EXPECT_TRUE(ExactlyEqual(d_pidx.download(), pidx)) << "permuted_idx, run " << run;
    if (c.m_indices) EXPECT_TRUE(ExactlyEqual(d_midx.download(), midx)) << "m_indices, run " << run;
    EXPECT_TRUE(BitwiseEqual(d_ph.download(), ph)) << "permuted_hidden_states, run " << run;
    if (c.scales) EXPECT_TRUE(BitwiseEqual(d_psc.download(), psc)) << "permuted_scales, run " << run;
  }
}

TEST_F(CudaOps, PermuteMatchesCpuBf16) {
  std::uint64_t seed = 1000;
  for (const PermuteCase& c : permute_cases()) {
    check_permute<bfloat16>(stream_, c, seed++);
    if (HasFailure()) return;
  }
}

TEST_F(CudaOps, PermuteMatchesCpuF32) {
  std::uint64_t seed = 2000;
  for (const PermuteCase& c : permute_cases()) {
    check_permute<float>(stream_, c, seed++);
    if (HasFailure()) return;
  }
}

TEST_F(CudaOps, PermuteRejectsBadInputs) {
  const Index M = 16, k = 2, E = 8, H = 8, S = 2, kBig = 4096;
  Random rng(11);
  const std::vector<float> hidden = rng.normal_vector<float>(M * H), scales = rng.normal_vector<float>(M * S);
  const std::vector<i32> ids = random_ids(rng, M, k, E, false);
  std::vector<float> h_ph(kBig * H), h_psc(kBig * S);
  std::vector<i64> h_eft(kBig);
  std::vector<i32> h_inv(kBig), h_pidx(kBig), h_midx(kBig);
  DeviceBuffer<float> d_hidden(hidden), d_scales(scales), d_ph = dbuf<float>(kBig * H), d_psc = dbuf<float>(kBig * S);
  DeviceBuffer<i64> d_eft = dbuf<i64>(kBig);
  DeviceBuffer<i32> d_ids(ids), d_map = dbuf<i32>(E), d_inv = dbuf<i32>(kBig), d_pidx = dbuf<i32>(kBig),
                    d_midx = dbuf<i32>(kBig);
  for (auto* b : {&d_inv, &d_pidx, &d_midx}) b->fill_bytes(kUntouched);
  d_ph.fill_bytes(kUntouched);
  d_psc.fill_bytes(kUntouched);
  d_eft.fill_bytes(kUntouched);
  device_sync();

  struct Cfg {
    Index El = 8;
    std::optional<std::vector<i32>> map;
    Index A = 0;
    Index ids_cols = 2;
    Index ph_rows = -1;   // -1: the right R
    Index eft_n = -1;     // -1: El + 1
    bool scales = false;
    bool permuted_scales = false;
    bool checked = true;
  };
  // Runs both ops; returns {CUDA, CPU}.
  auto run = [&](const Cfg& c) -> std::pair<Status, Status> {
    const Index R = moe::cpu::moe_permute_rows(M, static_cast<int>(k), c.El, c.A);
    const Index rows = c.ph_rows >= 0 ? c.ph_rows : R, eft_n = c.eft_n >= 0 ? c.eft_n : c.El + 1;
    Workspace ws(moe::cuda::moe_permute_workspace_bytes(M, static_cast<int>(k), E, c.El, std::max<Index>(c.A, 0)));
    moe::cpu::PermuteOutputs<float> h_out{hout(h_ph, rows, H), std::nullopt, hout1(h_eft, eft_n), hout1(h_inv, M * k),
                                          hout1(h_pidx, R), hout1(h_midx, R)};
    moe::cuda::PermuteOutputs<float> d_out{dout(d_ph, rows, H), std::nullopt, dout1(d_eft, eft_n), dout1(d_inv, M * k),
                                           dout1(d_pidx, R), dout1(d_midx, R)};
    std::optional<HostView<const float, 2>> h_scales;
    moe::cuda::OptDeviceView<const float, 2> dv_scales;
    if (c.scales) {
      h_scales = hin(scales, M, S);
      dv_scales = din(d_scales, M, S);
    }
    if (c.permuted_scales) {
      h_out.permuted_scales = hout(h_psc, R, S);
      d_out.permuted_scales = dout(d_psc, R, S);
    }
    std::optional<HostView<const i32, 1>> h_map;
    moe::cuda::OptDeviceView<const i32, 1> dv_map;
    if (c.map) {
      d_map.upload(*c.map);
      device_sync();
      h_map = hin1(*c.map);
      dv_map = din1(d_map);
    }
    const Status gpu = moe::cuda::moe_permute<float>(din(d_hidden, M, H), dv_scales, din(d_ids, M, c.ids_cols), E,
                                                     c.El, dv_map, c.A, -1, d_out, ws.span(0), stream_, c.checked);
    stream_sync(stream_);
    const Status cpu = moe::cpu::moe_permute<float>(hin(hidden, M, H), h_scales, hin(ids, M, c.ids_cols), E, c.El,
                                                    h_map, c.A, -1, h_out);
    return {gpu, cpu};
  };
  auto rejected = [&](const Cfg& c, std::string_view name) {
    const auto [gpu, cpu] = run(c);
    EXPECT_TRUE(SameRejection(gpu, cpu, name));
    EXPECT_TRUE(Untouched(d_ph));
    EXPECT_TRUE(Untouched(d_psc));
    EXPECT_TRUE(Untouched(d_eft));
    EXPECT_TRUE(Untouched(d_inv));
    EXPECT_TRUE(Untouched(d_pidx));
    EXPECT_TRUE(Untouched(d_midx));
  };
  const std::vector<i32> duplicate = {0, 1, 2, 3, 0, -1, -1, -1};      // local 0 owned twice
  const std::vector<i32> out_of_range = {0, 1, 2, 3, 4, -1, -1, -1};   // 4 >= E_local
  {
    Cfg c;
    c.ph_rows = M * k + 1;
    rejected(c, "permuted_hidden_states");
  }
  {
    Cfg c;
    c.El = 4;
    rejected(c, "expert_map");  // required when E_local != E
  }
  {
    Cfg c;
    c.A = -1;
    rejected(c, "align_block_size");
  }
  {
    Cfg c;
    c.ids_cols = 0;
    rejected(c, "topk_ids");
  }
  {
    Cfg c;
    c.eft_n = 8;
    rejected(c, "expert_first_token_offset");
  }
  {
    Cfg c;
    c.scales = true;
    rejected(c, "permuted_scales");
  }
  for (const auto* bad_map : {&duplicate, &out_of_range}) {
    Cfg c;
    c.El = 4;
    c.map = *bad_map;
    c.A = 16;
    rejected(c, "expert_map");  // checked: contents validated on a host copy
    // Unchecked, the op runs (memory-safe: run under compute-sanitizer to see it) and returns ok.
    c.checked = false;
    const auto [gpu, cpu] = run(c);
    EXPECT_TRUE(gpu.is_ok()) << gpu.to_string();
    device_sync();
    for (auto* b : {&d_inv, &d_pidx, &d_midx}) b->fill_bytes(kUntouched);
    d_ph.fill_bytes(kUntouched);
    d_psc.fill_bytes(kUntouched);
    d_eft.fill_bytes(kUntouched);
    device_sync();
  }
}

// ---------------------------------------------------------------------------------------------
// moe_unpermute

template <class T>
void check_unpermute(cudaStream_t stream, Index M, Index k, Index R, Index H, bool with_eft, Index pad, bool checked,
                     std::uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "M=" << M << " k=" << k << " R=" << R << " H=" << H << " eft=" << with_eft
                                    << " pad=" << pad << " checked=" << checked);
  Random rng(seed);
  const Index ld = H + pad, El = 5;
  const std::vector<T> permuted = rng.normal_vector<T>(static_cast<std::size_t>(R * ld));
  const std::vector<float> weights = rng.uniform_vector<float>(static_cast<std::size_t>(M * k), -1.0f, 1.0f);
  const Index valid = with_eft ? rng.integer(0, static_cast<int>(R)) : R;
  std::vector<i64> eft(static_cast<std::size_t>(El + 1));
  for (Index e = 0; e <= El; ++e) eft[e] = valid * e / El;
  std::vector<i32> inv(static_cast<std::size_t>(M * k));
  for (auto& r : inv) {
    if (with_eft && (valid == 0 || rng.integer(0, 3) == 0)) {  // skipped: rows >= the last offset
      const i32 skip[] = {static_cast<i32>(valid), static_cast<i32>(R), static_cast<i32>(R + 7), kI32Max};
      r = skip[rng.integer(0, 3)];
    } else {
      r = rng.integer(0, static_cast<int>(valid - 1));
    }
  }
  std::vector<T> out(static_cast<std::size_t>(M * H));
  std::optional<HostView<const i64, 1>> h_eft;
  if (with_eft) h_eft = hin1(eft);
  const Status cpu = moe::cpu::moe_unpermute<T>(hin(permuted, R, H, ld), hin(weights, M, k), hin1(inv), h_eft,
                                                hout(out, M, H));
  ASSERT_TRUE(cpu.is_ok()) << cpu.to_string();

  DeviceBuffer<T> d_permuted(permuted), d_out = dbuf<T>(M * H);
  DeviceBuffer<float> d_weights(weights);
  DeviceBuffer<i32> d_inv(inv);
  DeviceBuffer<i64> d_eft(eft);
  moe::cuda::OptDeviceView<const i64, 1> dv_eft;
  if (with_eft) dv_eft = din1(d_eft);
  for (int run = 0; run < 2; ++run) {
    d_out.fill_bytes(kOutputPoison[run]);
    device_sync();
    const Status s = moe::cuda::moe_unpermute<T>(din(d_permuted, R, H, ld), din(d_weights, M, k), din1(d_inv), dv_eft,
                                                 dout(d_out, M, H), stream, checked);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    stream_sync(stream);
    EXPECT_TRUE(BitwiseEqual(d_out.download(), out)) << "run " << run;
  }
}

template <class T>
void unpermute_grid(cudaStream_t stream, std::uint64_t seed) {
  int i = 0;
  const Index ks[] = {1, 2, 8, 16};
  for (Index M : kTokenCounts) {
    for (bool with_eft : {false, true}) {
      const Index k = M >= 65536 ? 2 : ks[i % 4];
      const Index R = M * k + (i % 2 ? 37 : 1);
      const Index H = M >= 1000 ? 16 : 72;
      check_unpermute<T>(stream, M, k, R, H, with_eft, i % 3 == 1 ? 5 : 0, i % 4 == 0, seed++);
      if (::testing::Test::HasFailure()) return;
      ++i;
    }
  }
}

TEST_F(CudaOps, UnpermuteMatchesCpuBitwise) {
  unpermute_grid<bfloat16>(stream_, 3000);
  unpermute_grid<half>(stream_, 3100);
  unpermute_grid<float>(stream_, 3200);
}

// Round trip through the permute outputs (vLLM's use), aligned, with an expert map.
TEST_F(CudaOps, UnpermuteAfterPermuteMatchesCpu) {
  const Index M = 300, k = 4, E = 32, H = 24, A = 16;
  Random rng(3300);
  const MapSetup ms = ep_map(4, 2, E, moe::ExpertPlacement::kRoundRobin);
  const Index El = ms.num_local, R = moe::cpu::moe_permute_rows(M, k, El, A);
  const std::vector<bfloat16> hidden = rng.normal_vector<bfloat16>(M * H);
  const std::vector<i32> ids = random_ids(rng, M, k, E, true);
  const std::vector<float> weights = rng.uniform_vector<float>(M * k, 0.0f, 1.0f);
  std::vector<bfloat16> ph(R * H), out(M * H);
  std::vector<i64> eft(El + 1);
  std::vector<i32> inv(M * k), pidx(R);
  ASSERT_TRUE(moe::cpu::moe_permute<bfloat16>(hin(hidden, M, H), std::nullopt, hin(ids, M, k), E, El, hin1(ms.map), A,
                                              -1, {hout(ph, R, H), std::nullopt, hout1(eft), hout1(inv), hout1(pidx), std::nullopt})
                  .is_ok());
  ASSERT_TRUE(moe::cpu::moe_unpermute<bfloat16>(hin(ph, R, H), hin(weights, M, k), hin1(inv), hin1(eft), hout(out, M, H)).is_ok());

  DeviceBuffer<bfloat16> d_hidden(hidden), d_ph = dbuf<bfloat16>(R * H), d_out = dbuf<bfloat16>(M * H);
  DeviceBuffer<i32> d_ids(ids), d_map(ms.map), d_inv = dbuf<i32>(M * k), d_pidx = dbuf<i32>(R);
  DeviceBuffer<i64> d_eft = dbuf<i64>(El + 1);
  DeviceBuffer<float> d_weights(weights);
  d_out.fill_bytes(0xFF);
  Workspace ws(moe::cuda::moe_permute_workspace_bytes(M, k, E, El, A));
  ws.poison(0);
  device_sync();
  ASSERT_TRUE(moe::cuda::moe_permute<bfloat16>(din(d_hidden, M, H), std::nullopt, din(d_ids, M, k), E, El, din1(d_map), A, -1,
                                               {dout(d_ph, R, H), std::nullopt, dout1(d_eft), dout1(d_inv), dout1(d_pidx), std::nullopt},
                                               ws.span(0), stream_)
                  .is_ok());
  ASSERT_TRUE(moe::cuda::moe_unpermute<bfloat16>(din(d_ph, R, H), din(d_weights, M, k), din1(d_inv), din1(d_eft),
                                                 dout(d_out, M, H), stream_)
                  .is_ok());
  stream_sync(stream_);
  EXPECT_TRUE(BitwiseEqual(d_out.download(), out));
}

TEST_F(CudaOps, UnpermuteRejectsBadInputs) {
  const Index M = 8, k = 2, R = 20, H = 8, kBig = 1024;
  Random rng(13);
  const std::vector<float> permuted = rng.normal_vector<float>(R * H), weights = rng.normal_vector<float>(M * k);
  std::vector<i32> inv(M * k);
  for (auto& r : inv) r = rng.integer(0, static_cast<int>(R - 1));
  const std::vector<i64> eft = {0, 10, R};
  std::vector<float> h_out(kBig);
  DeviceBuffer<float> d_permuted(permuted), d_weights(weights), d_out = dbuf<float>(kBig);
  DeviceBuffer<i32> d_inv(inv);
  DeviceBuffer<i64> d_eft(eft);
  d_out.fill_bytes(kUntouched);
  device_sync();

  struct Cfg {
    std::vector<i32> inv;
    std::optional<std::vector<i64>> eft;
    Index inv_n = -1;
    Index out_cols = -1;
    bool checked = true;
  };
  auto run = [&](const Cfg& c) -> std::pair<Status, Status> {
    d_inv.upload(c.inv);
    std::optional<HostView<const i64, 1>> h_eft;
    moe::cuda::OptDeviceView<const i64, 1> dv_eft;
    if (c.eft) {
      if (!c.eft->empty()) d_eft.upload(*c.eft);
      h_eft = hin1(*c.eft);
      dv_eft = din1(d_eft, static_cast<Index>(c.eft->size()));
    }
    device_sync();
    const Index inv_n = c.inv_n >= 0 ? c.inv_n : M * k, cols = c.out_cols >= 0 ? c.out_cols : H;
    const Status gpu = moe::cuda::moe_unpermute<float>(din(d_permuted, R, H), din(d_weights, M, k), din1(d_inv, inv_n),
                                                       dv_eft, dout(d_out, M, cols), stream_, c.checked);
    stream_sync(stream_);
    const Status cpu = moe::cpu::moe_unpermute<float>(hin(permuted, R, H), hin(weights, M, k), hin1(c.inv, inv_n), h_eft,
                                                      hout(h_out, M, cols));
    return {gpu, cpu};
  };
  auto rejected = [&](const Cfg& c, std::string_view name) {
    const auto [gpu, cpu] = run(c);
    EXPECT_TRUE(SameRejection(gpu, cpu, name));
    EXPECT_TRUE(Untouched(d_out));
  };
  {
    Cfg c{inv};
    c.out_cols = H + 1;
    rejected(c, "output");
  }
  {
    Cfg c{inv};
    c.inv_n = M * k - 1;
    rejected(c, "inv_permuted_idx");
  }
  {
    Cfg c{inv};
    c.eft = std::vector<i64>{};
    rejected(c, "expert_first_token_offset");
  }
  // Data-dependent (checked mode): a row outside [0, R), a negative row, a last offset > R.
  std::vector<i32> bad_row = inv, negative = inv;
  bad_row[5] = static_cast<i32>(R);
  negative[3] = -1;
  const std::vector<i64> bad_eft = {0, 10, R + 1};
  {
    Cfg c{bad_row};
    rejected(c, "inv_permuted_idx");
  }
  {
    Cfg c{negative};
    c.eft = eft;
    rejected(c, "inv_permuted_idx");
  }
  {
    Cfg c{inv};
    c.eft = bad_eft;
    rejected(c, "expert_first_token_offset");
  }
  // Unchecked, the same inputs run (out-of-range rows contribute zero, never addressed).
  for (Cfg c : {Cfg{bad_row}, Cfg{negative, eft}, Cfg{bad_row, bad_eft}}) {
    c.checked = false;
    const auto [gpu, cpu] = run(c);
    EXPECT_TRUE(gpu.is_ok()) << gpu.to_string();
  }
  device_sync();
}

// ---------------------------------------------------------------------------------------------
// moe_align_block_size

struct AlignCase {
  Index M, k, E, B;
  bool pad_sorted, ignore_invalid;
  int ep_size, ep_rank;
  moe::ExpertPlacement placement;
  bool invalid_ids, checked;
};

std::string describe(const AlignCase& c) {
  std::ostringstream os;
  os << "M=" << c.M << " k=" << c.k << " E=" << c.E << " B=" << c.B << " pad_sorted_ids=" << c.pad_sorted
     << " ignore_invalid_experts=" << c.ignore_invalid << " ep=" << c.ep_size << "/" << c.ep_rank
     << (c.placement == moe::ExpertPlacement::kLinear ? " linear" : " round_robin") << " invalid=" << c.invalid_ids
     << " checked=" << c.checked;
  return os.str();
}

void check_align(cudaStream_t stream, const AlignCase& c, std::uint64_t seed) {
  SCOPED_TRACE(describe(c));
  Random rng(seed);
  const MapSetup ms = ep_map(c.ep_size, c.ep_rank, c.E, c.placement);
  const std::vector<i32> ids = random_ids(rng, c.M, c.k, c.E, c.invalid_ids);
  const Index numel = c.M * c.k;
  const auto sz = moe::cpu::moe_align_block_size_sizes(numel, c.E, c.B, c.pad_sorted);
  const auto dsz = moe::cuda::moe_align_block_size_sizes(numel, c.E, c.B, c.pad_sorted);
  ASSERT_EQ(sz.max_num_tokens_padded, dsz.max_num_tokens_padded);
  ASSERT_EQ(sz.num_blocks, dsz.num_blocks);
  std::vector<i32> sorted(static_cast<std::size_t>(sz.max_num_tokens_padded)), expert_ids(static_cast<std::size_t>(sz.num_blocks)),
      total(1);
  std::optional<HostView<const i32, 1>> h_map;
  if (ms.has_map) h_map = hin1(ms.map);
  const Status cpu = moe::cpu::moe_align_block_size(hin(ids, c.M, c.k), c.B, c.E, h_map, c.pad_sorted, c.ignore_invalid,
                                                    hout1(sorted), hout1(expert_ids), hout1(total));
  ASSERT_TRUE(cpu.is_ok()) << cpu.to_string();

  DeviceBuffer<i32> d_ids(ids), d_map(ms.map), d_sorted = dbuf<i32>(sz.max_num_tokens_padded),
                                d_expert_ids = dbuf<i32>(sz.num_blocks), d_total = dbuf<i32>(1);
  moe::cuda::OptDeviceView<const i32, 1> dv_map;
  if (ms.has_map) dv_map = din1(d_map);
  Workspace ws(moe::cuda::moe_align_block_size_workspace_bytes(c.M, c.k, c.E));
  for (int run = 0; run < 2; ++run) {
    ws.poison(run);
    d_sorted.fill_bytes(kOutputPoison[run]);
    d_expert_ids.fill_bytes(kOutputPoison[run]);
    d_total.fill_bytes(kOutputPoison[run]);
    device_sync();
    const Status s = moe::cuda::moe_align_block_size(din(d_ids, c.M, c.k), c.B, c.E, dv_map, c.pad_sorted,
                                                     c.ignore_invalid, dout1(d_sorted), dout1(d_expert_ids),
                                                     dout1(d_total), ws.span(run), stream, c.checked);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    stream_sync(stream);
    EXPECT_TRUE(ExactlyEqual(d_sorted.download(), sorted)) << "sorted_token_ids, run " << run;
    EXPECT_TRUE(ExactlyEqual(d_expert_ids.download(), expert_ids)) << "expert_ids, run " << run;
    EXPECT_TRUE(ExactlyEqual(d_total.download(), total)) << "num_tokens_post_padded, run " << run;
  }
}

TEST_F(CudaOps, AlignBlockSizeMatchesCpu) {
  const Index Es[] = {8, 64, 512, 256};
  const Index ks[] = {1, 2, 8, 16};
  std::uint64_t seed = 4000;
  int i = 0;
  for (Index M : kTokenCounts) {
    for (Index B : {1, 16, 128}) {
      for (bool pad_sorted : {false, true}) {
        for (bool ignore_invalid : {false, true}) {
          const Ep& ep = kEps[i % 3];
          AlignCase c{M, M >= 65536 ? 4 : ks[(i / 3) % 4], Es[i % 4], B, pad_sorted, ignore_invalid,
                      ep.size, (i / 2) % ep.size, ep.placement, i % 2 == 0, i % 5 == 0};
          check_align(stream_, c, seed++);
          if (HasFailure()) return;
          ++i;
        }
      }
    }
  }
  // One expert; all slots on one expert of many.
  check_align(stream_, {100, 2, 1, 16, false, false, 1, 0, moe::ExpertPlacement::kLinear, false, true}, seed++);
}

TEST_F(CudaOps, AlignBlockSizeRejectsBadInputs) {
  const Index M = 16, k = 2, E = 8, B = 16, kBig = 4096;
  Random rng(17);
  const std::vector<i32> ids = random_ids(rng, M, k, E, true);
  const auto sz = moe::cpu::moe_align_block_size_sizes(M * k, E, B, false);
  std::vector<i32> h_sorted(kBig), h_eids(kBig), h_total(4);
  DeviceBuffer<i32> d_ids(ids), d_map = dbuf<i32>(E), d_sorted = dbuf<i32>(kBig), d_eids = dbuf<i32>(kBig),
                    d_total = dbuf<i32>(4);
  d_sorted.fill_bytes(kUntouched);
  d_eids.fill_bytes(kUntouched);
  d_total.fill_bytes(kUntouched);
  device_sync();
  struct Cfg {
    Index B = 16, E = 8;
    std::optional<std::vector<i32>> map;
    Index map_n = -1;
    Index sorted_n = -1, eids_n = -1, total_n = 1;
    bool ignore_invalid = false;
    bool checked = true;
  };
  auto run = [&](const Cfg& c) -> std::pair<Status, Status> {
    const Index sorted_n = c.sorted_n >= 0 ? c.sorted_n : sz.max_num_tokens_padded;
    const Index eids_n = c.eids_n >= 0 ? c.eids_n : sz.num_blocks;
    std::optional<HostView<const i32, 1>> h_map;
    moe::cuda::OptDeviceView<const i32, 1> dv_map;
    if (c.map) {
      d_map.upload(*c.map);
      device_sync();
      const Index n = c.map_n >= 0 ? c.map_n : static_cast<Index>(c.map->size());
      h_map = hin1(*c.map, n);
      dv_map = din1(d_map, n);
    }
    Workspace ws(moe::cuda::moe_align_block_size_workspace_bytes(M, k, std::max<Index>(c.E, 1)));
    const Status gpu = moe::cuda::moe_align_block_size(din(d_ids, M, k), c.B, c.E, dv_map, false, c.ignore_invalid,
                                                       dout1(d_sorted, sorted_n), dout1(d_eids, eids_n),
                                                       dout1(d_total, c.total_n), ws.span(0), stream_, c.checked);
    stream_sync(stream_);
    const Status cpu = moe::cpu::moe_align_block_size(hin(ids, M, k), c.B, c.E, h_map, false, c.ignore_invalid,
                                                      hout1(h_sorted, sorted_n), hout1(h_eids, eids_n),
                                                      hout1(h_total, c.total_n));
    return {gpu, cpu};
  };
  auto rejected = [&](const Cfg& c, std::string_view name) {
    const auto [gpu, cpu] = run(c);
    EXPECT_TRUE(SameRejection(gpu, cpu, name));
    EXPECT_TRUE(Untouched(d_sorted));
    EXPECT_TRUE(Untouched(d_eids));
    EXPECT_TRUE(Untouched(d_total));
  };
  {
    Cfg c;
    c.B = 0;
    rejected(c, "block_size");
  }
  {
    Cfg c;
    c.E = 0;
    rejected(c, "num_experts");
  }
  {
    Cfg c;
    c.sorted_n = sz.max_num_tokens_padded + 1;
    rejected(c, "sorted_token_ids");
  }
  {
    Cfg c;
    c.eids_n = sz.num_blocks - 1;
    rejected(c, "expert_ids");
  }
  {
    Cfg c;
    c.total_n = 2;
    rejected(c, "num_tokens_post_padded");
  }
  {
    Cfg c;
    c.map = std::vector<i32>{0, 1, 2, 3, -1, -1, -1, -1};
    c.map_n = E - 1;
    rejected(c, "expert_map");
  }
  const std::vector<i32> too_large = {0, 1, 2, 3, 8, -1, -1, -1};  // 8 >= E
  const std::vector<i32> duplicate = {0, 1, 2, 3, 3, -1, -1, -1};
  for (const auto* bad : {&too_large, &duplicate}) {
    for (bool ignore_invalid : {false, true}) {
      Cfg c;
      c.map = *bad;
      c.ignore_invalid = ignore_invalid;
      rejected(c, "expert_map");
      c.checked = false;  // unchecked: runs, memory-safe
      const auto [gpu, cpu] = run(c);
      EXPECT_TRUE(gpu.is_ok()) << gpu.to_string();
      d_sorted.fill_bytes(kUntouched);
      d_eids.fill_bytes(kUntouched);
      d_total.fill_bytes(kUntouched);
      device_sync();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// moe_fused_mul_sum

enum class MulSumMap { kNone, kNoneWithIds, kEp, kArbitrary };

template <class T>
void check_fused(cudaStream_t stream, Index M, Index k, Index H, MulSumMap map_kind, Index slot_pad, std::uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "M=" << M << " k=" << k << " H=" << H << " map=" << static_cast<int>(map_kind)
                                    << " slot_pad=" << slot_pad);
  Random rng(seed);
  const Index E = 32, ld_slot = H + slot_pad, ld_token = k * ld_slot;
  const std::vector<T> inputs = rng.normal_vector<T>(static_cast<std::size_t>(M * ld_token));
  const std::vector<float> weights = rng.uniform_vector<float>(static_cast<std::size_t>(M * k), -1.0f, 1.0f);
  const std::vector<i32> ids = random_ids(rng, M, k, E, true);
  std::vector<i32> map;
  if (map_kind == MulSumMap::kEp) map = ep_map(4, 1, E, moe::ExpertPlacement::kRoundRobin).map;
  if (map_kind == MulSumMap::kArbitrary) {  // not validated by the op: only the sign matters
    map.resize(E);
    for (auto& x : map) x = rng.integer(-3, 40);
  }
  const bool with_ids = map_kind != MulSumMap::kNone, with_map = !map.empty();
  std::vector<T> out(static_cast<std::size_t>(M * H));
  std::optional<HostView<const i32, 2>> h_ids;
  std::optional<HostView<const i32, 1>> h_map;
  if (with_ids) h_ids = hin(ids, M, k);
  if (with_map) h_map = hin1(map);
  const HostView<const T, 3> h_inputs(inputs.data(), {M, k, H}, {ld_token, ld_slot, 1});
  const Status cpu = moe::cpu::moe_fused_mul_sum<T>(h_inputs, hin(weights, M, k), hout(out, M, H), h_ids, h_map);
  ASSERT_TRUE(cpu.is_ok()) << cpu.to_string();

  DeviceBuffer<T> d_inputs(inputs), d_out = dbuf<T>(M * H);
  DeviceBuffer<float> d_weights(weights);
  DeviceBuffer<i32> d_ids(ids), d_map(map);
  moe::cuda::OptDeviceView<const i32, 2> dv_ids;
  moe::cuda::OptDeviceView<const i32, 1> dv_map;
  if (with_ids) dv_ids = din(d_ids, M, k);
  if (with_map) dv_map = din1(d_map);
  const DeviceView<const T, 3> dv_inputs(d_inputs.data(), {M, k, H}, {ld_token, ld_slot, 1});
  for (int run = 0; run < 2; ++run) {
    d_out.fill_bytes(kOutputPoison[run]);
    device_sync();
    const Status s = moe::cuda::moe_fused_mul_sum<T>(dv_inputs, din(d_weights, M, k), dout(d_out, M, H), dv_ids, dv_map,
                                                     stream);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    stream_sync(stream);
    EXPECT_TRUE(BitwiseEqual(d_out.download(), out)) << "run " << run;
  }
}

template <class T>
void fused_grid(cudaStream_t stream, std::uint64_t seed) {
  const Index ks[] = {1, 2, 8, 16};
  const MulSumMap maps[] = {MulSumMap::kNone, MulSumMap::kNoneWithIds, MulSumMap::kEp, MulSumMap::kArbitrary};
  int i = 0;
  for (Index M : kTokenCounts) {
    for (const MulSumMap map : maps) {
      const Index k = M >= 65536 ? 2 : ks[i % 4];
      const Index H = M >= 1000 ? 8 : 72;
      check_fused<T>(stream, M, k, H, map, i % 3 == 2 ? 4 : 0, seed++);
      if (::testing::Test::HasFailure()) return;
      ++i;
    }
  }
}

TEST_F(CudaOps, FusedMulSumMatchesCpuBitwise) {
  fused_grid<bfloat16>(stream_, 5000);
  fused_grid<half>(stream_, 5100);
  fused_grid<float>(stream_, 5200);
}

TEST_F(CudaOps, FusedMulSumRejectsBadInputs) {
  const Index M = 8, k = 2, H = 8, E = 8, kBig = 1024;
  Random rng(19);
  const std::vector<float> inputs = rng.normal_vector<float>(M * k * H * 2), weights = rng.normal_vector<float>(M * k);
  const std::vector<i32> ids = random_ids(rng, M, k, E, false), map = {0, 1, -1, -1, 2, 3, -1, -1};
  std::vector<float> h_out(kBig);
  DeviceBuffer<float> d_inputs(inputs), d_weights(weights), d_out = dbuf<float>(kBig);
  DeviceBuffer<i32> d_ids(ids), d_map(map);
  d_out.fill_bytes(kUntouched);
  device_sync();
  struct Cfg {
    Index in_stride = 1;  // stride of the last input dimension
    Index w_cols = 2, out_cols = 8, ids_rows = 8;
    bool ids = false, map = false;
  };
  auto rejected = [&](const Cfg& c, std::string_view name) {
    const HostView<const float, 3> h_in(inputs.data(), {M, k, H}, {k * H * c.in_stride, H * c.in_stride, c.in_stride});
    const DeviceView<const float, 3> d_in(d_inputs.data(), {M, k, H}, {k * H * c.in_stride, H * c.in_stride, c.in_stride});
    std::optional<HostView<const i32, 2>> h_ids;
    std::optional<HostView<const i32, 1>> h_map;
    moe::cuda::OptDeviceView<const i32, 2> dv_ids;
    moe::cuda::OptDeviceView<const i32, 1> dv_map;
    if (c.ids) {
      h_ids = hin(ids, c.ids_rows, k);
      dv_ids = din(d_ids, c.ids_rows, k);
    }
    if (c.map) {
      h_map = hin1(map);
      dv_map = din1(d_map);
    }
    const Status gpu = moe::cuda::moe_fused_mul_sum<float>(d_in, din(d_weights, M, c.w_cols), dout(d_out, M, c.out_cols),
                                                           dv_ids, dv_map, stream_);
    stream_sync(stream_);
    const Status cpu = moe::cpu::moe_fused_mul_sum<float>(h_in, hin(weights, M, c.w_cols), hout(h_out, M, c.out_cols),
                                                          h_ids, h_map);
    EXPECT_TRUE(SameRejection(gpu, cpu, name));
    EXPECT_TRUE(Untouched(d_out));
  };
  {
    Cfg c;
    c.map = true;  // without topk_ids
    rejected(c, "topk_ids");
  }
  {
    Cfg c;
    c.ids = true;
    c.map = true;
    c.ids_rows = M - 1;
    rejected(c, "topk_ids");
  }
  {
    Cfg c;
    c.w_cols = k + 1;
    rejected(c, "topk_weights");
  }
  {
    Cfg c;
    c.out_cols = H - 1;
    rejected(c, "output");
  }
  {
    Cfg c;
    c.in_stride = 2;
    rejected(c, "inputs");
  }
}

// ---------------------------------------------------------------------------------------------
// eplb_logical_to_physical

moe::cuda::ReplicaChoice to_cuda(moe::cpu::ReplicaChoice c) {
  return c == moe::cpu::ReplicaChoice::kTokenHash ? moe::cuda::ReplicaChoice::kTokenHash
                                                  : moe::cuda::ReplicaChoice::kSlotPosition;
}

struct EplbCase {
  Index M, k, L, max_replicas, P;
  moe::cpu::ReplicaChoice choice;
  bool with_load;
  Index num_unpadded;
  bool invalid_ids, checked;
  Index map_pad;
};

void check_eplb(cudaStream_t stream, const EplbCase& c, std::uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "M=" << c.M << " k=" << c.k << " L=" << c.L << " max_replicas=" << c.max_replicas
                                    << " P=" << c.P << " choice=" << static_cast<int>(c.choice) << " load=" << c.with_load
                                    << " unpadded=" << c.num_unpadded << " invalid=" << c.invalid_ids
                                    << " checked=" << c.checked << " map_pad=" << c.map_pad);
  Random rng(seed);
  const Index ld_map = c.max_replicas + c.map_pad;
  std::vector<i32> count(static_cast<std::size_t>(c.L)), map(static_cast<std::size_t>(c.L * ld_map));
  for (Index e = 0; e < c.L; ++e) {
    count[e] = rng.integer(1, static_cast<int>(c.max_replicas));
    for (Index r = 0; r < ld_map; ++r) {  // entries past the count are junk: never read
      map[e * ld_map + r] = r < count[e] ? rng.integer(0, static_cast<int>(c.P - 1)) : (r % 2 ? -9 : static_cast<i32>(c.P + 5));
    }
  }
  const std::vector<i32> ids = random_ids(rng, c.M, c.k, c.L, c.invalid_ids);
  std::vector<i64> load0(static_cast<std::size_t>(c.P));
  for (auto& x : load0) x = rng.integer(0, 1000);
  std::vector<i32> phys(static_cast<std::size_t>(c.M * c.k));
  std::vector<i64> load = load0;
  std::optional<HostView<i64, 1>> h_load;
  if (c.with_load) h_load = hout1(load);
  const Status cpu = moe::cpu::eplb_logical_to_physical(hin(ids, c.M, c.k), hin(map, c.L, c.max_replicas, ld_map),
                                                        hin1(count), c.P, c.choice, hout(phys, c.M, c.k), h_load,
                                                        c.num_unpadded);
  ASSERT_TRUE(cpu.is_ok()) << cpu.to_string();

  DeviceBuffer<i32> d_ids(ids), d_map(map), d_count(count), d_phys = dbuf<i32>(c.M * c.k);
  DeviceBuffer<i64> d_load(load0);
  moe::cuda::OptDeviceView<i64, 1> dv_load;
  if (c.with_load) dv_load = dout1(d_load);
  for (int run = 0; run < 2; ++run) {
    d_load.upload(load0);
    d_phys.fill_bytes(kOutputPoison[run]);
    device_sync();
    const Status s = moe::cuda::eplb_logical_to_physical(din(d_ids, c.M, c.k), din(d_map, c.L, c.max_replicas, ld_map),
                                                         din1(d_count), c.P, to_cuda(c.choice), dout(d_phys, c.M, c.k),
                                                         dv_load, c.num_unpadded, stream, c.checked);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    stream_sync(stream);
    EXPECT_TRUE(ExactlyEqual(d_phys.download(), phys)) << "physical_ids, run " << run;
    EXPECT_TRUE(ExactlyEqual(d_load.download(), load)) << "expert_load, run " << run;
  }
}

TEST_F(CudaOps, EplbMatchesCpu) {
  std::uint64_t seed = 6000;
  int i = 0;
  for (Index M : kTokenCounts) {
    for (auto choice : {moe::cpu::ReplicaChoice::kTokenHash, moe::cpu::ReplicaChoice::kSlotPosition}) {
      for (bool with_load : {false, true}) {
        const Index L = i % 2 ? 256 : 64;
        const EplbCase c{M, M >= 65536 ? 8 : (i % 3 == 0 ? 1 : 8), L, i % 3 == 1 ? 1 : 4, L + 32, choice, with_load,
                         i % 4 == 3 ? M / 2 : -1, i % 2 == 0, i % 5 == 0, i % 3 == 2 ? 3 : 0};
        check_eplb(stream_, c, seed++);
        if (HasFailure()) return;
        ++i;
      }
    }
  }
}

TEST_F(CudaOps, EplbRejectsBadInputs) {
  const Index M = 8, k = 2, L = 6, Rmax = 3, P = 10, kBig = 1024;
  Random rng(23);
  const std::vector<i32> ids = random_ids(rng, M, k, L, true);
  const std::vector<i32> count = {1, 2, 3, 1, 2, 3};
  std::vector<i32> map(L * Rmax);
  for (auto& x : map) x = rng.integer(0, static_cast<int>(P - 1));
  std::vector<i32> h_phys(kBig);
  std::vector<i64> h_load(kBig);
  DeviceBuffer<i32> d_ids(ids), d_map(map), d_count(count), d_phys = dbuf<i32>(kBig);
  DeviceBuffer<i64> d_load = dbuf<i64>(kBig);
  d_phys.fill_bytes(kUntouched);
  d_load.fill_bytes(kUntouched);
  device_sync();
  struct Cfg {
    std::vector<i32> count, map;
    Index P = 10, load_n = 10, phys_cols = 2;
    bool checked = true;
  };
  auto run = [&](const Cfg& c) -> std::pair<Status, Status> {
    d_count.upload(c.count);
    d_map.upload(c.map);
    device_sync();
    const Status gpu = moe::cuda::eplb_logical_to_physical(
        din(d_ids, M, k), din(d_map, L, Rmax), din1(d_count), c.P, moe::cuda::ReplicaChoice::kTokenHash,
        dout(d_phys, M, c.phys_cols), dout1(d_load, c.load_n), -1, stream_, c.checked);
    stream_sync(stream_);
    const Status cpu = moe::cpu::eplb_logical_to_physical(hin(ids, M, k), hin(c.map, L, Rmax), hin1(c.count), c.P,
                                                          moe::cpu::ReplicaChoice::kTokenHash, hout(h_phys, M, c.phys_cols),
                                                          hout1(h_load, c.load_n), -1);
    return {gpu, cpu};
  };
  auto rejected = [&](const Cfg& c, std::string_view name) {
    const auto [gpu, cpu] = run(c);
    EXPECT_TRUE(SameRejection(gpu, cpu, name));
    EXPECT_TRUE(Untouched(d_phys));
    EXPECT_TRUE(Untouched(d_load));
  };
  {
    Cfg c{count, map};
    c.P = 0;
    c.load_n = 0;
    rejected(c, "num_physical_experts");
  }
  {
    Cfg c{count, map};
    c.load_n = P + 1;
    rejected(c, "expert_load");
  }
  {
    Cfg c{count, map};
    c.phys_cols = k + 1;
    rejected(c, "physical_ids");
  }
  std::vector<i32> zero_count = count, big_count = count, bad_map = map;
  zero_count[2] = 0;
  big_count[4] = static_cast<i32>(Rmax + 1);
  bad_map[1 * Rmax + 1] = static_cast<i32>(P);  // logical 1 has 2 replicas: replica 1 is read
  rejected(Cfg{zero_count, map}, "logical_replica_count");
  rejected(Cfg{big_count, map}, "logical_replica_count");
  rejected(Cfg{count, bad_map}, "logical_to_physical_map");
  // Unchecked: ids whose count or physical id is bad get -1 and are not counted; no fault.
  for (const Cfg& bad : {Cfg{zero_count, map}, Cfg{big_count, map}, Cfg{count, bad_map}}) {
    Cfg c = bad;
    c.checked = false;
    d_load.fill_bytes(0);
    device_sync();
    const auto [gpu, cpu] = run(c);
    ASSERT_TRUE(gpu.is_ok()) << gpu.to_string();
    const std::vector<i32> phys = d_phys.download();
    const std::vector<i64> load = d_load.download();
    i64 counted = 0;
    for (Index s = 0; s < M * k; ++s) {
      EXPECT_TRUE(phys[s] >= -1 && phys[s] < P) << phys[s];
      counted += phys[s] >= 0;
    }
    i64 total = 0;
    for (Index p = 0; p < P; ++p) total += load[p];
    EXPECT_EQ(total, counted);
  }
}

// ---------------------------------------------------------------------------------------------
// Layout helpers and stream capture.

TEST_F(CudaOps, SizeHelpersMatchCpu) {
  for (Index M : {0, 1, 7, 1000}) {
    for (int k : {1, 3, 16}) {
      for (Index E : {1, 7, 64, 512}) {
        for (Index A : {0, 1, 16, 128}) {
          EXPECT_EQ(moe::cuda::moe_permute_rows(M, k, E, A), moe::cpu::moe_permute_rows(M, k, E, A));
          if (A == 0) continue;
          for (bool pad : {false, true}) {
            const auto a = moe::cuda::moe_align_block_size_sizes(M * k, E, A, pad);
            const auto b = moe::cpu::moe_align_block_size_sizes(M * k, E, A, pad);
            EXPECT_EQ(a.max_num_tokens_padded, b.max_num_tokens_padded);
            EXPECT_EQ(a.num_blocks, b.num_blocks);
          }
        }
      }
    }
  }
}

// The unchecked ops are stream-ordered with no synchronization or allocation: captured in one
// CUDA graph, replay gives the eager results bit for bit.
TEST_F(CudaOps, GraphCaptureReplaysEagerResults) {
  using P = moe::routing::SoftmaxTopK;
  const Index M = 500, E = 64, k = 4, H = 32, A = 16;
  Random rng(7000);
  const MapSetup ms = ep_map(4, 3, E, moe::ExpertPlacement::kLinear);
  const Index El = ms.num_local, R = moe::cuda::moe_permute_rows(M, k, El, A);
  const auto sz = moe::cuda::moe_align_block_size_sizes(M * k, E, A, true);
  const std::vector<float> logits = rng.gapped_logits(M, E);
  const std::vector<bfloat16> hidden = rng.normal_vector<bfloat16>(M * H);
  DeviceBuffer<float> d_logits(logits), d_w = dbuf<float>(M * k);
  DeviceBuffer<bfloat16> d_hidden(hidden), d_ph = dbuf<bfloat16>(R * H), d_out = dbuf<bfloat16>(M * H);
  DeviceBuffer<i32> d_ids = dbuf<i32>(M * k), d_map(ms.map), d_inv = dbuf<i32>(M * k), d_pidx = dbuf<i32>(R),
                    d_midx = dbuf<i32>(R), d_sorted = dbuf<i32>(sz.max_num_tokens_padded),
                    d_eids = dbuf<i32>(sz.num_blocks), d_total = dbuf<i32>(1);
  DeviceBuffer<i64> d_eft = dbuf<i64>(El + 1);
  Workspace ws_sel(moe::cuda::select_experts_workspace_bytes(M, E));
  Workspace ws_perm(moe::cuda::moe_permute_workspace_bytes(M, k, E, El, A));
  Workspace ws_align(moe::cuda::moe_align_block_size_workspace_bytes(M, k, E));
  auto enqueue = [&](cudaStream_t s) -> Status {
    MOE_RETURN_IF_ERROR(moe::cuda::select_experts<P>(din(d_logits, M, E), k, {true, 1.0f}, std::nullopt, dout(d_ids, M, k),
                                                     dout(d_w, M, k), ws_sel.span(0), s));
    MOE_RETURN_IF_ERROR(moe::cuda::moe_permute<bfloat16>(
        din(d_hidden, M, H), std::nullopt, din(d_ids, M, k), E, El, din1(d_map), A, -1,
        {dout(d_ph, R, H), std::nullopt, dout1(d_eft), dout1(d_inv), dout1(d_pidx), dout1(d_midx)}, ws_perm.span(0), s));
    MOE_RETURN_IF_ERROR(moe::cuda::moe_align_block_size(din(d_ids, M, k), A, E, din1(d_map), true, true, dout1(d_sorted),
                                                        dout1(d_eids), dout1(d_total), ws_align.span(0), s));
    return moe::cuda::moe_unpermute<bfloat16>(din(d_ph, R, H), din(d_w, M, k), din1(d_inv), din1(d_eft),
                                              dout(d_out, M, H), s);
  };
  auto snapshot = [&]() {
    std::vector<std::vector<std::uint8_t>> all;
    auto bytes = [&](const auto& buf) {
      const auto v = buf.download();
      const auto* p = reinterpret_cast<const std::uint8_t*>(v.data());
      all.emplace_back(p, p + v.size() * sizeof(v[0]));
    };
    bytes(d_ids), bytes(d_w), bytes(d_ph), bytes(d_eft), bytes(d_inv), bytes(d_pidx), bytes(d_midx), bytes(d_sorted),
        bytes(d_eids), bytes(d_total), bytes(d_out);
    return all;
  };
  auto poison_outputs = [&](unsigned char b) {
    d_ids.fill_bytes(b), d_w.fill_bytes(b), d_ph.fill_bytes(b), d_eft.fill_bytes(b), d_inv.fill_bytes(b);
    d_pidx.fill_bytes(b), d_midx.fill_bytes(b), d_sorted.fill_bytes(b), d_eids.fill_bytes(b), d_total.fill_bytes(b);
    d_out.fill_bytes(b);
    device_sync();
  };
  poison_outputs(0xFF);
  ASSERT_TRUE(enqueue(stream_).is_ok());
  stream_sync(stream_);
  const auto eager = snapshot();

  poison_outputs(0x5A);
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal), cudaSuccess);
  const Status captured = enqueue(stream_);
  ASSERT_EQ(cudaStreamEndCapture(stream_, &graph), cudaSuccess);
  ASSERT_TRUE(captured.is_ok()) << captured.to_string();
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream_), cudaSuccess);
  stream_sync(stream_);
  const auto replayed = snapshot();
  ASSERT_EQ(eager.size(), replayed.size());
  for (std::size_t i = 0; i < eager.size(); ++i) EXPECT_TRUE(eager[i] == replayed[i]) << "output " << i << " differs";
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

}  // namespace

// ---- storage-type conversions: the device's cvt instructions vs the host's software rounding ----

namespace numeric_check {

__global__ void round_trip_kernel(const std::uint32_t* bits, std::size_t n, std::uint16_t* bf16, std::uint16_t* f16,
                                  std::uint32_t* f16_back) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const float x = std::bit_cast<float>(bits[i]);
    bf16[i] = moe::bfloat16::from_float(x);
    f16[i] = moe::half::from_float(x);
    f16_back[i] = std::bit_cast<std::uint32_t>(moe::half::to_float(static_cast<std::uint16_t>(bits[i] & 0xffffu)));
  }
}

}  // namespace numeric_check

// Every float rounds to the same bf16 and f16 bits on both sides (random bit patterns plus the
// edges: ties, subnormal boundaries, overflow, infinities, NaNs), and every f16 widens alike.
TEST_F(CudaOps, StorageConversionsMatchTheHostBitForBit) {
  std::vector<std::uint32_t> bits = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00001u,
                                     0x7f7fffffu, 0x477fefffu, 0x477ff000u, 0x38800000u, 0x387fffffu, 0x33000000u,
                                     0x33000001u, 0x32ffffffu, 0x3f808000u, 0x3f818000u, 0x00000001u, 0x3f800001u};
  std::uint64_t z = 0x9e3779b97f4a7c15ull;
  for (int i = 0; i < (1 << 20); ++i) {
    z ^= z << 13, z ^= z >> 7, z ^= z << 17;
    bits.push_back(static_cast<std::uint32_t>(z >> 16));
  }
  for (std::uint32_t h = 0; h < 0x10000u; ++h) bits.push_back(h);  // every f16 pattern, for to_float
  DeviceBuffer<std::uint32_t> d_bits(bits);
  DeviceBuffer<std::uint16_t> d_bf16(bits.size()), d_f16(bits.size());
  DeviceBuffer<std::uint32_t> d_back(bits.size());
  numeric_check::round_trip_kernel<<<256, 256>>>(d_bits.data(), bits.size(), d_bf16.data(), d_f16.data(), d_back.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto bf16 = d_bf16.download(), f16 = d_f16.download();
  const auto back = d_back.download();
  int mismatches = 0;
  for (std::size_t i = 0; i < bits.size() && mismatches < 5; ++i) {
    const float x = std::bit_cast<float>(bits[i]);
    const std::uint32_t host_back = std::bit_cast<std::uint32_t>(moe::half::to_float(static_cast<std::uint16_t>(bits[i] & 0xffffu)));
    if (bf16[i] != moe::bfloat16::from_float(x) || f16[i] != moe::half::from_float(x) || back[i] != host_back) {
      ++mismatches;
      ADD_FAILURE() << std::hex << "float bits 0x" << bits[i] << ": device bf16 0x" << bf16[i] << " host 0x"
                    << moe::bfloat16::from_float(x) << ", device f16 0x" << f16[i] << " host 0x"
                    << moe::half::from_float(x) << ", f16->float device 0x" << back[i] << " host 0x" << host_back;
    }
  }
  EXPECT_EQ(mismatches, 0);
}
