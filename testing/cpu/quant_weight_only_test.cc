// The weight-only schemes (moe/quant/weight_only.h: W4A16, W8A16) on the CPU backend, against a
// reference written here: its own group quantizer (symmetric around the default zero point, or
// asymmetric with zero points), its own nibble packing, its own dequantization, and the GEMMs in
// double. Weights change magnitude by powers of two across rows and groups, so a scale or zero
// point read from the wrong row, group or expert fails the comparison.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "moe/cpu/kernel.h"
#include "testing/lib/compare.h"
#include "testing/lib/random.h"
#include "testing/lib/weight_only_checkpoint.h"
#include "moe/quant/mxfp4.h"
#include "moe/quant/none.h"
#include "moe/quant/weight_only.h"

namespace moe {
namespace {

using testing::QuantizedMatrix;
using testing::quantize;

struct Problem {
  Index M = 23, E = 5, H = 200, I = 192;  // H = 200: a last group shorter than 64 or 128
  int top_k = 2;
  Index group = 64;  // 0: per channel
  bool zero_points = true;
  bool act_order = false;  // GPTQ desc_act: w13's codes stored in a per-expert K order
};

template <class Q, class IO>
using SpecOf = Spec<routing::Precomputed, StandardPrepareFinalize<>, Experts<SiluAndMul, Q, IO>>;

template <class Q, class IO>
struct WeightOnlyCase {
  static constexpr int kBits = Q::kBits;
  Problem p;
  std::vector<IO> hidden, out;
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
  QuantizedMatrix<kBits> w13, w2;
  std::vector<std::int32_t> k_order;  // [E, H] act-order, or empty

  explicit WeightOnlyCase(Problem pr, std::uint32_t seed = 1) : p(pr) {
    testing::Random r(seed);
    hidden = r.normal_vector<IO>(static_cast<std::size_t>(p.M * p.H));
    ids = r.distinct_ids(static_cast<std::size_t>(p.M), static_cast<int>(p.E), p.top_k);
    weights = r.uniform_vector<float>(ids.size(), 0.2f, 1.2f);
    for (Index m = 0; m < p.M; ++m) {  // normalized per token
      float sum = 0;
      for (int j = 0; j < p.top_k; ++j) sum += weights[m * p.top_k + j];
      for (int j = 0; j < p.top_k; ++j) weights[m * p.top_k + j] /= sum;
    }
    w13 = quantize<kBits>(p.E, 2 * p.I, p.H, p.group, p.zero_points, seed + 1);
    w2 = quantize<kBits>(p.E, p.H, p.I, p.group, p.zero_points, seed + 2);
    out.assign(hidden.size(), from_float<IO>(-7.0f));
    if (p.act_order) {  // a different shuffle of the hidden columns per expert
      std::mt19937 gen(seed + 3);
      for (Index e = 0; e < p.E; ++e) {
        std::vector<std::int32_t> o(static_cast<std::size_t>(p.H));
        std::iota(o.begin(), o.end(), 0);
        std::shuffle(o.begin(), o.end(), gen);
        k_order.insert(k_order.end(), o.begin(), o.end());
      }
    }
  }

  using K = Kernel<SpecOf<Q, IO>, cpu::Eigen>;
  typename K::Arguments arguments() {
    typename K::Arguments a;
    a.hidden_states = HostView<const IO, 2>(hidden.data(), {p.M, p.H});
    a.topk_ids = HostView<const std::int32_t, 2>(ids.data(), {p.M, p.top_k});
    a.topk_weights = HostView<const float, 2>(weights.data(), {p.M, p.top_k});
    a.top_k = p.top_k;
    const Index pack = 8 / kBits;
    a.w13 = HostView<const std::uint8_t, 3>(w13.packed.data(), {p.E, 2 * p.I, p.H / pack});
    a.w2 = HostView<const std::uint8_t, 3>(w2.packed.data(), {p.E, p.H, p.I / pack});
    a.quant.group_size = p.group;
    a.quant.w13_scale = HostView<const float, 3>(w13.scales.data(), {p.E, 2 * p.I, w13.groups});
    a.quant.w2_scale = HostView<const float, 3>(w2.scales.data(), {p.E, p.H, w2.groups});
    if (p.zero_points) {
      a.quant.w13_zero = HostView<const std::uint8_t, 3>(w13.zeros.data(), {p.E, 2 * p.I, w13.groups});
      a.quant.w2_zero = HostView<const std::uint8_t, 3>(w2.zeros.data(), {p.E, p.H, w2.groups});
    }
    if (p.act_order) a.quant.w13_k_order = HostView<const std::int32_t, 2>(k_order.data(), {p.E, p.H});
    a.output = HostView<IO, 2>(out.data(), {p.M, p.H});
    return a;
  }

