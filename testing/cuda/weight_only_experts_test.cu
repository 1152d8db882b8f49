// The weight-only schemes (moe/quant/weight_only.h: W4A16, W8A16) on the CUDA backend against the
// CPU backend, whose arithmetic testing/cpu/quant_weight_only_test.cc checks against an
// independent reference. Same checkpoint (testing/lib/weight_only_checkpoint.h), same routing.
//
// Tolerance: both backends dequantize to the same IO values (the scheme fixes the one rounding),
// and sum the products in fp32 in different orders (Eigen's blocks against the tensor cores' k16
// steps and the kernel's 8 K slices). A GEMM1 sum next to an IO rounding boundary can round to the
// neighbouring value, which moves one term of GEMM2: the bound is 1% of the largest output and the
// mean error 0.2% of the mean magnitude, as the CPU test allows against its reference. A scale,
// zero point or nibble from the wrong place moves outputs by whole codes or 2-16x and breaks the
// bounds by far.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "moe/cpu/kernel.h"
#include "moe/cuda/gemm/sm90_weight_only_gemm.h"
#include "moe/cuda/kernel.cuh"
#include "moe/quant/mxfp4.h"
#include "moe/quant/weight_only.h"
#include "testing/ep/simulated_ep.h"
#include "testing/lib/compare.h"
#include "testing/lib/gpu.h"
#include "testing/lib/random.h"
#include "testing/lib/weight_only_checkpoint.h"

namespace {

using moe::Index;
using moe::testing::DeviceBuffer;
namespace quant = moe::quant;

template <class Q, class IO>
using SpecOf = moe::Spec<moe::routing::Precomputed, moe::StandardPrepareFinalize<>, moe::Experts<moe::SiluAndMul, Q, IO>>;

struct Shape {
  Index M, E, H, I;
  int top_k;
  Index group;  // 0: per channel
  bool zero_points;
  bool act_order = false;  // w13's codes in a per-expert K order (GPTQ desc_act)
  bool signed_codes = false;  // two's-complement codes (no zero points)
};

struct NoEdit {
  template <class A>
  void operator()(A&) const {}
};

template <class Q, class IO>
struct Case {
  static constexpr int kBits = Q::kBits;
  static constexpr Index kPack = 8 / kBits;
  Shape p;
  std::vector<IO> hidden;
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
  moe::testing::QuantizedMatrix<kBits> w13, w2;
  std::vector<std::int32_t> k_order;  // [E, H] with act_order

  Case(Shape s, std::uint32_t seed) : p(s) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (Index i = 0; i < p.M * p.H; ++i) hidden.push_back(moe::from_float<IO>(d(gen)));
    std::vector<int> perm(static_cast<std::size_t>(p.E));
    for (Index m = 0; m < p.M; ++m) {
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), gen);
      for (int j = 0; j < p.top_k; ++j) {
        ids.push_back(perm[j]);
        weights.push_back(0.25f + 0.5f * std::uniform_real_distribution<float>(0, 1)(gen));
      }
    }
    w13 = moe::testing::quantize<kBits>(p.E, 2 * p.I, p.H, p.group, p.zero_points, seed + 1);
    w2 = moe::testing::quantize<kBits>(p.E, p.H, p.I, p.group, p.zero_points, seed + 2);
    for (auto* m : {&w13, &w2}) {
      for (auto& b : m->packed) b ^= p.signed_codes ? Q::kSignFlipByte : 0;
    }
    for (Index e = 0; p.act_order && e < p.E; ++e) {
      std::vector<std::int32_t> o(static_cast<std::size_t>(p.H));
      std::iota(o.begin(), o.end(), 0);
      std::shuffle(o.begin(), o.end(), gen);
      k_order.insert(k_order.end(), o.begin(), o.end());
    }
  }

  template <class Kernel, class Space>
  typename Kernel::Arguments arguments(const IO* hid, const std::int32_t* ids_p, const float* wts,
                                       const std::uint8_t* c13, const std::uint8_t* c2, const float* s13,
                                       const float* s2, const std::uint8_t* z13, const std::uint8_t* z2,
                                       IO* out, const std::int32_t* order = nullptr) const {
    typename Kernel::Arguments a;
    a.hidden_states = moe::TensorView<const IO, 2, Space>(hid, {p.M, p.H});
    a.topk_ids = moe::TensorView<const std::int32_t, 2, Space>(ids_p, {p.M, p.top_k});
    a.topk_weights = moe::TensorView<const float, 2, Space>(wts, {p.M, p.top_k});
    a.top_k = p.top_k;
    a.w13 = moe::TensorView<const std::uint8_t, 3, Space>(c13, {p.E, 2 * p.I, p.H / kPack});
    a.w2 = moe::TensorView<const std::uint8_t, 3, Space>(c2, {p.E, p.H, p.I / kPack});
    a.quant.group_size = p.group;
    a.quant.signed_codes = p.signed_codes;
    a.quant.w13_scale = moe::TensorView<const float, 3, Space>(s13, {p.E, 2 * p.I, w13.groups});
    a.quant.w2_scale = moe::TensorView<const float, 3, Space>(s2, {p.E, p.H, w2.groups});
    if (p.zero_points) {
      a.quant.w13_zero = moe::TensorView<const std::uint8_t, 3, Space>(z13, {p.E, 2 * p.I, w13.groups});
      a.quant.w2_zero = moe::TensorView<const std::uint8_t, 3, Space>(z2, {p.E, p.H, w2.groups});
    }
    if (p.act_order) a.quant.w13_k_order = moe::TensorView<const std::int32_t, 2, Space>(order, {p.E, p.H});
    a.output = moe::TensorView<IO, 2, Space>(out, {p.M, p.H});
    return a;
  }

  std::vector<IO> run_cpu() const {
    std::vector<IO> out(hidden.size(), moe::from_float<IO>(-7.0f));
    using K = moe::Kernel<SpecOf<Q, IO>, moe::cpu::Eigen>;
    const auto a = arguments<K, moe::HostSpace>(hidden.data(), ids.data(), weights.data(), w13.packed.data(),
                                                 w2.packed.data(), w13.scales.data(), w2.scales.data(),
                                                 w13.zeros.data(), w2.zeros.data(), out.data(), k_order.data());
    const moe::Status s = K().run(a);
    EXPECT_TRUE(s.is_ok()) << s.to_string();
    return out;
  }

  template <class Arch = moe::cuda::Sm90, class Edit = NoEdit>
  moe::Status run_cuda(std::vector<IO>* out, Edit edit = {}, moe::cuda::Options options = {}) const {
    DeviceBuffer<IO> dh(hidden), dout(std::vector<IO>(hidden.size(), moe::from_float<IO>(-7.0f)));
    DeviceBuffer<std::int32_t> di(ids);
    DeviceBuffer<float> dw(weights), ds13(w13.scales), ds2(w2.scales);
    DeviceBuffer<std::uint8_t> dc13(w13.packed), dc2(w2.packed), dz13(w13.zeros), dz2(w2.zeros);
    DeviceBuffer<std::int32_t> dorder(k_order.empty() ? std::vector<std::int32_t>(1, 0) : k_order);
    using K = moe::Kernel<SpecOf<Q, IO>, Arch>;
    auto a = arguments<K, moe::DeviceSpace>(dh.data(), di.data(), dw.data(), dc13.data(), dc2.data(), ds13.data(),
                                            ds2.data(), dz13.data(), dz2.data(), dout.data(), dorder.data());
    edit(a);
    const K kernel(options);
    DeviceBuffer<std::byte> ws(std::max<std::size_t>(1, kernel.workspace_bytes(a)));
    const moe::Status s = kernel.run(a, std::span<std::byte>(ws.data(), ws.size()));
    if (cudaDeviceSynchronize() != cudaSuccess) return moe::make_status(moe::StatusCode::kCudaError, "synchronize");
    *out = dout.download();
    return s;
  }
};

class WeightOnlyExpertsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MOE_SKIP_WITHOUT_GPU();
    int major = 0;
    ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
    if (major < 8) GTEST_SKIP() << "the weight-only GEMM needs an sm_80 device (bf16 mma.sync)";
  }
};

std::string where(const char* name, const Shape& s) {
  return std::string(name) + " M=" + std::to_string(s.M) + " E=" + std::to_string(s.E) + " H=" + std::to_string(s.H) +
         " I=" + std::to_string(s.I) + " group=" + std::to_string(s.group) + (s.zero_points ? " zero points" : "") +
         (s.signed_codes ? " signed codes" : "");
}

using moe::cuda::WeightOnlyGemm;

// Each GEMM choice (moe::cuda::WeightOnlyGemm) against the CPU backend. Forcing the mixed-input
// wgmma GEMM or the swap GEMM where it does not apply (f16, 8-bit codes, zero points for the swap
// GEMM, groups of 32 for the mixed-input one, a pre-Hopper device) runs the register GEMM;
// MixedInputWgmmaRunsWhereItApplies and SwapWgmmaRunsWhereItApplies check which cases take them.
// The swap GEMM runs once more with max_k_splits = 1: the small cases here have few tiles, so its
// device choice splits K; unsplit, the tiles store through the epilogue themselves.
template <class Q, class IO = moe::bfloat16>
void expect_cuda_matches_cpu(const Shape& shape, std::uint32_t seed) {
  const Case<Q, IO> c(shape, seed);
  const std::vector<IO> want = c.run_cpu();
  std::vector<float> ref(want.size());
  for (std::size_t i = 0; i < want.size(); ++i) ref[i] = moe::to_float(want[i]);
  struct Choice {
    WeightOnlyGemm gemm;
    int max_k_splits;
  };
  for (const Choice choice : {Choice{WeightOnlyGemm::kAuto, 8}, Choice{WeightOnlyGemm::kRegisters, 8},
                              Choice{WeightOnlyGemm::kMixedInputWgmma, 8}, Choice{WeightOnlyGemm::kSwapWgmma, 8},
                              Choice{WeightOnlyGemm::kSwapWgmma, 1}}) {
    const WeightOnlyGemm gemm = choice.gemm;
    moe::cuda::Options options;
    options.weight_only_gemm = gemm;
    options.max_k_splits = choice.max_k_splits;
    const bool unsplit = choice.max_k_splits == 1;
    std::vector<IO> got;
    const moe::Status s = c.run_cuda(&got, NoEdit{}, options);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    EXPECT_TRUE(moe::testing::close_in_max_and_mean(got, ref, 0.01, 0.002))
        << where(Q::kName.data(), shape) << " gemm " << static_cast<int>(gemm) << (unsplit ? " unsplit" : "");
  }
}

// Decode (one token: 7 of 8 token columns of the n8 tile empty), a hidden size whose last 128-wide
// chunk is short (224, 2880-like), several token passes per expert (M = 300: ~75 rows per
// expert, two n8 tiles per pass), an intermediate of 320 (output tiles end mid-tile), group
// sizes 32 / 64 / 128 / per channel with and without zero points, and groups that do not divide K.
TEST_F(WeightOnlyExpertsTest, W4A16MatchesTheCpuBackend) {
  expect_cuda_matches_cpu<quant::W4A16>({1, 8, 256, 192, 2, 128, false}, 1);
  expect_cuda_matches_cpu<quant::W4A16>({5, 8, 224, 192, 2, 128, true}, 2);   // last group 96 wide
  expect_cuda_matches_cpu<quant::W4A16>({41, 16, 128, 320, 4, 32, true}, 3);
  expect_cuda_matches_cpu<quant::W4A16>({300, 8, 256, 128, 2, 64, false}, 4);
  expect_cuda_matches_cpu<quant::W4A16>({64, 8, 384, 96, 2, 0, true}, 5);     // per channel
  expect_cuda_matches_cpu<quant::W4A16, moe::half>({23, 8, 256, 192, 2, 64, true}, 6);
  expect_cuda_matches_cpu<quant::W4A16>({5, 8, 224, 192, 2, 128, false, false, true}, 10);  // signed codes
}

