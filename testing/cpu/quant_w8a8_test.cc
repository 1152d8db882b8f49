// The W8A8 schemes (moe/quant/w8a8.h) on the CPU backend, against a reference written here: its own
// FP8 rounding (nearest of the 254 finite codes by search, ties to the even code), its own INT8
// rounding, its own quantizers for weights and activations, and the GEMMs in double. Weights are
// quantized from floats whose magnitude changes by powers of two across rows and blocks, so a
// scale read from the wrong row, block or expert is off by 2-16x and fails the comparison.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "moe/cpu/kernel.h"
#include "testing/lib/compare.h"
#include "moe/quant/w8a8.h"

namespace moe {
namespace {

using quant::ScaleGranularity;

// ---- the test's own number formats -------------------------------------------------------------

// Every finite E4M3 value, by code (NaN codes 0x7f / 0xff skipped).
std::vector<std::pair<std::uint8_t, double>> e4m3_table() {
  std::vector<std::pair<std::uint8_t, double>> t;
  for (int code = 0; code < 256; ++code) {
    const int e = (code >> 3) & 15, m = code & 7;
    if (e == 15 && m == 7) continue;
    const double mag = e == 0 ? m * std::ldexp(1.0, -9) : (1.0 + m / 8.0) * std::ldexp(1.0, e - 7);
    t.push_back({static_cast<std::uint8_t>(code), (code & 0x80) ? -mag : mag});
  }
  return t;
}

// Round to nearest E4M3 value, ties to the even code, saturating at +-448.
double ref_fp8(double v) {
  static const auto table = e4m3_table();
  if (v >= 448.0) return 448.0;
  if (v <= -448.0) return -448.0;
  double best = 0.0, best_err = std::numeric_limits<double>::infinity();
  int best_code = 0;
  for (const auto& [code, value] : table) {
    const double err = std::fabs(value - v);
    if (err < best_err || (err == best_err && (code & 1) == 0 && (best_code & 1) == 1)) {
      best = value;
      best_err = err;
      best_code = code;
    }
  }
  return best;
}

double ref_int8(double v) {
  const double r = v < 0 ? -std::floor(-v + 0.5) : std::floor(v + 0.5);
  return std::clamp(r, -128.0, 127.0);
}

// ---- exhaustive checks of the storage type -------------------------------------------------------

TEST(Float8E4M3, EveryCodeRoundTripsAndRoundsLikeTheReference) {
  for (int code = 0; code < 256; ++code) {
    const float v = float8_e4m3::to_float(static_cast<std::uint8_t>(code));
    if ((code & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(v)) << code;
      continue;
    }
    EXPECT_EQ(float8_e4m3::from_float(v), code) << "code " << code << " value " << v;
    EXPECT_EQ(v, static_cast<float>(ref_fp8(v)));
  }
  // Midpoints between neighbours, just above and below them, and values past the ends.
  const auto table = e4m3_table();
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> u(-500.0f, 500.0f);
  std::vector<float> probes;
  for (const auto& [code, value] : table) {
    for (double d : {0.5, -0.5}) {
      const double step = std::fabs(value) < std::ldexp(1.0, -6) ? std::ldexp(1.0, -9)
                                                                 : std::ldexp(1.0, std::ilogb(value) - 3);
      const float mid = static_cast<float>(value + d * step);
      probes.insert(probes.end(), {mid, std::nextafter(mid, 1e9f), std::nextafter(mid, -1e9f)});
    }
  }
  for (int i = 0; i < 20000; ++i) probes.push_back(u(gen) * std::ldexp(1.0f, -static_cast<int>(gen() % 16)));
  for (float p : {1e30f, -1e30f, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                  448.0f, 463.9f, 464.0f, -0.0f, 1e-30f}) {
    probes.push_back(p);
  }
  for (float p : probes) {
    ASSERT_EQ(float8_e4m3::to_float(float8_e4m3::from_float(p)), static_cast<float>(ref_fp8(p))) << "value " << p;
  }
  EXPECT_TRUE(std::isnan(float8_e4m3::to_float(float8_e4m3::from_float(std::nanf("")))));
}

// ---- the forward ---------------------------------------------------------------------------------

struct Problem {
  Index M = 23, E = 5, H = 200, I = 192;  // H, I not multiples of 128: ragged K and N blocks
  int top_k = 2;
};

template <class Q>
using SpecOf = Spec<routing::Precomputed, StandardPrepareFinalize<>, Experts<SiluAndMul, Q, bfloat16>>;

// A quantized checkpoint built here: codes and scales of w13 [E, 2I, H] and w2 [E, H, I].
template <class Q>
struct QuantWeights {
  using W = typename Q::WeightElement;
  std::vector<W> w13, w2;
  std::vector<float> s13, s2;  // Q::weight_scale_shape
  std::vector<float> a13{0.05f}, a2{0.02f};  // static activation scales (Fp8PerTensor)
};

// The scale blocks of rows [begin, end): a gated w13's halves (`half` rows each) are blocked
// separately, as vLLM stores them.
std::vector<std::pair<Index, Index>> row_blocks(Index N, Index bn, Index half) {
  std::vector<std::pair<Index, Index>> out;
  const auto add = [&](Index begin, Index end) {
    for (Index r = begin; r < end; r += bn) out.push_back({r, std::min(end, r + bn)});
  };
  if (half > 0) {
    add(0, half);
    add(half, N);
  } else {
    add(0, N);
  }
  return out;
}

template <class Q>
void quantize_weights(const std::vector<float>& w, Index E, Index N, Index K, Index half,
                      std::vector<typename Q::WeightElement>* codes, std::vector<float>* scales) {
  const auto shape = Q::weight_scale_shape(E, N, K, half);
  const Index bn = Q::kWeightScale == ScaleGranularity::kBlock ? Q::kBlockN : (Q::kWeightScale == ScaleGranularity::kPerChannel ? 1 : N);
  const Index bk = Q::kWeightScale == ScaleGranularity::kBlock ? Q::kBlockK : K;
  const auto blocks = row_blocks(N, bn, Q::kWeightScale == ScaleGranularity::kBlock ? half : 0);
  EXPECT_EQ(static_cast<Index>(blocks.size()), shape[1]);
  scales->assign(static_cast<std::size_t>(shape[0] * shape[1] * shape[2]), 0.0f);
  codes->resize(w.size());
  for (Index e = 0; e < E; ++e) {
    for (Index i = 0; i < shape[1]; ++i) {
      const auto [n0, n1] = blocks[static_cast<std::size_t>(i)];
      for (Index j = 0; j < shape[2]; ++j) {
        double amax = 0;
        for (Index n = n0; n < n1; ++n) {
          for (Index k = j * bk; k < std::min(K, (j + 1) * bk); ++k) amax = std::max(amax, std::fabs(double(w[(e * N + n) * K + k])));
        }
        const float s = static_cast<float>(amax / Q::kMax);
        (*scales)[(e * shape[1] + i) * shape[2] + j] = s;
        for (Index n = n0; n < n1; ++n) {
          for (Index k = j * bk; k < std::min(K, (j + 1) * bk); ++k) {
            const double v = w[(e * N + n) * K + k] / s;
            if constexpr (std::is_same_v<typename Q::WeightElement, float8_e4m3>) {
              (*codes)[(e * N + n) * K + k] = float8_e4m3(static_cast<float>(ref_fp8(v)));
            } else {
              (*codes)[(e * N + n) * K + k] = static_cast<std::int8_t>(ref_int8(v));
            }
          }
        }
      }
    }
  }
}

// Random weights whose magnitude is 2^((n / 64 + k / 64 + e) % 5) * N(0, 0.05): every scale block
// of every layout sees a different power of two.
std::vector<float> varied_weights(Index E, Index N, Index K, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, 0.05f);
  std::vector<float> w(static_cast<std::size_t>(E * N * K));
  for (Index e = 0; e < E; ++e)
    for (Index n = 0; n < N; ++n)
      for (Index k = 0; k < K; ++k) w[(e * N + n) * K + k] = d(gen) * std::ldexp(1.0f, static_cast<int>((n / 64 + k / 64 + e) % 5));
  return w;
}

// The reference's quantized product of one row x ([K], IO-rounded) with codes w ([N, K] of expert e).
template <class Q>
std::vector<double> ref_product(const std::vector<double>& x, const QuantWeights<Q>& qw, bool first, Index e, Index N,
                                Index K) {
  const auto& codes = first ? qw.w13 : qw.w2;
  const auto& scales = first ? qw.s13 : qw.s2;
  const Index half = first ? N / 2 : 0;
  const auto shape = Q::weight_scale_shape(1, N, K, half);
  const Index bk = Q::kBlockK > 0 ? Q::kBlockK : K, kb = (K + bk - 1) / bk;
  // The scale row of weight row n, found by this test's own block list.
  const Index bn = Q::kWeightScale == ScaleGranularity::kBlock ? Q::kBlockN : 1;
  const auto blocks = row_blocks(N, bn, Q::kWeightScale == ScaleGranularity::kBlock ? half : 0);
  const auto scale_row = [&](Index n) {
    if (Q::kWeightScale == ScaleGranularity::kPerTensor) return Index{0};
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      if (n >= blocks[i].first && n < blocks[i].second) return static_cast<Index>(i);
    }
    return Index{-1};
  };
  std::vector<double> q(x.size()), sx(static_cast<std::size_t>(kb));
  for (Index b = 0; b < kb; ++b) {
    double s = 0;
    if constexpr (Q::kStaticActivations) {
      s = first ? qw.a13[0] : qw.a2[0];
    } else {
      const Index g0 = Q::kActScale == ScaleGranularity::kGroup ? b * bk : 0;
      const Index g1 = Q::kActScale == ScaleGranularity::kGroup ? std::min(K, g0 + bk) : K;
      double amax = 0;
      for (Index k = g0; k < g1; ++k) amax = std::max(amax, std::fabs(x[k]));
      s = static_cast<float>(std::max(static_cast<float>(amax), 1e-10f) / Q::kMax);
    }
    sx[b] = s;
    for (Index k = b * bk; k < std::min(K, (b + 1) * bk); ++k) {
      // vLLM's static quantizer multiplies by the inverted scale, the dynamic ones divide.
      const float v = Q::kStaticActivations ? static_cast<float>(x[k]) * (1.0f / static_cast<float>(s))
                                            : static_cast<float>(x[k]) / static_cast<float>(s);
      q[k] = std::is_same_v<typename Q::WeightElement, float8_e4m3> ? ref_fp8(v) : ref_int8(v);
    }
  }
  std::vector<double> out(static_cast<std::size_t>(N), 0.0);
  for (Index n = 0; n < N; ++n) {
    for (Index b = 0; b < kb; ++b) {
      double dot = 0;
      for (Index k = b * bk; k < std::min(K, (b + 1) * bk); ++k) dot += q[k] * to_float(codes[(e * N + n) * K + k]);
      const Index si = scale_row(n) * shape[2] + (Q::kWeightScale == ScaleGranularity::kBlock ? b : 0);
      out[n] += dot * sx[b] * scales[e * shape[1] * shape[2] + si];
    }
  }
  return out;
}