  Status run() {
    cpu::Options o;
    o.chunk_tokens = 9;  // several chunks
    o.row_block = 4;     // several blocks per expert, and the one-row path
    return K(o).run(arguments());
  }

  // Expert e's dequantized matrix [N, K]: IO(float(q - z) * IO(scale)), computed here.
  std::vector<double> dequantized(const QuantizedMatrix<kBits>& m, Index e, Index N, Index Kdim) const {
    const Index G = p.group > 0 ? p.group : Kdim;
    std::vector<double> w(static_cast<std::size_t>(N * Kdim));
    for (Index n = 0; n < N; ++n) {
      for (Index k = 0; k < Kdim; ++k) {
        const std::size_t si = static_cast<std::size_t>((e * N + n) * m.groups + k / G);
        const int z = p.zero_points ? m.zeros[si] : (1 << (kBits - 1));
        const float s = to_float(from_float<IO>(m.scales[si]));
        const int q = static_cast<int>(m.codes[(e * N + n) * Kdim + k]);
        // Act-order (w13 only): stored element k is the weight of hidden column k_order[e][k].
        const Index column = &m == &w13 && !k_order.empty() ? k_order[e * p.H + k] : k;
        w[n * Kdim + column] = to_float(from_float<IO>(static_cast<float>(q - z) * s));
      }
    }
    return w;
  }

  // The reference forward: per slot GEMM1 rounded to IO, SiLU(gate) * up rounded to IO, GEMM2,
  // x weight, rounded to IO; the slots summed in float and rounded.
  std::vector<float> reference() const {
    std::vector<std::vector<double>> d13, d2;
    for (Index e = 0; e < p.E; ++e) {
      d13.push_back(dequantized(w13, e, 2 * p.I, p.H));
      d2.push_back(dequantized(w2, e, p.H, p.I));
    }
    const auto round = [](double v) { return static_cast<double>(to_float(from_float<IO>(static_cast<float>(v)))); };
    std::vector<float> ref(static_cast<std::size_t>(p.M * p.H));
    for (Index m = 0; m < p.M; ++m) {
      std::vector<float> acc(static_cast<std::size_t>(p.H), 0.0f);
      for (int j = 0; j < p.top_k; ++j) {
        const Index e = ids[m * p.top_k + j];
        std::vector<double> inter(static_cast<std::size_t>(p.I));
        for (Index i = 0; i < p.I; ++i) {
          double gate = 0, up = 0;
          for (Index k = 0; k < p.H; ++k) {
            const double x = to_float(hidden[m * p.H + k]);
            gate += x * d13[e][i * p.H + k];
            up += x * d13[e][(p.I + i) * p.H + k];
          }
          gate = round(gate);
          up = round(up);
          inter[i] = round(gate / (1.0 + std::exp(-gate)) * up);
        }
        for (Index h = 0; h < p.H; ++h) {
          double y = 0;
          for (Index i = 0; i < p.I; ++i) y += inter[i] * d2[e][h * p.I + i];
          acc[h] += static_cast<float>(round(round(y) * weights[m * p.top_k + j]));
        }
      }
      for (Index h = 0; h < p.H; ++h) ref[m * p.H + h] = static_cast<float>(round(acc[h]));
    }
    return ref;
  }
};

// Tolerance: the dequantized weights are the same values on both sides; only the sums differ
// (fp32 in Eigen's order against double), so an intermediate value can round to the neighbouring
// IO value. Such flips are rare: the bound is 1% of the largest output and the mean error 0.2% of
// the mean magnitude. A scale from the wrong group is off by 2-16x, a wrong zero point or nibble
// order by whole codes, and both break the bounds by far.
template <class Q, class IO = bfloat16>
void expect_matches_reference(const Problem& p, std::uint32_t seed) {
  WeightOnlyCase<Q, IO> c(p, seed);
  const Status s = c.run();
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_TRUE(testing::close_in_max_and_mean(c.out, c.reference(), 0.01, 0.002)) << Q::kName << " group " << p.group;
}

TEST(WeightOnly, W4A16GroupsWithAndWithoutZeroPointsMatchTheReference) {
  expect_matches_reference<quant::W4A16>(Problem{}, 3);                               // group 64, zero points
  expect_matches_reference<quant::W4A16>(Problem{23, 5, 200, 192, 2, 128, false}, 4);  // group 128, default zero
  expect_matches_reference<quant::W4A16>(Problem{9, 3, 96, 64, 3, 32, true}, 5);      // group 32
  expect_matches_reference<quant::W4A16>(Problem{9, 4, 96, 80, 2, 0, false}, 6);      // per channel
  expect_matches_reference<quant::W4A16, half>(Problem{9, 4, 128, 96, 2, 32, true}, 7);  // f16 activations
}

TEST(WeightOnly, W8A16MatchesTheReference) {
  expect_matches_reference<quant::W8A16>(Problem{}, 8);
  expect_matches_reference<quant::W8A16>(Problem{9, 3, 96, 64, 3, 0, false}, 9);
}

// GPTQ act-order: each expert's w13 codes in their own K order, the order beside them. Checked
// also: the order matters (the identity order gives another output).
TEST(WeightOnly, ActOrderMatchesTheReference) {
  Problem p;
  p.act_order = true;
  expect_matches_reference<quant::W4A16>(p, 13);
  p.zero_points = false;
  p.group = 128;
  expect_matches_reference<quant::W8A16>(p, 14);
  WeightOnlyCase<quant::W4A16, bfloat16> c(Problem{9, 3, 128, 64, 2, 32, false, true}, 15);
  ASSERT_TRUE(c.run().is_ok());
  const std::vector<bfloat16> ordered = c.out;
  std::iota(c.k_order.begin(), c.k_order.begin() + 128, 0);  // expert 0 in the stored order
  ASSERT_TRUE(c.run().is_ok());
  int differ = 0;
  for (std::size_t i = 0; i < ordered.size(); ++i) differ += to_float(ordered[i]) != to_float(c.out[i]);
  EXPECT_GT(differ, 0);
}

// MXFP4 (moe/quant/mxfp4.h) against the unquantized kernel on weights the test dequantizes itself
// (its own E2M1 table, 2^(s - 127), rounded to bf16): the same CPU GEMMs on the same values, so
// the outputs are bitwise equal. SiluAndMul ([gate; up] rows) and gpt-oss's SwigluOai (interleaved
// rows) with expert biases; every code (the negative zero too) and scales over 2^-9..2^1.
struct Mxfp4Experts {
  Index M, E, H, I;
  int top_k;
  std::vector<bfloat16> hidden;
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
  testing::Mxfp4Matrix w13, w2;
  std::vector<bfloat16> b13, b2;