// Decode shapes for the swap GEMM (sm90_weight_only_swap.cuh; no zero points): K whose last
// 256-wide stage holds one 64-wide box of rows (H = 320) or ends mid-box (H = 224, I = 96), groups of
// 32 (eight per stage), 64, 128 (a last group of 64 where K = 192) and per channel, offset and
// two's-complement codes, an intermediate that ends mid-tile (I = 320: GEMM1's gated tiles of 64),
// a hidden size that ends mid-tile for GEMM2 (H = 224 of a 128-row tile), act-order, one token,
// and each token tile: 8 (up to 4 rows per expert), 16 (M = 24, top-2 of 8: ~6 rows each) and 32,
// which an expert fills several times (M = 96, top-4 of 8: ~48 rows each).
TEST_F(WeightOnlyExpertsTest, SwapDecodeShapesMatchTheCpuBackend) {
  expect_cuda_matches_cpu<quant::W4A16>({1, 8, 320, 192, 2, 128, false}, 61);
  expect_cuda_matches_cpu<quant::W4A16>({3, 8, 320, 320, 2, 32, false, false, true}, 62);
  expect_cuda_matches_cpu<quant::W4A16>({8, 16, 224, 96, 4, 0, false}, 63);  // per channel
  expect_cuda_matches_cpu<quant::W4A16>({5, 8, 512, 192, 2, 64, false, false, true}, 64);
  expect_cuda_matches_cpu<quant::W4A16>({7, 8, 256, 192, 2, 128, false, true, true}, 65);  // act-order
  expect_cuda_matches_cpu<quant::W4A16>({96, 8, 256, 128, 4, 128, false, false, true}, 66);
  expect_cuda_matches_cpu<quant::W4A16>({24, 8, 256, 192, 2, 64, false, false, true}, 67);
}

TEST_F(WeightOnlyExpertsTest, W8A16MatchesTheCpuBackend) {
  expect_cuda_matches_cpu<quant::W8A16>({1, 8, 256, 192, 2, 128, true}, 7);
  expect_cuda_matches_cpu<quant::W8A16>({300, 8, 224, 320, 2, 32, false}, 8);
  expect_cuda_matches_cpu<quant::W8A16, moe::half>({23, 8, 256, 192, 2, 0, true}, 9);
  expect_cuda_matches_cpu<quant::W8A16>({41, 8, 256, 192, 2, 64, false, false, true}, 11);  // signed codes
}

// Prefill shapes for the mixed-input wgmma GEMM (sm90_weight_only_gemm.h): ~75-150 rows per expert
// (a 128-token tile partly empty), a last scale group of 64 where K = 192 (group 128), an
// intermediate of 320 (weight tiles of GEMM2 end mid-tile), zero points, per channel, act-order,
// and one token (empty experts: zero-row groups).
TEST_F(WeightOnlyExpertsTest, PrefillShapesMatchTheCpuBackend) {
  expect_cuda_matches_cpu<quant::W4A16>({300, 8, 256, 192, 2, 128, false}, 41);
  expect_cuda_matches_cpu<quant::W4A16>({200, 4, 384, 320, 2, 64, true}, 42);
  expect_cuda_matches_cpu<quant::W4A16>({150, 8, 256, 128, 4, 0, true}, 43);
  expect_cuda_matches_cpu<quant::W4A16>({300, 8, 256, 192, 2, 128, true, true}, 44);
  expect_cuda_matches_cpu<quant::W4A16>({1, 8, 256, 192, 2, 128, false}, 45);
  // Two's-complement codes: the bf16-scale conversion, every tile (128x32, 256x128, 128x256 in
  // clusters of two).
  expect_cuda_matches_cpu<quant::W4A16>({300, 8, 256, 192, 2, 128, false, false, true}, 46);
  expect_cuda_matches_cpu<quant::W4A16>({1200, 4, 384, 320, 2, 64, false, false, true}, 47);
  expect_cuda_matches_cpu<quant::W4A16>({100, 8, 256, 128, 2, 0, false, true, true}, 48);  // per channel, act-order
}

// The plan of a Hopper experts stage for weights of shape `p` (seed 50: sizes only matter here),
// with zero points where p.zero_points, two's-complement codes where p.signed_codes, and an
// expert bias on w13 where `biased`.
template <class Q, class IO>
auto plan_for(const Shape& p, WeightOnlyGemm gemm, Index live_rows, bool biased) {
  using Stage = moe::cuda::ExpertsStage<moe::Experts<moe::SiluAndMul, Q, IO>, IO, moe::cuda::Sm90>;
  const Case<Q, IO> c(p, 50);
  DeviceBuffer<std::uint8_t> c13(c.w13.packed), c2(c.w2.packed);
  DeviceBuffer<float> s13(c.w13.scales), s2(c.w2.scales);
  DeviceBuffer<std::uint8_t> z13(std::vector<std::uint8_t>(c.w13.scales.size())), z2(std::vector<std::uint8_t>(c.w2.scales.size()));
  DeviceBuffer<IO> b13(std::vector<IO>(static_cast<std::size_t>(p.E * 2 * p.I)));
  typename Stage::Weights w;
  constexpr Index kPack = 8 / Q::kBits;
  w.w13 = moe::DeviceView<const std::uint8_t, 3>(c13.data(), {p.E, 2 * p.I, p.H / kPack});
  w.w2 = moe::DeviceView<const std::uint8_t, 3>(c2.data(), {p.E, p.H, p.I / kPack});
  w.quant.group_size = p.group;
  w.quant.signed_codes = p.signed_codes;
  w.quant.w13_scale = moe::DeviceView<const float, 3>(s13.data(), {p.E, 2 * p.I, c.w13.groups});
  w.quant.w2_scale = moe::DeviceView<const float, 3>(s2.data(), {p.E, p.H, c.w2.groups});
  if (p.zero_points) {
    w.quant.w13_zero = moe::DeviceView<const std::uint8_t, 3>(z13.data(), {p.E, 2 * p.I, c.w13.groups});
    w.quant.w2_zero = moe::DeviceView<const std::uint8_t, 3>(z2.data(), {p.E, p.H, c.w2.groups});
  }
  if (biased) w.w13_bias = moe::DeviceView<const IO, 2>(b13.data(), {p.E, 2 * p.I});
  moe::cuda::Options options;
  options.weight_only_gemm = gemm;
  return Stage(options).plan(w, live_rows, live_rows);
}