template <class Q>
struct QuantCase {
  Problem p;
  std::vector<bfloat16> hidden, out;
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
  QuantWeights<Q> qw;

  explicit QuantCase(Problem pr, std::uint32_t seed = 1) : p(pr) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (Index i = 0; i < p.M * p.H; ++i) hidden.push_back(bfloat16(d(gen)));
    std::vector<int> perm(static_cast<std::size_t>(p.E));
    for (Index m = 0; m < p.M; ++m) {
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), gen);
      float sum = 0;
      for (int j = 0; j < p.top_k; ++j) {
        ids.push_back(perm[j]);
        weights.push_back(0.2f + std::uniform_real_distribution<float>(0, 1)(gen));
        sum += weights.back();
      }
      for (int j = 0; j < p.top_k; ++j) weights[weights.size() - 1 - j] /= sum;
    }
    quantize_weights<Q>(varied_weights(p.E, 2 * p.I, p.H, seed + 1), p.E, 2 * p.I, p.H, p.I, &qw.w13, &qw.s13);
    quantize_weights<Q>(varied_weights(p.E, p.H, p.I, seed + 2), p.E, p.H, p.I, 0, &qw.w2, &qw.s2);
    out.assign(hidden.size(), bfloat16(-7.0f));
  }

  typename Kernel<SpecOf<Q>, cpu::Eigen>::Arguments arguments() {
    typename Kernel<SpecOf<Q>, cpu::Eigen>::Arguments a;
    a.hidden_states = HostView<const bfloat16, 2>(hidden.data(), {p.M, p.H});
    a.topk_ids = HostView<const std::int32_t, 2>(ids.data(), {p.M, p.top_k});
    a.topk_weights = HostView<const float, 2>(weights.data(), {p.M, p.top_k});
    a.top_k = p.top_k;
    using W = typename Q::WeightElement;
    a.w13 = HostView<const W, 3>(qw.w13.data(), {p.E, 2 * p.I, p.H});
    a.w2 = HostView<const W, 3>(qw.w2.data(), {p.E, p.H, p.I});
    a.quant.w13_scale = HostView<const float, 3>(qw.s13.data(), Q::weight_scale_shape(p.E, 2 * p.I, p.H, p.I));
    a.quant.w2_scale = HostView<const float, 3>(qw.s2.data(), Q::weight_scale_shape(p.E, p.H, p.I));
    if constexpr (Q::kStaticActivations) {
      a.quant.a13_scale = HostView<const float, 1>(qw.a13.data(), {1});
      a.quant.a2_scale = HostView<const float, 1>(qw.a2.data(), {1});
    }
    a.output = HostView<bfloat16, 2>(out.data(), {p.M, p.H});
    return a;
  }

  Status run() {
    cpu::Options o;
    o.chunk_tokens = 9;  // several chunks
    o.row_block = 4;     // several blocks per expert, and the one-row path
    return Kernel<SpecOf<Q>, cpu::Eigen>(o).run(arguments());
  }

  // The reference forward: per slot GEMM1 rounded to bf16, SiLU(gate) * up rounded to bf16, GEMM2,
  // x weight, rounded to bf16; the slots summed in float and rounded.
  std::vector<float> reference() const {
    std::vector<float> ref(static_cast<std::size_t>(p.M * p.H));
    for (Index m = 0; m < p.M; ++m) {
      std::vector<double> x(static_cast<std::size_t>(p.H));
      for (Index k = 0; k < p.H; ++k) x[k] = to_float(hidden[m * p.H + k]);
      std::vector<float> acc(static_cast<std::size_t>(p.H), 0.0f);
      for (int j = 0; j < p.top_k; ++j) {
        const Index e = ids[m * p.top_k + j];
        const std::vector<double> g = ref_product<Q>(x, qw, true, e, 2 * p.I, p.H);
        std::vector<double> inter(static_cast<std::size_t>(p.I));
        for (Index i = 0; i < p.I; ++i) {
          // GEMM1's output is stored in bf16 (vLLM's intermediate cache 1) before the activation.
          const double gate = to_float(bfloat16(static_cast<float>(g[i])));
          const double up = to_float(bfloat16(static_cast<float>(g[p.I + i])));
          inter[i] = to_float(bfloat16(static_cast<float>(gate / (1.0 + std::exp(-gate)) * up)));
        }
        const std::vector<double> y = ref_product<Q>(inter, qw, false, e, p.H, p.I);
        for (Index h = 0; h < p.H; ++h) {
          acc[h] += to_float(bfloat16(static_cast<float>(y[h] * weights[m * p.top_k + j])));
        }
      }
      for (Index h = 0; h < p.H; ++h) ref[m * p.H + h] = to_float(bfloat16(acc[h]));
    }
    return ref;
  }
};

