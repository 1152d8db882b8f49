// The W8A8 schemes (moe/quant/w8a8.h) on the CUDA backend against the CPU backend, whose arithmetic
// testing/cpu/quant_w8a8_test.cc checks against an independent reference. Same checkpoint, same
// routing; the device quantizes rows bit-identically (the same amax, scale and rounding), so the
// two differ only in the fp32 summation order inside the GEMMs.
//
// Tolerance (written out where it is checked). INT8 sums are exact on both backends (int32), so
// the backends differ only where a GEMM1 sum lands next to a bf16 rounding boundary: the
// intermediate then quantizes to the neighbouring code, which moves one term of GEMM2 by one code
// step. The bound is 2% of the largest output and 0.3% of the mean magnitude, as the CPU test
// allows against its reference. FP8 adds the tensor cores' own accumulation: Hopper's FP8 wgmma
// adds the products of one 128-wide K block with about 14 bits of precision (DeepSeek-V3 report,
// section 3.3.2; the kernels promote each block's sum into fp32, as DeepGEMM does, but for
// per-tensor scales, whose sums stay in the accumulator across K: their own test below), so GEMM1
// sums differ from the CPU's fp32 sums by ~1e-4 relative, many more intermediates round to the other
// bf16 neighbour, and a few to the other FP8 code (12.5% steps): measured on the H200, 0.37-0.47%
// mean error on the worst shapes; the FP8 mean bound is 1%. A scale read from the wrong block,
// row, expert or split is off by 2-16x (the weights' magnitude changes by powers of two across
// blocks) and breaks the 2% maximum bound by far.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/cpu/kernel.h"
#include "moe/cuda/kernel.cuh"
#include "moe/quant/w8a8.h"
#include "testing/ep/simulated_ep.h"
#include "testing/lib/gpu.h"

namespace {

using moe::Index;
using moe::bfloat16;
using moe::testing::DeviceBuffer;
namespace quant = moe::quant;

template <class Q>
using SpecOf = moe::Spec<moe::routing::Precomputed, moe::StandardPrepareFinalize<>, moe::Experts<moe::SiluAndMul, Q, bfloat16>>;

struct Shape {
  Index M, E, H, I;
  int top_k;
};

// Codes and scales of a [E, N, K] weight under scheme Q, from floats whose magnitude is
// 2^((row block + K block + expert) % 5): each scale entry sees its own power of two.
template <class Q>
struct QuantizedWeight {
  std::vector<typename Q::WeightElement> codes;
  std::vector<float> scales;
  std::array<Index, 3> scale_shape;

  QuantizedWeight(Index E, Index N, Index K, Index half, std::mt19937& gen) {
    std::normal_distribution<float> d(0.0f, 0.05f);
    std::vector<float> w(static_cast<std::size_t>(E * N * K));
    for (Index e = 0; e < E; ++e)
      for (Index n = 0; n < N; ++n)
        for (Index k = 0; k < K; ++k) w[(e * N + n) * K + k] = d(gen) * std::ldexp(1.0f, static_cast<int>((n / 64 + k / 128 + e) % 5));
    scale_shape = Q::weight_scale_shape(E, N, K, half);
    const Index cols = scale_shape[2], bk = cols > 1 ? Q::kBlockK : K;
    const auto entry = [&](Index e, Index n, Index k) { return (e * scale_shape[1] + Q::weight_scale_row(n, half)) * cols + k / bk; };
    scales.assign(static_cast<std::size_t>(scale_shape[0] * scale_shape[1] * cols), 1e-12f);
    for (Index e = 0; e < E; ++e)
      for (Index n = 0; n < N; ++n)
        for (Index k = 0; k < K; ++k) {
          float& s = scales[entry(e, n, k)];
          s = std::max(s, std::fabs(w[(e * N + n) * K + k]) / Q::kMax);
        }
    codes.resize(w.size());
    for (Index e = 0; e < E; ++e)
      for (Index n = 0; n < N; ++n)
        for (Index k = 0; k < K; ++k) codes[(e * N + n) * K + k] = Q::encode(w[(e * N + n) * K + k], scales[entry(e, n, k)]);
  }
};

// Leaves the arguments as they are.
struct NoEdit {
  template <class A>
  void operator()(A&) const {}
};

template <class Q>
struct Case {
  Shape p;
  std::mt19937 gen;
  std::vector<bfloat16> hidden;
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
  QuantizedWeight<Q> w13, w2;
  // Static activation scales (Fp8PerTensor): about the largest |value| / 448 of the rows and of
  // the intermediate, so few codes saturate.
  std::vector<float> a13{0.012f}, a2{0.08f};