// Which GEMM the plan picks: kAuto takes the mixed-input wgmma GEMM on a Hopper tag with bf16 rows
// and 4-bit codes from weight_only_swap_rows_per_expert rows per expert where the swap GEMM takes
// the rest, else from weight_only_wgmma_rows_per_expert (fewer for two's-complement codes; groups of
// 192 here, which the swap GEMM does not take), with or without expert biases (its epilogue adds
// them), and never for 8-bit codes, f16 rows or groups of 32; a forced choice still refuses what
// the GEMM cannot run.
TEST_F(WeightOnlyExpertsTest, MixedInputWgmmaRunsWhereItApplies) {
  const auto picks = [](auto q, auto io, Shape p, WeightOnlyGemm gemm, Index live_rows, bool biased = false,
                        bool signed_codes = false) {
    p.signed_codes = signed_codes;
    p.zero_points = false;  // none attached here: zero points rule the swap GEMM out and move the switch
    return plan_for<decltype(q), decltype(io)>(p, gemm, live_rows, biased).weight_only_wgmma;
  };
  int major = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
  if (major != 9) GTEST_SKIP() << "the mixed-input wgmma GEMM is sm_90a's";
  const Shape g128{0, 8, 256, 192, 2, 128, false};
  const Shape g192{0, 8, 256, 192, 2, 192, false};
  const quant::W4A16 w4;
  const moe::bfloat16 bf16;
  const auto threshold = static_cast<Index>(8 * moe::cuda::weight_only_wgmma_rows_per_expert(false));
  const auto signed_threshold = static_cast<Index>(8 * moe::cuda::weight_only_wgmma_rows_per_expert(true));
  const auto swap_threshold = static_cast<Index>(8 * moe::cuda::weight_only_swap_rows_per_expert);
  ASSERT_LT(signed_threshold, threshold);
  EXPECT_TRUE(picks(w4, bf16, g192, WeightOnlyGemm::kAuto, threshold));
  EXPECT_FALSE(picks(w4, bf16, g192, WeightOnlyGemm::kAuto, threshold - 1));
  EXPECT_TRUE(picks(w4, bf16, g192, WeightOnlyGemm::kAuto, signed_threshold, false, true));
  EXPECT_FALSE(picks(w4, bf16, g192, WeightOnlyGemm::kAuto, signed_threshold - 1, false, true));
  EXPECT_FALSE(picks(w4, bf16, g192, WeightOnlyGemm::kAuto, signed_threshold, false, false));
  EXPECT_TRUE(picks(w4, bf16, g128, WeightOnlyGemm::kAuto, swap_threshold, false, true));
  EXPECT_FALSE(picks(w4, bf16, g128, WeightOnlyGemm::kAuto, swap_threshold - 1, false, true));
  EXPECT_TRUE(picks(w4, bf16, g128, WeightOnlyGemm::kAuto, swap_threshold));
  EXPECT_FALSE(picks(w4, bf16, g128, WeightOnlyGemm::kAuto, swap_threshold - 1));
  EXPECT_TRUE(picks(w4, bf16, g128, WeightOnlyGemm::kMixedInputWgmma, 1));
  EXPECT_FALSE(picks(w4, bf16, g128, WeightOnlyGemm::kRegisters, 8 * 1000));
  EXPECT_TRUE(picks(w4, bf16, {0, 8, 256, 192, 2, 0, true}, WeightOnlyGemm::kAuto, 8 * 100));  // per channel
  EXPECT_FALSE(picks(w4, bf16, {0, 8, 256, 192, 2, 32, true}, WeightOnlyGemm::kMixedInputWgmma, 8 * 100));
  EXPECT_TRUE(picks(w4, bf16, g128, WeightOnlyGemm::kMixedInputWgmma, 8 * 100, true));  // expert biases
  EXPECT_TRUE(picks(w4, bf16, g128, WeightOnlyGemm::kAuto, swap_threshold, true));
  EXPECT_FALSE(picks(w4, moe::half(), g128, WeightOnlyGemm::kMixedInputWgmma, 8 * 100));
  EXPECT_FALSE(picks(quant::W8A16(), bf16, g128, WeightOnlyGemm::kMixedInputWgmma, 8 * 100));
}

// Which decode cases the swap GEMM takes: kAuto on a Hopper tag with bf16 rows and 4-bit codes
// without zero points below the mixed-input GEMM's rows per expert, and kSwapWgmma, with or
// without expert biases; not with zero points, f16 rows, 8-bit codes, or where the mixed-input GEMM
// takes the rows (MXFP4: BiasedGatedExpertsInBothLayoutsMatchTheCpuBackend).
TEST_F(WeightOnlyExpertsTest, SwapWgmmaRunsWhereItApplies) {
  const auto picks = [](auto q, auto io, const Shape& p, WeightOnlyGemm gemm, Index live_rows, bool biased = false) {
    return plan_for<decltype(q), decltype(io)>(p, gemm, live_rows, biased).weight_only_swap;
  };
  int major = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
  if (major != 9) GTEST_SKIP() << "the swap GEMM is sm_90a's";
  const Shape g128{0, 8, 256, 192, 2, 128, false, false, true};
  const quant::W4A16 w4;
  const moe::bfloat16 bf16;
  const auto wgmma_rows = static_cast<Index>(8 * moe::cuda::weight_only_swap_rows_per_expert);
  EXPECT_TRUE(picks(w4, bf16, g128, WeightOnlyGemm::kAuto, 1));
  EXPECT_TRUE(picks(w4, bf16, g128, WeightOnlyGemm::kAuto, wgmma_rows - 1));
  EXPECT_FALSE(picks(w4, bf16, g128, WeightOnlyGemm::kAuto, wgmma_rows));  // the mixed-input GEMM's
  EXPECT_TRUE(picks(w4, bf16, g128, WeightOnlyGemm::kSwapWgmma, 8 * 1000));
  EXPECT_TRUE(picks(w4, bf16, {0, 8, 256, 192, 2, 32, false}, WeightOnlyGemm::kAuto, 8));      // offset codes, groups of 32
  EXPECT_TRUE(picks(w4, bf16, {0, 8, 256, 192, 2, 0, false}, WeightOnlyGemm::kSwapWgmma, 8));  // per channel
  EXPECT_FALSE(picks(w4, bf16, {0, 8, 256, 192, 2, 128, true}, WeightOnlyGemm::kSwapWgmma, 8));  // zero points
  EXPECT_FALSE(picks(w4, bf16, {0, 8, 256, 192, 2, 96, false}, WeightOnlyGemm::kSwapWgmma, 8));  // groups of 96
  EXPECT_TRUE(picks(w4, bf16, g128, WeightOnlyGemm::kSwapWgmma, 8, true));  // expert biases
  EXPECT_FALSE(picks(w4, bf16, g128, WeightOnlyGemm::kRegisters, 8));
  EXPECT_FALSE(picks(w4, bf16, g128, WeightOnlyGemm::kMixedInputWgmma, 8));
  EXPECT_FALSE(picks(w4, moe::half(), g128, WeightOnlyGemm::kSwapWgmma, 8));
  EXPECT_FALSE(picks(quant::W8A16(), bf16, g128, WeightOnlyGemm::kSwapWgmma, 8));
}