// Tolerance: the kernel sums in fp32 where the reference sums in double, so an intermediate value
// can round to the neighbouring bf16 and then to the neighbouring 8-bit code (1/8 of its binade for
// fp8, 1/127 of the group's range for int8). Such flips are rare and each moves one term of GEMM2;
// the bound is 2% of the largest output, and the mean error 0.3% of the mean magnitude. A scale
// from the wrong block is off by 2-16x and breaks both by far.
template <class Q>
void expect_matches_reference(const Problem& p, std::uint32_t seed) {
  QuantCase<Q> c(p, seed);
  const Status s = c.run();
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_TRUE(testing::close_in_max_and_mean(c.out, c.reference(), 0.02, 0.003)) << Q::kName;
}

TEST(W8A8, Fp8BlockScaledMatchesTheReference) {
  expect_matches_reference<quant::Fp8Block<128, 128>>(Problem{}, 3);
  expect_matches_reference<quant::Fp8Block<128, 128>>(Problem{9, 3, 320, 256, 3}, 4);  // I = 320: N1 = 640 = 5 blocks
  expect_matches_reference<quant::Fp8Block<64, 32>>(Problem{7, 4, 96, 80, 2}, 5);
}

TEST(W8A8, Fp8PerTokenPerChannelMatchesTheReference) {
  expect_matches_reference<quant::Fp8PerTokenChannel>(Problem{}, 6);
}