  static std::vector<bfloat16> random_hidden(Index n, std::mt19937& gen) {
    std::normal_distribution<float> d(0.0f, 1.0f);
    std::vector<bfloat16> h;
    for (Index i = 0; i < n; ++i) h.push_back(bfloat16(d(gen)));
    return h;
  }
  Case(Shape s, std::uint32_t seed)
      : p(s), gen(seed), hidden(random_hidden(s.M * s.H, gen)), w13(s.E, 2 * s.I, s.H, s.I, gen), w2(s.E, s.H, s.I, 0, gen) {
    std::vector<int> perm(static_cast<std::size_t>(p.E));
    for (Index m = 0; m < p.M; ++m) {
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), gen);
      for (int j = 0; j < p.top_k; ++j) {
        ids.push_back(perm[j]);
        weights.push_back(0.25f + 0.5f * std::uniform_real_distribution<float>(0, 1)(gen));
      }
    }
  }

  // The forward's arguments over the given memory (host views for the CPU, device for CUDA).
  template <class Kernel, class Space>
  typename Kernel::Arguments arguments(const void* hid, const void* ids_p, const void* wts, const void* c13,
                                       const void* c2, const void* s13, const void* s2, const void* sa13,
                                       const void* sa2, void* out) const {
    using W = typename Q::WeightElement;
    typename Kernel::Arguments a;
    a.hidden_states = moe::TensorView<const bfloat16, 2, Space>(static_cast<const bfloat16*>(hid), {p.M, p.H});
    a.topk_ids = moe::TensorView<const std::int32_t, 2, Space>(static_cast<const std::int32_t*>(ids_p), {p.M, p.top_k});
    a.topk_weights = moe::TensorView<const float, 2, Space>(static_cast<const float*>(wts), {p.M, p.top_k});
    a.top_k = p.top_k;
    a.w13 = moe::TensorView<const W, 3, Space>(static_cast<const W*>(c13), {p.E, 2 * p.I, p.H});
    a.w2 = moe::TensorView<const W, 3, Space>(static_cast<const W*>(c2), {p.E, p.H, p.I});
    a.quant.w13_scale = moe::TensorView<const float, 3, Space>(static_cast<const float*>(s13), w13.scale_shape);
    a.quant.w2_scale = moe::TensorView<const float, 3, Space>(static_cast<const float*>(s2), w2.scale_shape);
    if constexpr (Q::kStaticActivations) {
      a.quant.a13_scale = moe::TensorView<const float, 1, Space>(static_cast<const float*>(sa13), {1});
      a.quant.a2_scale = moe::TensorView<const float, 1, Space>(static_cast<const float*>(sa2), {1});
    }
    a.output = moe::TensorView<bfloat16, 2, Space>(static_cast<bfloat16*>(out), {p.M, p.H});
    return a;
  }

  std::vector<bfloat16> run_cpu() const {
    std::vector<bfloat16> out(hidden.size(), bfloat16(-7.0f));
    using K = moe::Kernel<SpecOf<Q>, moe::cpu::Eigen>;
    const auto a = arguments<K, moe::HostSpace>(hidden.data(), ids.data(), weights.data(), w13.codes.data(),
                                                              w2.codes.data(), w13.scales.data(), w2.scales.data(),
                                                              a13.data(), a2.data(), out.data());
    const moe::Status s = K().run(a);
    EXPECT_TRUE(s.is_ok()) << s.to_string();
    return out;
  }

  // The CUDA forward; `edit` may break the arguments (then the status is returned and the output
  // downloaded as it is).
  template <class Edit = NoEdit>
  moe::Status run_cuda(moe::cuda::Options options, std::vector<bfloat16>* out, Edit edit = {}) const {
    DeviceBuffer<bfloat16> dh(hidden), dout(std::vector<bfloat16>(hidden.size(), bfloat16(-7.0f)));
    DeviceBuffer<std::int32_t> di(ids);
    DeviceBuffer<float> dw(weights), ds13(w13.scales), ds2(w2.scales), da13(a13), da2(a2);
    DeviceBuffer<typename Q::WeightElement> dc13(w13.codes), dc2(w2.codes);
    using K = moe::Kernel<SpecOf<Q>, moe::cuda::Sm90>;
    auto a = arguments<K, moe::DeviceSpace>(dh.data(), di.data(), dw.data(), dc13.data(), dc2.data(),
                                                          ds13.data(), ds2.data(), da13.data(), da2.data(), dout.data());
    edit(a);
    const K kernel(options);
    DeviceBuffer<std::byte> ws(std::max<std::size_t>(1, kernel.workspace_bytes(a)));
    const moe::Status s = kernel.run(a, std::span<std::byte>(ws.data(), ws.size()));
    if (cudaDeviceSynchronize() != cudaSuccess) return moe::make_status(moe::StatusCode::kCudaError, "synchronize");
    *out = dout.download();
    return s;
  }
};