// The mixed-input GEMM entry point alone (moe/cuda/gemm/sm90_weight_only_gemm.h) against a host
// product of the rows and the weights dequantized as moe/quant/weight_only.h specifies: three
// experts with 0, a few and many rows (tiles of 32, 128 and 256 tokens), groups of 64, 128 and per
// channel, with and without zero points, a K whose last group is short.
TEST_F(WeightOnlyExpertsTest, Sm90WeightOnlyGemmMatchesTheDequantizedProduct) {
  int major = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
  if (major != 9) GTEST_SKIP() << "the mixed-input wgmma GEMM is sm_90a's";
  using IO = moe::bfloat16;
  using Q = quant::W4A16;
  struct Config {
    Index n, k, group;
    bool zero_points;
    std::vector<Index> rows;  // per expert
    bool signed_codes = false;
  };
  for (const Config& cfg : {Config{256, 256, 128, false, {0, 3, 200}}, Config{128, 192, 128, true, {20, 0, 1}},
                            Config{384, 256, 64, true, {60, 64, 33}}, Config{256, 320, 0, false, {130, 5, 0}},
                            Config{256, 256, 128, false, {0, 3, 300}, true}, Config{256, 320, 0, false, {130, 5, 0}, true},
                            Config{384, 192, 64, false, {60, 640, 33}, true}}) {
    const Index E = static_cast<Index>(cfg.rows.size());
    auto w = moe::testing::quantize<4>(E, cfg.n, cfg.k, cfg.group, cfg.zero_points, 60);
    for (auto& b : w.packed) b ^= cfg.signed_codes ? Q::kSignFlipByte : 0;  // the same weights
    std::vector<Index> begin, count;
    Index R = 0;
    for (const Index r : cfg.rows) {
      begin.push_back(R);
      count.push_back(r);
      R += r;
    }
    moe::testing::Random random(61);
    const std::vector<IO> x = random.normal_vector<IO>(static_cast<std::size_t>(R * cfg.k));
    // The reference: float products of IO values, summed in double.
    std::vector<float> want(static_cast<std::size_t>(R * cfg.n));
    for (Index e = 0; e < E; ++e) {
      for (Index c = 0; c < cfg.n; ++c) {
        std::vector<float> wrow(static_cast<std::size_t>(cfg.k));
        for (Index kk = 0; kk < cfg.k; ++kk) {
          const Index g = cfg.group > 0 ? kk / cfg.group : 0, at = (e * cfg.n + c) * w.groups + g;
          const unsigned zero = cfg.zero_points ? w.zeros[static_cast<std::size_t>(at)] : Q::kDefaultZero;
          wrow[static_cast<std::size_t>(kk)] = Q::dequantize<IO>(w.codes[static_cast<std::size_t>((e * cfg.n + c) * cfg.k + kk)],
                                                                 zero, w.scales[static_cast<std::size_t>(at)]);
        }
        for (Index r = begin[e]; r < begin[e] + count[e]; ++r) {
          double sum = 0;
          for (Index kk = 0; kk < cfg.k; ++kk) sum += double(moe::to_float(x[r * cfg.k + kk])) * wrow[kk];
          want[static_cast<std::size_t>(r * cfg.n + c)] = static_cast<float>(sum);
        }
      }
    }
    DeviceBuffer<IO> dx(x), dd(std::vector<IO>(static_cast<std::size_t>(std::max<Index>(R, 1) * cfg.n), IO(-7.0f)));
    DeviceBuffer<Index> db(begin), dc(count);
    DeviceBuffer<std::uint8_t> dw(w.packed), dz(w.zeros.empty() ? std::vector<std::uint8_t>(1) : w.zeros);
    DeviceBuffer<float> ds(w.scales);
    moe::cuda::gemm::Sm90WeightOnlyGemmArgs a;
    a.num_experts = static_cast<int>(E);
    a.n = cfg.n;
    a.k = cfg.k;
    a.a = dx.data();
    a.lda = cfg.k;
    a.seg_begin = db.data();
    a.seg_count = dc.data();
    a.w = dw.data();
    a.w_expert_stride = cfg.n * cfg.k / 2;
    a.ldw = cfg.k / 2;
    a.scale = ds.data();
    a.zero = cfg.zero_points ? dz.data() : nullptr;
    a.signed_codes = cfg.signed_codes;
    a.group_size = cfg.group;
    a.d = dd.data();
    a.ldd = cfg.n;
    for (const Index rows_per_expert : {Index{16}, Index{100}, Index{300}}) {  // tiles 128x32, 256x128, 128x256 c2
      a.rows_per_expert = rows_per_expert;
      DeviceBuffer<std::byte> ws(moe::cuda::gemm::sm90_weight_only_gemm_workspace_bytes(
          a.num_experts, a.n, a.k, a.group_size, rows_per_expert, a.codes()));
      const moe::Status st = moe::cuda::gemm::sm90_weight_only_gemm(a, std::span<std::byte>(ws.data(), ws.size()), nullptr);
      ASSERT_TRUE(st.is_ok()) << st.to_string();
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<IO> got = dd.download();
      double worst = 0, scale = 1e-6;
      for (std::size_t i = 0; i < want.size(); ++i) {
        worst = std::max(worst, std::abs(double(moe::to_float(got[i])) - want[i]));
        scale = std::max(scale, std::abs(double(want[i])));
      }
      // One bf16 rounding of the output (2^-8 relative) plus fp32 sums in another order.
      EXPECT_LE(worst, 0.01 * scale) << "n=" << cfg.n << " k=" << cfg.k << " group=" << cfg.group
                                     << (cfg.zero_points ? " zero points" : "")
                                     << (cfg.signed_codes ? " signed codes" : "") << " tile for " << rows_per_expert
                                     << " rows: worst " << worst << " of " << scale;
    }
  }
}