TEST(W8A8, Fp8PerTensorStaticMatchesTheReference) { expect_matches_reference<quant::Fp8PerTensor>(Problem{}, 7); }

TEST(W8A8, Int8PerTokenPerChannelMatchesTheReference) {
  expect_matches_reference<quant::Int8PerTokenChannel>(Problem{}, 8);
  expect_matches_reference<quant::Int8PerTokenChannel>(Problem{3, 2, 2080, 64, 1}, 9);  // K = 2080 > 2^24 / 128^2
}

// All-zero rows give exact zeros, and rows of tiny values finite outputs, on every dynamic scheme.
template <class Q>
void expect_zero_and_tiny_rows_are_safe() {
  QuantCase<Q> c(Problem{}, 11);
  for (Index k = 0; k < c.p.H; ++k) {
    c.hidden[0 * c.p.H + k] = bfloat16(0.0f);
    c.hidden[1 * c.p.H + k] = bfloat16(1e-30f * static_cast<float>(k % 7 - 3));
  }
  for (Index k = 0; k < 128; ++k) c.hidden[2 * c.p.H + k] = bfloat16(0.0f);  // one zero group of 128
  ASSERT_TRUE(c.run().is_ok());
  for (Index h = 0; h < c.p.H; ++h) EXPECT_EQ(to_float(c.out[h]), 0.0f) << Q::kName << " column " << h;
  for (const bfloat16& v : c.out) ASSERT_TRUE(std::isfinite(to_float(v))) << Q::kName;
}