struct Errors {
  double max_ref = 0, sum_ref = 0, max_err = 0, sum_err = 0;
  bool finite = true;
};
Errors compare(const std::vector<bfloat16>& got, const std::vector<bfloat16>& want) {
  Errors e;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double g = moe::to_float(got[i]), w = moe::to_float(want[i]);
    e.finite = e.finite && std::isfinite(g);
    e.max_ref = std::max(e.max_ref, std::fabs(w));
    e.sum_ref += std::fabs(w);
    e.max_err = std::max(e.max_err, std::fabs(g - w));
    e.sum_err += std::fabs(g - w);
  }
  return e;
}

class QuantizedExpertsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MOE_SKIP_WITHOUT_GPU();
    int major = 0;
    ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
    if (major < 9) GTEST_SKIP() << "the W8A8 GEMMs need an sm_90 device (FP8 wgmma)";
  }
};

__global__ void encode_e4m3_kernel(const float* x, int n, std::uint8_t* out) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) out[i] = moe::float8_e4m3::from_float(x[i]);
}

// The device's FP8 conversion (the cvt.rn.satfinite instruction) gives the host's bits: every
// code's value and the midpoints next to it (ties to even), the subnormal range, saturation at
// and past 448, infinities and NaN, and random magnitudes.
TEST_F(QuantizedExpertsTest, DeviceFp8ConversionMatchesTheHostBits) {
  std::vector<float> x;
  for (int b = 0; b < 256; ++b) {
    const float v = moe::float8_e4m3::to_float(static_cast<std::uint8_t>(b));
    if (std::isnan(v)) continue;
    x.push_back(v);
    x.push_back(std::nextafter(v, 1e30f));
    x.push_back(std::nextafter(v, -1e30f));
    const float next = moe::float8_e4m3::to_float(static_cast<std::uint8_t>(b + 1 < 256 ? b + 1 : b));
    if (!std::isnan(next)) x.push_back(0.5f * (v + next));
  }
  for (const float v : {448.0f, 455.99f, 456.0f, 463.99f, 464.0f, 1e6f, INFINITY, -INFINITY, NAN, 0.0f, -0.0f, 1e-30f,
                        -1e-30f, 0.0009765625f, 0.00048828125f}) {
    x.push_back(v);
  }
  std::mt19937 gen(3);
  std::uniform_real_distribution<float> exponent(-14.0f, 10.0f), sign(-1.0f, 1.0f);
  for (int i = 0; i < 4096; ++i) x.push_back((sign(gen) < 0 ? -1.0f : 1.0f) * std::exp2(exponent(gen)));
  DeviceBuffer<float> dx(x);
  DeviceBuffer<std::uint8_t> dout(std::vector<std::uint8_t>(x.size(), 0));
  const int n = static_cast<int>(x.size());
  encode_e4m3_kernel<<<(n + 255) / 256, 256>>>(dx.data(), n, dout.data());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<std::uint8_t> got = dout.download();
  int mismatches = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const std::uint8_t want = moe::float8_e4m3::from_float(x[i]);
    if (got[i] != want && ++mismatches < 10) ADD_FAILURE() << x[i] << ": device " << int(got[i]) << " host " << int(want);
  }
  EXPECT_EQ(mismatches, 0);
}