// GPTQ act-order: GEMM1's input is permuted per expert on the device before the GEMM (decode, one
// pass, several passes per expert).
TEST_F(WeightOnlyExpertsTest, ActOrderMatchesTheCpuBackend) {
  expect_cuda_matches_cpu<quant::W4A16>({1, 8, 256, 192, 2, 128, false, true}, 21);
  expect_cuda_matches_cpu<quant::W4A16>({41, 16, 224, 320, 4, 32, true, true}, 22);
  expect_cuda_matches_cpu<quant::W8A16, moe::half>({300, 8, 256, 128, 2, 64, false, true}, 23);
}

// Gated experts with biases, in both w13 layouts (SiluAndMul: [gate; up]; gpt-oss's SwigluOai:
// interleaved rows), on MXFP4 (E2M1 codes, E8M0 scales; moe/quant/mxfp4.h) and W4A16 codes (group
// 64, with or without zero points): each GEMM choice against the CPU backend
// (testing/cpu/quant_weight_only_test.cc checks the CPU's MXFP4 bit for bit against the
// unquantized kernel on independently dequantized weights); I = 32 gives w2 rows of one MXFP4 group
// (gpt-oss's layer test found the swap GEMM misreading that slot). MXFP4's scales include E8M0 0 (2^-127,
// a subnormal) and scales of 2^2 .. 2^5, past what one multiply by 2^(s - 1) could hold in bf16.
template <class Activation, class Q>
void expect_biased_experts_match(Index M, std::uint32_t seed, bool zero_points = true, Index I = 192) {
  using IO = moe::bfloat16;
  const Index E = 8, H = 256;
  const int top_k = 2;
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<IO> hidden(static_cast<std::size_t>(M * H)), b13(static_cast<std::size_t>(E * 2 * I)), b2(static_cast<std::size_t>(E * H));
  for (auto& v : hidden) v = IO(nd(gen));
  for (auto& v : b13) v = IO(0.1f * nd(gen));
  for (auto& v : b2) v = IO(0.1f * nd(gen));
  moe::testing::Random random(seed);
  const std::vector<std::int32_t> ids = random.distinct_ids(static_cast<std::size_t>(M), static_cast<int>(E), top_k);
  const std::vector<float> weights = random.uniform_vector<float>(ids.size(), 0.25f, 0.75f);
  constexpr bool kFp4 = std::is_same_v<Q, quant::Mxfp4>;
  // Codes and scales: MXFP4's, or W4A16's (group 64, zero points).
  moe::testing::Mxfp4Matrix f13 = moe::testing::mxfp4_matrix(E, 2 * I, H, seed + 1), f2 = moe::testing::mxfp4_matrix(E, H, I, seed + 2);
  for (auto* f : {&f13, &f2}) {
    for (std::size_t i = 0; i < f->scales.size(); ++i) {
      if (i % 97 == 5) f->scales[i] = 0;
      if (i % 89 == 7) f->scales[i] = static_cast<std::uint8_t>(129 + i % 4);
    }
  }
  const auto i13 = moe::testing::quantize<4>(E, 2 * I, H, 64, true, seed + 1), i2 = moe::testing::quantize<4>(E, H, I, 64, true, seed + 2);
  const auto& c13 = kFp4 ? f13.codes : i13.packed;
  const auto& c2 = kFp4 ? f2.codes : i2.packed;
  using Spec = moe::Spec<moe::routing::Precomputed, moe::StandardPrepareFinalize<>, moe::Experts<Activation, Q, IO>>;
  const auto arguments = [&]<class K, class Space>(const IO* h, const std::int32_t* id, const float* wt, const std::uint8_t* w13,
                                                   const std::uint8_t* w2, const void* s13, const void* s2,
                                                   const std::uint8_t* z13, const std::uint8_t* z2, const IO* bias13,
                                                   const IO* bias2, IO* out) {
    typename K::Arguments a;
    a.hidden_states = moe::TensorView<const IO, 2, Space>(h, {M, H});
    a.topk_ids = moe::TensorView<const std::int32_t, 2, Space>(id, {M, top_k});
    a.topk_weights = moe::TensorView<const float, 2, Space>(wt, {M, top_k});
    a.top_k = top_k;
    a.w13 = moe::TensorView<const std::uint8_t, 3, Space>(w13, {E, 2 * I, H / 2});
    a.w2 = moe::TensorView<const std::uint8_t, 3, Space>(w2, {E, H, I / 2});
    if constexpr (kFp4) {
      a.quant.w13_scale = moe::TensorView<const std::uint8_t, 3, Space>(static_cast<const std::uint8_t*>(s13), {E, 2 * I, H / 32});
      a.quant.w2_scale = moe::TensorView<const std::uint8_t, 3, Space>(static_cast<const std::uint8_t*>(s2), {E, H, I / 32});
    } else {
      a.quant.group_size = 64;
      a.quant.w13_scale = moe::TensorView<const float, 3, Space>(static_cast<const float*>(s13), {E, 2 * I, H / 64});
      a.quant.w2_scale = moe::TensorView<const float, 3, Space>(static_cast<const float*>(s2), {E, H, I / 64});
      if (zero_points) {
        a.quant.w13_zero = moe::TensorView<const std::uint8_t, 3, Space>(z13, {E, 2 * I, H / 64});
        a.quant.w2_zero = moe::TensorView<const std::uint8_t, 3, Space>(z2, {E, H, I / 64});
      }
    }
    a.w13_bias = moe::TensorView<const IO, 2, Space>(bias13, {E, 2 * I});
    a.w2_bias = moe::TensorView<const IO, 2, Space>(bias2, {E, H});
    a.output = moe::TensorView<IO, 2, Space>(out, {M, H});
    return a;
  };
  const void* hs13 = kFp4 ? static_cast<const void*>(f13.scales.data()) : i13.scales.data();
  const void* hs2 = kFp4 ? static_cast<const void*>(f2.scales.data()) : i2.scales.data();
  std::vector<IO> want(hidden.size(), IO(-7.0f));
  using CpuK = moe::Kernel<Spec, moe::cpu::Eigen>;
  const moe::Status cs = CpuK().run(arguments.template operator()<CpuK, moe::HostSpace>(
      hidden.data(), ids.data(), weights.data(), c13.data(), c2.data(), hs13, hs2, i13.zeros.data(), i2.zeros.data(),
      b13.data(), b2.data(), want.data()));
  ASSERT_TRUE(cs.is_ok()) << cs.to_string();
  DeviceBuffer<IO> dh(hidden), db13(b13), db2(b2), dout(std::vector<IO>(hidden.size(), IO(-7.0f)));
  DeviceBuffer<std::int32_t> di(ids);
  DeviceBuffer<float> dw(weights), fs13(i13.scales), fs2(i2.scales);
  DeviceBuffer<std::uint8_t> dc13(c13), dc2(c2), es13(f13.scales), es2(f2.scales), dz13(i13.zeros), dz2(i2.zeros);
  const void* ds13 = kFp4 ? static_cast<const void*>(es13.data()) : fs13.data();
  const void* ds2 = kFp4 ? static_cast<const void*>(es2.data()) : fs2.data();
  using CudaK = moe::Kernel<Spec, moe::cuda::Sm90>;
  const auto a = arguments.template operator()<CudaK, moe::DeviceSpace>(dh.data(), di.data(), dw.data(), dc13.data(), dc2.data(),
                                                                       ds13, ds2, dz13.data(), dz2.data(), db13.data(),
                                                                       db2.data(), dout.data());
  std::vector<float> ref(want.size());
  for (std::size_t i = 0; i < want.size(); ++i) ref[i] = moe::to_float(want[i]);
  {  // Forced, the swap GEMM takes these weights on an sm_90 device unless zero points rule it out,
     // and the mixed-input GEMM takes the integer codes (MXFP4's groups of 32 are narrower than its K
     // tile).
    using Stage = moe::cuda::ExpertsStage<moe::Experts<Activation, Q, IO>, IO, moe::cuda::Sm90>;
    typename Stage::Weights sw;
    sw.w13 = a.w13;
    sw.w2 = a.w2;
    sw.quant = a.quant;
    sw.w13_bias = a.w13_bias;
    sw.w2_bias = a.w2_bias;
    moe::cuda::Options forced;
    forced.weight_only_gemm = WeightOnlyGemm::kSwapWgmma;
    int major = 0;
    ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
    EXPECT_EQ(Stage(forced).plan(sw, M * top_k, M * top_k).weight_only_swap, major == 9 && (kFp4 || !zero_points))
        << Activation::kName << " " << Q::kName;
    forced.weight_only_gemm = WeightOnlyGemm::kMixedInputWgmma;
    EXPECT_EQ(Stage(forced).plan(sw, M * top_k, M * top_k).weight_only_wgmma, major == 9 && !kFp4)
        << Activation::kName << " " << Q::kName;
  }
  // The swap GEMM takes MXFP4 and codes without zero points (split K and not), the mixed-input GEMM
  // the integer codes (the bias in its epilogue); elsewhere forcing either runs the register GEMM.
  for (const auto& [gemm, max_k_splits] : {std::pair{WeightOnlyGemm::kAuto, 8}, std::pair{WeightOnlyGemm::kRegisters, 8},
                                           std::pair{WeightOnlyGemm::kSwapWgmma, 8}, std::pair{WeightOnlyGemm::kSwapWgmma, 1},
                                           std::pair{WeightOnlyGemm::kMixedInputWgmma, 8}}) {
    moe::cuda::Options options;
    options.weight_only_gemm = gemm;
    options.max_k_splits = max_k_splits;
    const CudaK kernel(options);
    ASSERT_EQ(cudaMemset(dout.data(), 0xFF, hidden.size() * sizeof(IO)), cudaSuccess);
    DeviceBuffer<std::byte> ws(std::max<std::size_t>(1, kernel.workspace_bytes(a)));
    const moe::Status gs = kernel.run(a, std::span<std::byte>(ws.data(), ws.size()));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_TRUE(gs.is_ok()) << gs.to_string();
    const std::vector<IO> got = dout.download();
    EXPECT_TRUE(moe::testing::close_in_max_and_mean(got, ref, 0.01, 0.002))
        << Activation::kName << " " << Q::kName << " M=" << M << (zero_points ? "" : " no zero points") << " gemm "
        << static_cast<int>(gemm) << " max_k_splits " << max_k_splits;
  }
}