TEST(W8A8, ZeroAndTinyRowsGiveFiniteOutputs) {
  expect_zero_and_tiny_rows_are_safe<quant::Fp8Block<128, 128>>();
  expect_zero_and_tiny_rows_are_safe<quant::Fp8PerTokenChannel>();
  expect_zero_and_tiny_rows_are_safe<quant::Int8PerTokenChannel>();
}

// Every scale tensor of the wrong shape, or missing, is an error that names it with the expected and
// actual shapes, and the output is untouched.
TEST(W8A8, BadScaleTensorsAreNamedAndWriteNothing) {
  using Q = quant::Fp8Block<128, 128>;
  QuantCase<Q> c(Problem{});
  std::vector<float> big(10000, 1.0f);
  const auto expect_error = [&](auto edit, std::initializer_list<std::string> parts) {
    auto a = c.arguments();
    edit(a);
    const Status s = Kernel<SpecOf<Q>, cpu::Eigen>().run(a);
    ASSERT_FALSE(s.is_ok());
    for (const std::string& part : parts) EXPECT_NE(s.message().find(part), std::string::npos) << s.to_string();
    for (const bfloat16& v : c.out) ASSERT_EQ(to_float(v), -7.0f) << "output written on error";
  };
  // w13 [5, 384, 200] in halves of 192 rows: scales [5, 4, 2]; w2 [5, 200, 192]: [5, 2, 2].
  expect_error([&](auto& a) { a.quant.w13_scale = HostView<const float, 3>(big.data(), {5, 3, 2}); },
               {"quant.w13_scale", "[5, 4, 2]", "[5, 3, 2]"});
  expect_error([&](auto& a) { a.quant.w2_scale = HostView<const float, 3>(big.data(), {5, 2, 3}); },
               {"quant.w2_scale", "[5, 2, 2]", "[5, 2, 3]"});
  expect_error([&](auto& a) { a.quant.w2_scale = HostView<const float, 3>(big.data(), {4, 2, 2}); },
               {"quant.w2_scale", "[4, 2, 2]"});
  expect_error([&](auto& a) { a.quant.w13_scale = HostView<const float, 3>(); }, {"quant.w13_scale", "not given"});
  expect_error([&](auto& a) { a.quant.a13_scale = HostView<const float, 1>(big.data(), {1}); },
               {"quant.a13_scale", "dynamically"});

  using S = quant::Fp8PerTensor;
  QuantCase<S> t(Problem{});
  auto a = t.arguments();
  a.quant.a2_scale.reset();
  const Status s = Kernel<SpecOf<S>, cpu::Eigen>().run(a);
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("quant.a2_scale"), std::string::npos) << s.to_string();
  for (const bfloat16& v : t.out) ASSERT_EQ(to_float(v), -7.0f);
}

}  // namespace
}  // namespace moe