// Every tile width (pinned) and the table's choice, with and without K splits, on shapes with
// ragged blocks: I = 192 and 320 (the gated halves end mid-block; GEMM2's K ends mid-block),
// H = 320. The prefill tile runs CUTLASS's blockwise FP8 GEMM for the block-scaled and per-tensor
// schemes (several 128-row tiles per expert at M = 700), the 64-token swap tile for the others.
template <class Q>
void expect_cuda_matches_cpu(std::uint32_t seed) {
  using moe::cuda::gemm::Sm90Tile;
  for (const Shape shape : {Shape{5, 8, 256, 192, 2}, Shape{1, 8, 320, 192, 2}, Shape{300, 8, 256, 128, 2},
                            Shape{41, 16, 128, 320, 4}, Shape{700, 8, 384, 320, 2}}) {
    const Case<Q> c(shape, seed);
    const std::vector<bfloat16> want = c.run_cpu();
    std::vector<std::optional<Sm90Tile>> tiles{std::nullopt, Sm90Tile::kFusedSwap128x16, Sm90Tile::kFusedSwap128x64,
                                               Sm90Tile::kNormal128x256, Sm90Tile::kPingpong128x128,
                                               Sm90Tile::kPingpong64x256};
    for (const auto& tile : tiles) {
      for (const int splits : {1, 8}) {
        moe::cuda::Options o;
        o.sm90_tile = tile;
        o.max_k_splits = splits;
        std::vector<bfloat16> got;
        const moe::Status s = c.run_cuda(o, &got);
        ASSERT_TRUE(s.is_ok()) << s.to_string();
        const Errors e = compare(got, want);
        const std::string where = std::string(Q::kName) + " M=" + std::to_string(shape.M) + " H=" + std::to_string(shape.H) +
                                  " I=" + std::to_string(shape.I) + " tile=" + (tile ? moe::cuda::gemm::name(*tile) : "table") +
                                  " splits<=" + std::to_string(splits);
        EXPECT_TRUE(e.finite) << where;
        EXPECT_GT(e.max_ref, 0.0) << where;
        // FP8 per-token scales quantize a whole intermediate row with one scale: one flipped code
        // of a large intermediate (a 6-12% step) can move an output by ~3% of the largest one where
        // the test's power-of-two weights let one product dominate (measured: 2.9% at M = 700).
        const double max_bound =
            std::is_same_v<typename Q::WeightElement, moe::float8_e4m3> && Q::kActScale == quant::ScaleGranularity::kPerToken
                ? 0.04
                : 0.02;
        EXPECT_LE(e.max_err, max_bound * e.max_ref) << where;
        const double mean_bound = std::is_same_v<typename Q::WeightElement, moe::float8_e4m3> ? 0.01 : 0.003;
        EXPECT_LE(e.sum_err, mean_bound * e.sum_ref) << where << " mean error " << e.sum_err / want.size();
      }
    }
  }
}