// M = 300 and 500 (75 and 125 rows per expert) take MXFP4's 64- and 128-token swap tiles.
TEST_F(WeightOnlyExpertsTest, BiasedGatedExpertsInBothLayoutsMatchTheCpuBackend) {
  for (const Index M : {1, 37, 300, 500}) {
    expect_biased_experts_match<moe::SwigluOai, quant::Mxfp4>(M, 31);
    expect_biased_experts_match<moe::SiluAndMul, quant::Mxfp4>(M, 32);
    expect_biased_experts_match<moe::SwigluOai, quant::W4A16>(M, 33);
    expect_biased_experts_match<moe::SwigluOai, quant::W4A16>(M, 34, false);
    expect_biased_experts_match<moe::SiluAndMul, quant::W4A16>(M, 35, false);
    // One E8M0 group per row of w2 (I = 32): the swap GEMM's scale slot keeps its eight groups.
    expect_biased_experts_match<moe::SwigluOai, quant::Mxfp4>(M, 36, true, 32);
  }
}

// The same forward on the Sm80CpAsync tag (what an A100 user gets) gives the same bits: the
// weight-only GEMM is one kernel on both.
TEST_F(WeightOnlyExpertsTest, Sm80TagGivesTheSameBits) {
  const Case<quant::W4A16, moe::bfloat16> c({37, 8, 256, 192, 2, 128, true}, 10);
  std::vector<moe::bfloat16> a, b;
  ASSERT_TRUE(c.run_cuda<moe::cuda::Sm90>(&a).is_ok());
  ASSERT_TRUE(c.run_cuda<moe::cuda::Sm80>(&b).is_ok());
  EXPECT_TRUE(moe::testing::BitwiseEqual(a, b));
}