  Mxfp4Experts(Index m, Index e, Index h, Index i, int k, std::uint32_t seed) : M(m), E(e), H(h), I(i), top_k(k) {
    testing::Random r(seed);
    hidden = r.normal_vector<bfloat16>(static_cast<std::size_t>(M * H));
    ids = r.distinct_ids(static_cast<std::size_t>(M), static_cast<int>(E), k);
    weights = r.uniform_vector<float>(ids.size(), 0.2f, 1.0f);
    w13 = testing::mxfp4_matrix(E, 2 * I, H, seed + 1);
    w2 = testing::mxfp4_matrix(E, H, I, seed + 2);
    b13 = r.normal_vector<bfloat16>(static_cast<std::size_t>(E * 2 * I), 0.1f);
    b2 = r.normal_vector<bfloat16>(static_cast<std::size_t>(E * H), 0.1f);
  }

  template <class Activation, class Q>
  std::vector<bfloat16> run(bool biases) const {
    using K = Kernel<Spec<routing::Precomputed, StandardPrepareFinalize<>, Experts<Activation, Q, bfloat16>>, cpu::Eigen>;
    typename K::Arguments a;
    a.hidden_states = HostView<const bfloat16, 2>(hidden.data(), {M, H});
    a.topk_ids = HostView<const std::int32_t, 2>(ids.data(), {M, top_k});
    a.topk_weights = HostView<const float, 2>(weights.data(), {M, top_k});
    a.top_k = top_k;
    if constexpr (std::is_same_v<Q, quant::Mxfp4>) {
      a.w13 = HostView<const std::uint8_t, 3>(w13.codes.data(), {E, 2 * I, H / 2});
      a.w2 = HostView<const std::uint8_t, 3>(w2.codes.data(), {E, H, I / 2});
      a.quant.w13_scale = HostView<const std::uint8_t, 3>(w13.scales.data(), {E, 2 * I, H / 32});
      a.quant.w2_scale = HostView<const std::uint8_t, 3>(w2.scales.data(), {E, H, I / 32});
    } else {
      a.w13 = HostView<const bfloat16, 3>(w13.dequantized.data(), {E, 2 * I, H});
      a.w2 = HostView<const bfloat16, 3>(w2.dequantized.data(), {E, H, I});
    }
    if (biases) {
      a.w13_bias = HostView<const bfloat16, 2>(b13.data(), {E, 2 * I});
      a.w2_bias = HostView<const bfloat16, 2>(b2.data(), {E, H});
    }
    std::vector<bfloat16> out(hidden.size(), bfloat16(-7.0f));
    a.output = HostView<bfloat16, 2>(out.data(), {M, H});
    const Status st = K().run(a);
    EXPECT_TRUE(st.is_ok()) << st.to_string();
    return out;
  }
};

TEST(WeightOnly, Mxfp4EqualsTheUnquantizedKernelOnItsDequantizedWeights) {
  const Mxfp4Experts c(13, 4, 96, 64, 2, 21);
  for (const bool biases : {false, true}) {
    const auto a = c.run<SiluAndMul, quant::Mxfp4>(biases), b = c.run<SiluAndMul, quant::None<bfloat16>>(biases);
    EXPECT_TRUE(testing::BitwiseEqual(a, b)) << "SiluAndMul, biases " << biases;
    const auto x = c.run<SwigluOai, quant::Mxfp4>(biases), y = c.run<SwigluOai, quant::None<bfloat16>>(biases);
    EXPECT_TRUE(testing::BitwiseEqual(x, y)) << "SwigluOai, biases " << biases;
    double mag = 0;
    for (const bfloat16& v : x) mag = std::max(mag, std::fabs(static_cast<double>(to_float(v))));
    EXPECT_GT(mag, 0.0);
  }
}

// A 4-bit checkpoint whose nibbles are swapped (the odd k in the low nibble) is a different matrix:
// the forward's output differs, so a packing-order bug cannot pass the comparison above by symmetry.
TEST(WeightOnly, NibbleOrderMatters) {
  WeightOnlyCase<quant::W4A16, bfloat16> c(Problem{}, 12);
  ASSERT_TRUE(c.run().is_ok());
  const std::vector<bfloat16> straight = c.out;
  for (auto& b : c.w13.packed) b = static_cast<std::uint8_t>((b >> 4) | (b << 4));
  ASSERT_TRUE(c.run().is_ok());
  int differ = 0;
  for (std::size_t i = 0; i < straight.size(); ++i) differ += to_float(straight[i]) != to_float(c.out[i]);
  EXPECT_GT(differ, static_cast<int>(straight.size()) / 2);
}

// Two's-complement codes (quant.signed_codes) are the offset codes with the top bit of each code
// flipped: the same weights, so the output is bitwise the offset codes' (4 and 8 bits, the
// default zero point), and the flag alone, with the bytes unflipped, gives another matrix.
template <class Q>
void expect_signed_codes_equal_offset_codes(const Problem& p, std::uint32_t seed) {
  using K = typename WeightOnlyCase<Q, bfloat16>::K;
  WeightOnlyCase<Q, bfloat16> c(p, seed);
  ASSERT_TRUE(c.run().is_ok());
  const std::vector<bfloat16> offset = c.out;
  auto a = c.arguments();
  a.quant.signed_codes = true;
  c.out.assign(c.out.size(), bfloat16(-7.0f));
  ASSERT_TRUE(K().run(a).is_ok());
  int differ = 0;
  for (std::size_t i = 0; i < offset.size(); ++i) differ += to_float(offset[i]) != to_float(c.out[i]);
  EXPECT_GT(differ, static_cast<int>(offset.size()) / 2) << "the flag changed nothing";
  for (auto* m : {&c.w13, &c.w2}) {
    for (auto& b : m->packed) b ^= Q::kSignFlipByte;
  }
  c.out.assign(c.out.size(), bfloat16(-7.0f));
  ASSERT_TRUE(K().run(a).is_ok());
  for (std::size_t i = 0; i < offset.size(); ++i) ASSERT_EQ(to_float(offset[i]), to_float(c.out[i])) << Q::kName << " at " << i;
}

TEST(WeightOnly, SignedCodesAreTheOffsetCodesWithTheTopBitFlipped) {
  expect_signed_codes_equal_offset_codes<quant::W4A16>(Problem{23, 5, 200, 192, 2, 128, false}, 14);
  expect_signed_codes_equal_offset_codes<quant::W8A16>(Problem{23, 5, 200, 192, 2, 0, false}, 15);
}

// Bad shapes and sizes are errors naming the argument, with the output untouched.
TEST(WeightOnly, BadArgumentsAreNamedAndWriteNothing) {
  using Q = quant::W4A16;
  WeightOnlyCase<Q, bfloat16> c(Problem{});  // E 5, H 200, I 192, group 64: w13 [5, 384, 100], scales [5, 384, 4]
  std::vector<float> big(1 << 20, 1.0f);
  std::vector<std::uint8_t> bytes(1 << 20, 0);
  const auto expect_error = [&](auto edit, std::initializer_list<std::string> parts) {
    auto a = c.arguments();
    edit(a);
    const Status s = typename WeightOnlyCase<Q, bfloat16>::K().run(a);
    ASSERT_FALSE(s.is_ok());
    for (const std::string& part : parts) EXPECT_NE(s.message().find(part), std::string::npos) << s.to_string();
    for (const bfloat16& v : c.out) ASSERT_EQ(to_float(v), -7.0f) << "output written on error";
  };
  expect_error([&](auto& a) { a.quant.w13_scale = HostView<const float, 3>(big.data(), {5, 384, 3}); },
               {"quant.w13_scale", "[5, 384, 4]", "[5, 384, 3]"});
  expect_error([&](auto& a) { a.quant.w2_scale = HostView<const float, 3>(big.data(), {5, 200, 4}); },
               {"quant.w2_scale", "[5, 200, 3]", "[5, 200, 4]"});
  expect_error([&](auto& a) { a.quant.w13_scale = HostView<const float, 3>(); }, {"quant.w13_scale", "not given"});
  expect_error([&](auto& a) { a.quant.w2_zero.reset(); }, {"quant.w2_zero", "both GEMMs"});
  expect_error([&](auto& a) { a.quant.w2_zero = HostView<const std::uint8_t, 3>(bytes.data(), {5, 200, 2}); },
               {"quant.w2_zero", "[5, 200, 3]"});
  expect_error([&](auto& a) { a.quant.group_size = 48; }, {"quant.group_size", "multiple of 32", "48"});
  expect_error([&](auto& a) { a.quant.signed_codes = true; }, {"quant.w13_zero", "two's-complement", "no zero points"});
  std::vector<std::int32_t> order(5 * 200);
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<std::int32_t>(i % 200);
  expect_error([&](auto& a) { a.quant.w13_k_order = HostView<const std::int32_t, 2>(order.data(), {5, 199}); },
               {"quant.w13_k_order", "[5, 200]", "[5, 199]"});
  order[3 * 200 + 7] = 8;  // expert 3 takes column 8 twice
  expect_error([&](auto& a) { a.quant.w13_k_order = HostView<const std::int32_t, 2>(order.data(), {5, 200}); },
               {"quant.w13_k_order", "row 3", "not a permutation"});
  // Unpacked widths where packed ones belong.
  expect_error([&](auto& a) { a.w13 = HostView<const std::uint8_t, 3>(bytes.data(), {5, 384, 200}); },
               {"w13", "H/pack", "100"});
  expect_error([&](auto& a) { a.w2 = HostView<const std::uint8_t, 3>(bytes.data(), {5, 200, 191}); },
               {"w13", "2*I"});
  // An odd hidden size cannot be packed two codes per byte.
  WeightOnlyCase<Q, bfloat16> odd(Problem{3, 2, 64, 64, 1, 32, false});
  auto a = odd.arguments();
  std::vector<bfloat16> h(3 * 65), o(3 * 65, bfloat16(-7.0f));
  a.hidden_states = HostView<const bfloat16, 2>(h.data(), {3, 65});
  a.output = HostView<bfloat16, 2>(o.data(), {3, 65});
  const Status s = typename WeightOnlyCase<Q, bfloat16>::K().run(a);
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("divisible by 2"), std::string::npos) << s.to_string();
  for (const bfloat16& v : o) ASSERT_EQ(to_float(v), -7.0f);
}

}  // namespace
}  // namespace moe