TEST_F(QuantizedExpertsTest, Fp8BlockScaledMatchesTheCpuBackend) { expect_cuda_matches_cpu<quant::Fp8Block<128, 128>>(1); }
TEST_F(QuantizedExpertsTest, Fp8PerTokenChannelMatchesTheCpuBackend) { expect_cuda_matches_cpu<quant::Fp8PerTokenChannel>(2); }
TEST_F(QuantizedExpertsTest, Fp8PerTensorStaticMatchesTheCpuBackend) { expect_cuda_matches_cpu<quant::Fp8PerTensor>(3); }
TEST_F(QuantizedExpertsTest, Int8PerTokenChannelMatchesTheCpuBackend) { expect_cuda_matches_cpu<quant::Int8PerTokenChannel>(4); }

// The per-tensor FP8 GEMMs keep their sums in the tensor cores' FP8 accumulator across the whole
// K (fast accumulation, as vLLM's FP8 GEMMs on Hopper): CUTLASS's prefill GEMM and our swap tiles
// (decode) alike, where the CPU sums in fp32. GEMM2 here reduces over K = 4096 (I), 32 K blocks,
// where the shapes above have at most 3. The bounds are the per-scheme test's; measured on the H200: see the assertion's message. A sum kept at the
// accumulator's ~14 bits without promotion would drift with K; a wrong alpha (scale of another
// expert: powers of two apart) breaks the maximum bound by far.
template <class Q>
void expect_accurate_over_long_k(moe::cuda::gemm::Sm90Tile tile, const char* name) {
  const Case<Q> c(Shape{256, 4, 256, 4096, 2}, 21);
  const std::vector<bfloat16> want = c.run_cpu();
  moe::cuda::Options o;
  o.sm90_tile = tile;
  std::vector<bfloat16> got;
  const moe::Status s = c.run_cuda(o, &got);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  const Errors e = compare(got, want);
  EXPECT_TRUE(e.finite);
  EXPECT_GT(e.max_ref, 0.0);
  const std::string measured = "max error " + std::to_string(e.max_err / e.max_ref) + " of the largest output, mean " +
                               std::to_string(e.sum_err / e.sum_ref) + " of the mean magnitude";
  EXPECT_LE(e.max_err, 0.02 * e.max_ref) << name << ": " << measured;
  EXPECT_LE(e.sum_err, 0.01 * e.sum_ref) << name << ": " << measured;
  std::printf("%s, K = 4096: %s\n", name, measured.c_str());
}

TEST_F(QuantizedExpertsTest, Fp8FastAccumulationStaysAccurateOverLongK) {
  using moe::cuda::gemm::Sm90Tile;
  expect_accurate_over_long_k<quant::Fp8PerTensor>(Sm90Tile::kNormal128x256, "fp8_per_tensor prefill GEMM, cooperative");
  expect_accurate_over_long_k<quant::Fp8PerTensor>(Sm90Tile::kPingpong64x256, "fp8_per_tensor prefill GEMM, ping-pong");
  expect_accurate_over_long_k<quant::Fp8PerTensor>(Sm90Tile::kFusedSwap128x16, "fp8_per_tensor swap 128x16");
  expect_accurate_over_long_k<quant::Fp8PerTensor>(Sm90Tile::kFusedSwap128x32, "fp8_per_tensor swap 128x32");
  expect_accurate_over_long_k<quant::Fp8PerTensor>(Sm90Tile::kFusedSwap128x64, "fp8_per_tensor swap 128x64");
}