// An all-zero token gives exact zeros, a token of tiny values finite outputs, and two runs give the
// same bits (the K slices are added in a fixed order; no atomics).
TEST_F(WeightOnlyExpertsTest, ZeroRowsAreExactAndRerunsBitIdentical) {
  Case<quant::W4A16, moe::bfloat16> c({7, 8, 256, 192, 2, 64, true}, 11);
  for (Index k = 0; k < c.p.H; ++k) {
    c.hidden[k] = moe::bfloat16(0.0f);
    c.hidden[c.p.H + k] = moe::bfloat16(1e-30f * static_cast<float>(k % 7 - 3));
  }
  std::vector<moe::bfloat16> first, second;
  ASSERT_TRUE(c.run_cuda(&first).is_ok());
  ASSERT_TRUE(c.run_cuda(&second).is_ok());
  for (Index h = 0; h < c.p.H; ++h) EXPECT_EQ(moe::to_float(first[h]), 0.0f) << "column " << h;
  for (const moe::bfloat16& v : first) ASSERT_TRUE(std::isfinite(moe::to_float(v)));
  EXPECT_TRUE(moe::testing::BitwiseEqual(first, second));
}

// Expert parallelism on a packed checkpoint: ranks own slices of the codes, scales and zero points
// (experts are their first dimension) and run cuda::ExpertsStage (moe/stages.h) on the rows
// dispatched to them; the combine gives the single-rank forward's bits (every token column of a
// tile is its own sum, in the same order whatever the other rows).
TEST_F(WeightOnlyExpertsTest, SimulatedExpertParallelMatchesTheSingleRankForward) {
  using Q = quant::W4A16;
  using IO = moe::bfloat16;
  const Case<Q, IO> c({37, 8, 256, 192, 2, 64, true}, 12);
  std::vector<IO> single;
  ASSERT_TRUE(c.run_cuda(&single).is_ok());
  using Stage = moe::cuda::ExpertsStage<moe::Experts<moe::SiluAndMul, Q, IO>, IO, moe::cuda::Sm90>;
  const Stage stage;
  const Index E = c.p.E, H = c.p.H, I = c.p.I, G13 = c.w13.groups, G2 = c.w2.groups;
  DeviceBuffer<std::uint8_t> c13(c.w13.packed), c2(c.w2.packed), z13(c.w13.zeros), z2(c.w2.zeros);
  DeviceBuffer<float> s13(c.w13.scales), s2(c.w2.scales);
  for (const int ranks : {2, 4}) {
    const Index E_local = E / ranks;
    moe::testing::ep::RankExperts<IO> run_rank = [&](int r, const moe::testing::ep::RankRows<IO>& in,
                                                     std::vector<IO>* result) {
      const Index R = E_local * in.capacity, e0 = r * E_local;
      DeviceBuffer<IO> rows(in.rows), rows_out(in.rows.size());
      DeviceBuffer<Index> begin(in.begin), count(in.count);
      typename Stage::Weights w;
      w.w13 = moe::DeviceView<const std::uint8_t, 3>(c13.data() + e0 * 2 * I * H / 2, {E_local, 2 * I, H / 2});
      w.w2 = moe::DeviceView<const std::uint8_t, 3>(c2.data() + e0 * H * I / 2, {E_local, H, I / 2});
      w.quant.group_size = c.p.group;
      w.quant.w13_scale = moe::DeviceView<const float, 3>(s13.data() + e0 * 2 * I * G13, {E_local, 2 * I, G13});
      w.quant.w2_scale = moe::DeviceView<const float, 3>(s2.data() + e0 * H * G2, {E_local, H, G2});
      w.quant.w13_zero = moe::DeviceView<const std::uint8_t, 3>(z13.data() + e0 * 2 * I * G13, {E_local, 2 * I, G13});
      w.quant.w2_zero = moe::DeviceView<const std::uint8_t, 3>(z2.data() + e0 * H * G2, {E_local, H, G2});
      typename Stage::Rows rw;
      rw.input = moe::DeviceView<const IO, 2>(rows.data(), {R, H});
      rw.output = moe::DeviceView<IO, 2>(rows_out.data(), {R, H});
      rw.seg_begin = moe::DeviceView<const Index, 1>(begin.data(), {E_local});
      rw.seg_count = moe::DeviceView<const Index, 1>(count.data(), {E_local});
      rw.max_rows_per_expert = in.capacity;
      DeviceBuffer<std::byte> ws(std::max<std::size_t>(1, stage.workspace_bytes(w, rw)));
      MOE_RETURN_IF_ERROR(stage.run(w, rw, std::span<std::byte>(ws.data(), ws.size())));
      if (cudaDeviceSynchronize() != cudaSuccess) return moe::make_status(moe::StatusCode::kCudaError, "rank ", r);
      *result = rows_out.download();
      return moe::Status::ok();
    };
    std::vector<IO> ep;
    const moe::Status s =
        moe::testing::ep::forward<IO>(c.hidden, c.p.M, H, c.ids, c.weights, c.p.top_k, E, ranks, run_rank, &ep);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    EXPECT_TRUE(moe::testing::BitwiseEqual(ep, single)) << "ranks=" << ranks;
  }
}

// A scale tensor of the wrong shape is named with both shapes and nothing is written; a hidden
// size the GEMM cannot take is refused with the reason, before any write.
TEST_F(WeightOnlyExpertsTest, BadScalesAndShapesAreRefusedBeforeAnyWrite) {
  using Q = quant::W4A16;
  const Case<Q, moe::bfloat16> c({5, 8, 256, 192, 2, 128, true}, 13);
  std::vector<moe::bfloat16> out;
  const moe::Status s = c.run_cuda(&out, [](auto& a) {
    a.quant.w2_scale = moe::DeviceView<const float, 3>(a.quant.w2_scale.data(), {8, 256, 1});
  });
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("quant.w2_scale"), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("[8, 256, 2]"), std::string::npos) << s.to_string();
  for (const moe::bfloat16& v : out) ASSERT_EQ(moe::to_float(v), -7.0f) << "output written on error";

  const Case<Q, moe::bfloat16> odd({3, 4, 200, 64, 2, 0, false}, 14);  // H = 200: not a multiple of 32
  const moe::Status refused = odd.run_cuda(&out);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.message().find("multiples of 32"), std::string::npos) << refused.to_string();
  for (const moe::bfloat16& v : out) ASSERT_EQ(moe::to_float(v), -7.0f) << "output written on error";
}

}  // namespace