// Expert parallelism on a quantized checkpoint: ranks own slices of the codes and of the scale
// tensors (experts are the scales' first dimension), run cuda::ExpertsStage (moe/stages.h) on the
// rows dispatched to them (testing/ep/simulated_ep.h), and the combine gives the single-rank
// forward's bits: rows are quantized one by one and every token column of a tile is its own sum.
// The same tile and no K splits on both sides (the table and the split count follow the rows per
// expert, which differ between the ranks and the single forward).
template <class Q>
void expect_simulated_ep_matches_single_rank(int ranks, moe::cuda::gemm::Sm90Tile tile) {
  const Case<Q> c(Shape{37, 8, 256, 192, 2}, 12);
  moe::cuda::Options o;
  o.sm90_tile = tile;
  o.max_k_splits = 1;
  std::vector<bfloat16> single;
  const moe::Status ss = c.run_cuda(o, &single);
  ASSERT_TRUE(ss.is_ok()) << ss.to_string();

  using Stage = moe::cuda::ExpertsStage<moe::Experts<moe::SiluAndMul, Q, bfloat16>, bfloat16, moe::cuda::Sm90>;
  using W = typename Q::WeightElement;
  const Stage stage(o);
  const Index E = c.p.E, E_local = E / ranks, H = c.p.H, I = c.p.I;
  DeviceBuffer<W> c13(c.w13.codes), c2(c.w2.codes);
  DeviceBuffer<float> s13(c.w13.scales), s2(c.w2.scales), a13(c.a13), a2(c.a2);
  const auto slice = [&](const std::array<Index, 3>& shape, const float* base, int r) {
    return moe::DeviceView<const float, 3>(base + r * E_local * shape[1] * shape[2], {E_local, shape[1], shape[2]});
  };
  moe::testing::ep::RankExperts<bfloat16> run_rank = [&](int r, const moe::testing::ep::RankRows<bfloat16>& in,
                                                         std::vector<bfloat16>* result) {
    const Index R = E_local * in.capacity;
    DeviceBuffer<bfloat16> rows(in.rows), rows_out(in.rows.size());
    DeviceBuffer<Index> begin(in.begin), count(in.count);
    typename Stage::Weights w;
    w.w13 = moe::DeviceView<const W, 3>(c13.data() + r * E_local * 2 * I * H, {E_local, 2 * I, H});
    w.w2 = moe::DeviceView<const W, 3>(c2.data() + r * E_local * H * I, {E_local, H, I});
    w.quant.w13_scale = slice(c.w13.scale_shape, s13.data(), r);
    w.quant.w2_scale = slice(c.w2.scale_shape, s2.data(), r);
    if constexpr (Q::kStaticActivations) {
      w.quant.a13_scale = moe::DeviceView<const float, 1>(a13.data(), {1});
      w.quant.a2_scale = moe::DeviceView<const float, 1>(a2.data(), {1});
    }
    typename Stage::Rows rw;
    rw.input = moe::DeviceView<const bfloat16, 2>(rows.data(), {R, H});
    rw.output = moe::DeviceView<bfloat16, 2>(rows_out.data(), {R, H});
    rw.seg_begin = moe::DeviceView<const Index, 1>(begin.data(), {E_local});
    rw.seg_count = moe::DeviceView<const Index, 1>(count.data(), {E_local});
    rw.max_rows_per_expert = in.capacity;
    DeviceBuffer<std::byte> ws(std::max<std::size_t>(1, stage.workspace_bytes(w, rw)));
    MOE_RETURN_IF_ERROR(stage.run(w, rw, std::span<std::byte>(ws.data(), ws.size())));
    if (cudaDeviceSynchronize() != cudaSuccess) return moe::make_status(moe::StatusCode::kCudaError, "rank ", r);
    *result = rows_out.download();
    return moe::Status::ok();
  };
  std::vector<bfloat16> ep;
  const moe::Status s = moe::testing::ep::forward<bfloat16>(c.hidden, c.p.M, H, c.ids, c.weights, c.p.top_k, E, ranks,
                                                            run_rank, &ep);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  ASSERT_EQ(ep.size(), single.size());
  EXPECT_EQ(0, std::memcmp(ep.data(), single.data(), single.size() * sizeof(bfloat16)))
      << Q::kName << " ranks=" << ranks << " tile=" << moe::cuda::gemm::name(tile)
      << ": the simulated expert-parallel forward differs";
}

TEST_F(QuantizedExpertsTest, SimulatedExpertParallelMatchesTheSingleRankForward) {
  using moe::cuda::gemm::Sm90Tile;
  for (const int ranks : {2, 4}) {
    for (const Sm90Tile tile : {Sm90Tile::kFusedSwap128x16, Sm90Tile::kNormal128x256}) {
      expect_simulated_ep_matches_single_rank<quant::Fp8Block<128, 128>>(ranks, tile);
      expect_simulated_ep_matches_single_rank<quant::Fp8PerTokenChannel>(ranks, tile);
      expect_simulated_ep_matches_single_rank<quant::Fp8PerTensor>(ranks, tile);
      expect_simulated_ep_matches_single_rank<quant::Int8PerTokenChannel>(ranks, tile);
    }
  }
}

// An all-zero token gives exact zeros, a token of tiny values finite outputs, and two runs give the
// same bits (no atomics; the split count is a function of the tile count).
template <class Q>
void expect_zero_rows_exact_and_reruns_identical(moe::cuda::Options o = {}) {
  Case<Q> c(Shape{7, 8, 256, 192, 2}, 9);
  for (Index k = 0; k < c.p.H; ++k) {
    c.hidden[k] = bfloat16(0.0f);
    c.hidden[c.p.H + k] = bfloat16(1e-30f * static_cast<float>(k % 7 - 3));
  }
  std::vector<bfloat16> first, second;
  ASSERT_TRUE(c.run_cuda(o, &first).is_ok());
  ASSERT_TRUE(c.run_cuda(o, &second).is_ok());
  for (Index h = 0; h < c.p.H; ++h) EXPECT_EQ(moe::to_float(first[h]), 0.0f) << Q::kName << " column " << h;
  for (const bfloat16& v : first) ASSERT_TRUE(std::isfinite(moe::to_float(v))) << Q::kName;
  EXPECT_EQ(0, std::memcmp(first.data(), second.data(), first.size() * sizeof(bfloat16))) << Q::kName;
}

TEST_F(QuantizedExpertsTest, ZeroRowsAreExactAndRerunsBitIdentical) {
  expect_zero_rows_exact_and_reruns_identical<quant::Fp8Block<128, 128>>();
  expect_zero_rows_exact_and_reruns_identical<quant::Fp8PerTokenChannel>();
  expect_zero_rows_exact_and_reruns_identical<quant::Int8PerTokenChannel>();
  moe::cuda::Options prefill;  // CUTLASS's blockwise FP8 GEMM
  prefill.sm90_tile = moe::cuda::gemm::Sm90Tile::kNormal128x256;
  expect_zero_rows_exact_and_reruns_identical<quant::Fp8Block<128, 128>>(prefill);
  expect_zero_rows_exact_and_reruns_identical<quant::Fp8PerTensor>(prefill);
}

// A scale tensor of the wrong shape is named with both shapes and nothing is written; a hidden
// size the 8-bit GEMMs cannot take is refused with the reason.
TEST_F(QuantizedExpertsTest, BadScalesAndShapesAreRefusedBeforeAnyWrite) {
  using Q = quant::Fp8Block<128, 128>;
  const Case<Q> c(Shape{5, 8, 256, 192, 2}, 5);
  std::vector<bfloat16> out;
  const moe::Status s = c.run_cuda({}, &out, [](auto& a) {
    a.quant.w13_scale = moe::DeviceView<const float, 3>(a.quant.w13_scale.data(), {8, 3, 2});
  });
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("quant.w13_scale"), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("[8, 4, 2]"), std::string::npos) << s.to_string();
  for (const bfloat16& v : out) ASSERT_EQ(moe::to_float(v), -7.0f) << "output written on error";

  using P = quant::Fp8PerTokenChannel;  // H = 200: not a multiple of 16
  const Case<P> odd(Shape{3, 4, 200, 64, 2}, 6);
  const moe::Status refused = odd.run_cuda({}, &out);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.message().find("multiples of 16"), std::string::npos) << refused.to_string();
  for (const bfloat16& v : out) ASSERT_EQ(moe::to_float(v), -7.0f) << "output written on error";
}

}  // namespace
