// Activations (moe/activation.h), storage number types (moe/quant/numeric.h) and epilogue
// expressions (moe/epilogue.h).
//
//  * every built-in activation's apply() against the independent double definitions of
//    testing/lib/naive.h, and a user-written gated activation;
//  * moe::bfloat16 / moe::half round-to-nearest-even, bit for bit, against a double-based
//    reference rounding written here; every 16-bit pattern round-trips through float;
//  * Gemm1Epilogue / Gemm2Epilogue evaluated through the Eigen path (moe::cpu::BlockContext) and
//    through the scalar path (eval with a context defined here): the two must agree bitwise.
#include <gtest/gtest.h>

#include <Eigen/Core>
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "moe/activation.h"
#include "moe/cpu/eigen_interop.h"
#include "moe/cpu/experts_stage.h"
#include "moe/epilogue.h"
#include "moe/quant/numeric.h"
#include "testing/lib/naive.h"
#include "testing/lib/random.h"

namespace {

using moe::Index;
using moe::testing::Random;
namespace naive = moe::naive;
namespace epilogue = moe::epilogue;

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// A user-written gated activation: vLLM's silu_and_mul_with_clamp (swiglu_limit),
// silu(min(gate, L)) * clamp(up, -L, L), with the limit as a run-time argument.

struct ClampedSiluAndMul : moe::GatedActivation {
  static constexpr std::string_view kName = "clamped_silu_and_mul";
  struct Arguments {
    float limit = 7.0f;
  };
  static float apply(float gate, float up, const Arguments& a) {
    const float g = gate < a.limit ? gate : a.limit;
    const float u = up < -a.limit ? -a.limit : (up > a.limit ? a.limit : up);
    return g / (1.0f + std::exp(-g)) * u;
  }
};
static_assert(moe::ActivationPolicy<ClampedSiluAndMul>);

double clamped_silu_reference(double gate, double up, double limit) {
  const double g = std::min(gate, limit);
  return naive::silu(g) * std::clamp(up, -limit, limit);
}

// Not activations: the concept must say so.
struct NoName : moe::GatedActivation {
  static float apply(float g, float u) { return g * u; }
};
struct WrongArity : moe::GatedActivation {
  static constexpr std::string_view kName = "wrong_arity";
  static float apply(float x) { return x; }  // gated, but takes one value
};
static_assert(!moe::ActivationPolicy<NoName>);
static_assert(!moe::ActivationPolicy<WrongArity>);
static_assert(!moe::ActivationPolicy<int>);

// ---------------------------------------------------------------------------------------------
// Activations vs the naive double definitions.

// |got - expected| <= 1e-6 |expected| + 1e-6.
::testing::AssertionResult within_tolerance(float got, double expected, float a, float b) {
  const double d = std::abs(static_cast<double>(got) - expected);
  if (d <= 1e-6 * std::abs(expected) + 1e-6) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "inputs (" << a << ", " << b << "): got " << got << ", expected " << expected
                                       << " (diff " << d << ")";
}

std::vector<float> sample_inputs(Random& rng, float lo, float hi, int n) {
  std::vector<float> v = {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-40f, 1.0f, -1.0f, lo, hi, 0.5f * (lo + hi)};
  for (int i = 0; i < n; ++i) v.push_back(rng.uniform(lo, hi));
  return v;
}

template <class A, class Ref>
void check_gated(const Ref& reference, float glo, float ghi, float ulo, float uhi, const typename A::Arguments& args = {}) {
  Random rng(1000 + A::kName.size());
  const std::vector<float> gates = sample_inputs(rng, glo, ghi, 400), ups = sample_inputs(rng, ulo, uhi, 150);
  int failures = 0;
  for (float g : gates) {
    for (float u : ups) {
      const float got = moe::apply_gated<A>(g, u, args);
      const auto ok = within_tolerance(got, reference(g, u), g, u);
      if (!ok && ++failures <= 5) ADD_FAILURE() << A::kName << ": " << ok.message();
    }
  }
  EXPECT_EQ(failures, 0) << A::kName;
}

template <class A, class Ref>
void check_ungated(const Ref& reference, float lo, float hi) {
  Random rng(2000 + A::kName.size());
  int failures = 0;
  for (float x : sample_inputs(rng, lo, hi, 20000)) {
    const float got = moe::apply_ungated<A>(x, {});
    const auto ok = within_tolerance(got, reference(x), x, 0.0f);
    if (!ok && ++failures <= 5) ADD_FAILURE() << A::kName << ": " << ok.message();
  }
  EXPECT_EQ(failures, 0) << A::kName;
}

TEST(Activation, SiluAndMulMatchesReference) {
  static_assert(moe::SiluAndMul::kGated && moe::SiluAndMul::kLayout == moe::GateUpLayout::kSplit);
  check_gated<moe::SiluAndMul>([](double g, double u) { return naive::silu(g) * u; }, -30.0f, 30.0f, -4.0f, 4.0f);
}

TEST(Activation, GeluAndMulMatchesReference) {
  static_assert(moe::GeluAndMul::kGated && moe::GeluAndMul::kLayout == moe::GateUpLayout::kSplit);
  check_gated<moe::GeluAndMul>([](double g, double u) { return naive::gelu(g) * u; }, -12.0f, 12.0f, -4.0f, 4.0f);
  // The exact erf form, not the tanh approximation: they differ by ~1e-4 around |x| ~ 2.
  EXPECT_GT(std::abs(moe::GeluAndMul::apply(2.0f, 1.0f) - naive::gelu_tanh(2.0)), 1e-5);
}

TEST(Activation, GeluTanhAndMulMatchesReference) {
  check_gated<moe::GeluTanhAndMul>([](double g, double u) { return naive::gelu_tanh(g) * u; }, -12.0f, 12.0f, -4.0f, 4.0f);
  EXPECT_GT(std::abs(moe::GeluTanhAndMul::apply(2.0f, 1.0f) - naive::gelu(2.0)), 1e-5);
}

TEST(Activation, SwigluOaiMatchesReferenceBeyondTheClamp) {
  static_assert(moe::SwigluOai::kLayout == moe::GateUpLayout::kInterleaved);
  const moe::SwigluOai::Arguments defaults;
  EXPECT_EQ(defaults.alpha, 1.702f);
  EXPECT_EQ(defaults.limit, 7.0f);
  // reliability.md 3.4 #41: gate in [-20, 50], up in [-50, 50].
  Random rng(3001);
  const std::vector<float> gates = sample_inputs(rng, -20.0f, 50.0f, 400), ups = sample_inputs(rng, -50.0f, 50.0f, 200);
  int gate_above = 0, up_above = 0, up_below = 0, failures = 0;
  for (float g : gates) gate_above += g > 7.0f;
  for (float u : ups) up_above += u > 7.0f, up_below += u < -7.0f;
  EXPECT_GT(gate_above, 100);
  EXPECT_GT(up_above, 40);
  EXPECT_GT(up_below, 40);
  for (float g : gates) {
    for (float u : ups) {
      const auto ok = within_tolerance(moe::SwigluOai::apply(g, u, defaults), naive::swigluoai(g, u), g, u);
      if (!ok && ++failures <= 5) ADD_FAILURE() << ok.message();
    }
  }
  EXPECT_EQ(failures, 0);
  // Beyond the limit the output no longer depends on the input.
  EXPECT_EQ(moe::SwigluOai::apply(7.0f, 3.0f, defaults), moe::SwigluOai::apply(40.0f, 3.0f, defaults));
  EXPECT_EQ(moe::SwigluOai::apply(2.0f, 7.0f, defaults), moe::SwigluOai::apply(2.0f, 45.0f, defaults));
  EXPECT_EQ(moe::SwigluOai::apply(2.0f, -7.0f, defaults), moe::SwigluOai::apply(2.0f, -45.0f, defaults));
  // The gate is clamped above only: very negative gates give ~0, not the value at -7.
  EXPECT_NEAR(moe::SwigluOai::apply(-40.0f, 3.0f, defaults), 0.0, 1e-12);
  // up + 1: up = -1 gives exactly zero.
  EXPECT_EQ(moe::SwigluOai::apply(3.0f, -1.0f, defaults), 0.0f);
}

TEST(Activation, SwigluOaiUsesItsRunTimeArguments) {
  const moe::SwigluOai::Arguments args{1.0f, 3.0f};
  check_gated<moe::SwigluOai>([](double g, double u) { return naive::swigluoai(g, u, 1.0, 3.0); }, -10.0f, 10.0f, -10.0f,
                              10.0f, args);
  EXPECT_NE(moe::SwigluOai::apply(5.0f, 1.0f, args), moe::SwigluOai::apply(5.0f, 1.0f, {}));
}

TEST(Activation, UngatedMatchReference) {
  static_assert(!moe::Silu::kGated && !moe::Gelu::kGated && !moe::Relu2::kGated);
  check_ungated<moe::Silu>([](double x) { return naive::silu(x); }, -40.0f, 40.0f);
  check_ungated<moe::Gelu>([](double x) { return naive::gelu(x); }, -12.0f, 12.0f);
  check_ungated<moe::Relu2>([](double x) { return naive::relu2(x); }, -1000.0f, 1000.0f);
  EXPECT_EQ(moe::Relu2::apply(-3.0f), 0.0f);
  EXPECT_EQ(moe::Relu2::apply(3.0f), 9.0f);
}

TEST(Activation, NamesAreDistinct) {
  const std::vector<std::string_view> names = {moe::SiluAndMul::kName, moe::GeluAndMul::kName, moe::GeluTanhAndMul::kName,
                                               moe::SwigluOai::kName,  moe::Silu::kName,        moe::Gelu::kName,
                                               moe::Relu2::kName};
  for (std::size_t i = 0; i < names.size(); ++i) {
    EXPECT_FALSE(names[i].empty());
    for (std::size_t j = i + 1; j < names.size(); ++j) EXPECT_NE(names[i], names[j]);
  }
}

TEST(Activation, UserGatedActivation) {
  for (float limit : {7.0f, 2.5f}) {
    check_gated<ClampedSiluAndMul>([limit](double g, double u) { return clamped_silu_reference(g, u, limit); }, -20.0f,
                                   20.0f, -20.0f, 20.0f, ClampedSiluAndMul::Arguments{limit});
  }
  // apply_gated forwards the Arguments; policies without Arguments in apply are called without.
  EXPECT_EQ(moe::apply_gated<ClampedSiluAndMul>(9.0f, 9.0f, {2.0f}), ClampedSiluAndMul::apply(2.0f, 2.0f, {2.0f}));
  EXPECT_EQ(moe::apply_gated<moe::SiluAndMul>(1.5f, -2.0f, {}), moe::SiluAndMul::apply(1.5f, -2.0f));
  EXPECT_EQ(moe::apply_ungated<moe::Gelu>(1.5f, {}), moe::Gelu::apply(1.5f));
}

// ---------------------------------------------------------------------------------------------
// bfloat16 and half: round to nearest even, checked bit for bit against a reference rounding
// done in double.

// A binary floating-point format: `precision` significand bits (with the implicit one), smallest
// normal exponent `emin`, largest finite value `max_finite`.
struct Format {
  int precision;
  int emin;
  double max_finite;
};
constexpr Format kBf16{8, -126, 0x1.fep127};
constexpr Format kHalf{11, -14, 65504.0};

// x rounded to the format, to nearest with ties to even, overflowing to +-inf; gradual underflow.
double reference_round(double x, Format f) {
  if (x == 0 || std::isinf(x)) return x;
  const double a = std::abs(x);
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1): the leading bit is 2^(e-1)
  const int exponent = std::max(e - 1, f.emin);
  const double quantum = std::ldexp(1.0, exponent - (f.precision - 1));
  const double q = a / quantum;  // exact: a has at most 24 significant bits
  double r = std::floor(q);
  const double frac = q - r;  // exact
  if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0.0)) r += 1.0;
  double v = r * quantum;
  if (v > f.max_finite) v = std::numeric_limits<double>::infinity();
  return std::copysign(v, x);
}

// Bit patterns of a value of the format, encoded independently of the library.
std::uint16_t encode_bf16(double v) {  // v: exactly representable (or inf)
  const std::uint32_t u = std::bit_cast<std::uint32_t>(static_cast<float>(v));
  EXPECT_EQ(u & 0xffffu, 0u) << v;
  return static_cast<std::uint16_t>(u >> 16);
}
std::uint16_t encode_half(double v) {
  const std::uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  const double a = std::abs(v);
  if (std::isinf(a)) return sign | 0x7c00;
  if (a < 0x1p-14) return sign | static_cast<std::uint16_t>(a / 0x1p-24);  // subnormal (or zero)
  int e;
  const double m = std::frexp(a, &e);  // a = m * 2^e
  const int exponent = e - 1;          // a = (2m) * 2^exponent, 2m in [1, 2)
  const auto mant = static_cast<std::uint16_t>((2.0 * m - 1.0) * 1024.0);
  return sign | static_cast<std::uint16_t>((exponent + 15) << 10) | mant;
}
// Decoding, also independent.
double decode_half(std::uint16_t h) {
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  const int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0x1f) return mant ? std::numeric_limits<double>::quiet_NaN() : sign * std::numeric_limits<double>::infinity();
  if (exp == 0) return sign * std::ldexp(mant, -24);
  return sign * std::ldexp(1024 + mant, exp - 25);
}
double decode_bf16(std::uint16_t b) {
  const double sign = (b & 0x8000) ? -1.0 : 1.0;
  const int exp = (b >> 7) & 0xff, mant = b & 0x7f;
  if (exp == 0xff) return mant ? std::numeric_limits<double>::quiet_NaN() : sign * std::numeric_limits<double>::infinity();
  if (exp == 0) return sign * std::ldexp(mant, -133);
  return sign * std::ldexp(128 + mant, exp - 134);
}

std::string hex(std::uint32_t u) {
  std::ostringstream os;
  os << "0x" << std::hex << u;
  return os.str();
}

// The float inputs of the sweep: both formats' values, the midpoints between neighbours (ties)
// and the floats just around them, every exponent with spread mantissas, random bit patterns, and
// the specials.
std::vector<float> sweep_inputs() {
  std::vector<float> v;
  v.reserve(12'000'000);
  for (std::uint32_t b = 0; b < 0x10000; ++b) {  // bf16 values, ties and neighbours of ties
    for (std::uint32_t low : {0x0000u, 0x0001u, 0x3fffu, 0x7fffu, 0x8000u, 0x8001u, 0xbfffu, 0xffffu}) {
      v.push_back(std::bit_cast<float>((b << 16) | low));
    }
  }
  for (std::uint32_t h = 0; h < 0x7c00; ++h) {  // half values and the midpoints to the next one
    const double lo = decode_half(static_cast<std::uint16_t>(h));
    const double hi = h + 1 == 0x7c00 ? 65536.0 : decode_half(static_cast<std::uint16_t>(h + 1));
    const auto mid = static_cast<float>(0.5 * (lo + hi));  // exact: 12 significant bits
    for (float x : {static_cast<float>(lo), mid, std::nextafter(mid, 0.0f), std::nextafter(mid, kInf)}) {
      v.push_back(x);
      v.push_back(-x);
    }
  }
  for (int exponent = 1; exponent < 255; ++exponent) {  // every float exponent, spread mantissas
    for (std::uint32_t i = 0; i < (1u << 13); ++i) {
      const std::uint32_t mant = (i << 10) | ((i * 2654435761u) >> 22);
      v.push_back(std::bit_cast<float>((static_cast<std::uint32_t>(exponent) << 23) | (mant & 0x7fffffu)));
      v.push_back(std::bit_cast<float>(0x80000000u | (static_cast<std::uint32_t>(exponent) << 23) | (i << 10)));
    }
  }
  for (std::uint32_t i = 0; i < (1u << 16); ++i) v.push_back(std::bit_cast<float>(i * 37u));  // float subnormals
  std::mt19937_64 gen(4242);
  for (int i = 0; i < 3'000'000; ++i) {
    const auto u = static_cast<std::uint32_t>(gen());
    v.push_back(std::bit_cast<float>(u));
    // Concentrated in the half range (|x| < 2^17).
    v.push_back(std::bit_cast<float>((u & 0x80ffffffu) | (static_cast<std::uint32_t>(95 + (u >> 24) % 50) << 23)));
  }
  for (float x : {0.0f, -0.0f, kInf, -kInf, std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::min(), std::numeric_limits<float>::denorm_min(), 65504.0f, 65519.0f,
                  65519.996f, 65520.0f, 65536.0f, 1e9f, 0x1p-24f, 0x1p-25f, 0x1.000002p-25f, 0x1.8p-24f, 0x1p-14f}) {
    v.push_back(x);
    v.push_back(-x);
  }
  return v;
}

template <class T>
void check_rounding(Format f, std::uint16_t (*encode)(double)) {
  int failures = 0;
  std::size_t checked = 0;
  for (float x : sweep_inputs()) {
    if (std::isnan(x)) continue;
    const std::uint16_t expected = encode(reference_round(x, f));
    const std::uint16_t got = T::from_float(x);
    const std::uint16_t via_ctor = T(x).bits;
    ++checked;
    if ((got != expected || via_ctor != expected) && ++failures <= 10) {
      ADD_FAILURE() << "x = " << std::hexfloat << x << std::defaultfloat << " (" << x << ", bits "
                    << hex(std::bit_cast<std::uint32_t>(x)) << "): got " << hex(got) << ", expected " << hex(expected);
    }
  }
  EXPECT_EQ(failures, 0);
  EXPECT_GT(checked, 10'000'000u);
}

TEST(NumericTypes, Bfloat16RoundsToNearestEvenBitwise) { check_rounding<moe::bfloat16>(kBf16, encode_bf16); }
TEST(NumericTypes, HalfRoundsToNearestEvenBitwise) { check_rounding<moe::half>(kHalf, encode_half); }

TEST(NumericTypes, HalfEdgeCases) {
  using moe::half;
  EXPECT_EQ(half::from_float(65504.0f), 0x7bff);
  EXPECT_EQ(half::from_float(65519.0f), 0x7bff);
  EXPECT_EQ(half::from_float(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(half::from_float(65520.0f), 0x7c00);  // the tie above the largest finite goes to inf
  EXPECT_EQ(half::from_float(-65520.0f), 0xfc00);
  EXPECT_EQ(half::from_float(1e30f), 0x7c00);
  EXPECT_EQ(half::from_float(kInf), 0x7c00);
  EXPECT_EQ(half::from_float(-kInf), 0xfc00);
  EXPECT_EQ(half::from_float(-0.0f), 0x8000);
  // Subnormals: 2^-24 is the smallest; ties go to even.
  EXPECT_EQ(half::from_float(0x1p-24f), 0x0001);
  EXPECT_EQ(half::from_float(0x1p-25f), 0x0000);        // tie between 0 and 1: even
  EXPECT_EQ(half::from_float(0x1.000002p-25f), 0x0001);  // just above the tie
  EXPECT_EQ(half::from_float(0x1.8p-24f), 0x0002);       // tie between 1 and 2: even
  EXPECT_EQ(half::from_float(0x1.4p-23f), 0x0002);       // 2.5 * 2^-24: tie between 2 and 3: even
  EXPECT_EQ(half::from_float(-0x1p-24f), 0x8001);
  EXPECT_EQ(half::from_float(0x1.ff8p-15f), 0x03ff);     // 1023 * 2^-24: the largest subnormal
  EXPECT_EQ(half::from_float(0x1.ffcp-15f), 0x0400);     // 1023.5 * 2^-24: tie, rounds up to the smallest normal
  EXPECT_EQ(half::from_float(0x1p-14f), 0x0400);
  EXPECT_EQ(half::from_float(1.0f), 0x3c00);
  EXPECT_EQ(half::from_float(1.0f + 0x1p-11f), 0x3c00);  // tie: even
  EXPECT_EQ(half::from_float(1.0f + 0x1.8p-10f), 0x3c02);  // 1 + 1.5 ulp: tie between 1 and 2 ulp: even
  EXPECT_EQ(half::to_float(0x7bff), 65504.0f);
  EXPECT_EQ(half::to_float(0x0001), 0x1p-24f);
  EXPECT_EQ(half::to_float(0x03ff), 0x1.ff8p-15f);
  EXPECT_EQ(half::to_float(0xfc00), -kInf);
}

TEST(NumericTypes, Bfloat16EdgeCases) {
  using moe::bfloat16;
  EXPECT_EQ(bfloat16::from_float(1.0f), 0x3f80);
  EXPECT_EQ(bfloat16::from_float(std::bit_cast<float>(0x3f808000u)), 0x3f80);  // tie: even (down)
  EXPECT_EQ(bfloat16::from_float(std::bit_cast<float>(0x3f818000u)), 0x3f82);  // tie: even (up)
  EXPECT_EQ(bfloat16::from_float(std::bit_cast<float>(0x3f808001u)), 0x3f81);
  EXPECT_EQ(bfloat16::from_float(std::numeric_limits<float>::max()), 0x7f80);   // overflows to inf
  EXPECT_EQ(bfloat16::from_float(std::bit_cast<float>(0x7f7f7fffu)), 0x7f7f);  // largest finite stays
  EXPECT_EQ(bfloat16::from_float(-kInf), 0xff80);
  EXPECT_EQ(bfloat16::from_float(-0.0f), 0x8000);
  EXPECT_EQ(bfloat16::from_float(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(bfloat16::from_float(std::bit_cast<float>(0x00008001u)), 0x0001);  // subnormal, above the tie
  EXPECT_EQ(bfloat16::from_float(std::bit_cast<float>(0x007fffffu)), 0x0080);  // largest float subnormal -> min normal
}

TEST(NumericTypes, NaNStaysNaN) {
  for (std::uint32_t u : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0x7f800100u, 0x7fa00000u,
                          0x7f802000u, 0x7f801000u, 0x7f800fffu}) {
    const float nan = std::bit_cast<float>(u);
    ASSERT_TRUE(std::isnan(nan));
    const std::uint16_t b = moe::bfloat16::from_float(nan), h = moe::half::from_float(nan);
    EXPECT_TRUE(std::isnan(moe::bfloat16::to_float(b))) << hex(u) << " -> bf16 " << hex(b);
    EXPECT_TRUE(std::isnan(moe::half::to_float(h))) << hex(u) << " -> half " << hex(h);
    EXPECT_TRUE(std::isnan(static_cast<float>(moe::bfloat16(nan))));
    EXPECT_TRUE(std::isnan(moe::round_to<moe::half>(nan)));
  }
}

TEST(NumericTypes, EverySixteenBitPatternRoundTrips) {
  int bf_failures = 0, half_failures = 0;
  for (std::uint32_t p = 0; p < 0x10000; ++p) {
    const auto b = static_cast<std::uint16_t>(p);
    // bfloat16
    const float fb = moe::bfloat16::to_float(b);
    const double db = decode_bf16(b);
    if (std::isnan(db)) {
      EXPECT_TRUE(std::isnan(fb)) << hex(p);
      EXPECT_TRUE(std::isnan(moe::bfloat16::to_float(moe::bfloat16::from_float(fb)))) << hex(p);
    } else {
      bf_failures += static_cast<double>(fb) != db || moe::bfloat16::from_float(fb) != b ||
                     std::signbit(fb) != static_cast<bool>(p & 0x8000) || static_cast<float>(moe::bfloat16::from_bits(b)) != fb;
    }
    // half
    const float fh = moe::half::to_float(b);
    const double dh = decode_half(b);
    if (std::isnan(dh)) {
      EXPECT_TRUE(std::isnan(fh)) << hex(p);
      EXPECT_TRUE(std::isnan(moe::half::to_float(moe::half::from_float(fh)))) << hex(p);
    } else {
      const bool bad = static_cast<double>(fh) != dh || moe::half::from_float(fh) != b ||
                       std::signbit(fh) != static_cast<bool>(p & 0x8000) || static_cast<float>(moe::half::from_bits(b)) != fh;
      if (bad && ++half_failures <= 5) {
        ADD_FAILURE() << "half " << hex(p) << ": to_float " << fh << " (expected " << dh << "), back "
                      << hex(moe::half::from_float(fh));
      }
    }
  }
  EXPECT_EQ(bf_failures, 0);
  EXPECT_EQ(half_failures, 0);
}

TEST(NumericTypes, GenericHelpers) {
  static_assert(moe::is_storage_float_v<float> && moe::is_storage_float_v<moe::half> && moe::is_storage_float_v<moe::bfloat16>);
  static_assert(!moe::is_storage_float_v<double> && !moe::is_storage_float_v<std::int8_t>);
  const float x = 1.0f + 0x1p-9f + 0x1p-20f;  // rounds differently in each format
  EXPECT_EQ(moe::round_to<float>(x), x);
  EXPECT_EQ(moe::round_to<moe::bfloat16>(x), 1.0f);
  EXPECT_EQ(moe::round_to<moe::half>(x), 1.0f + 0x1p-9f);
  EXPECT_EQ(moe::from_float<moe::half>(x).bits, moe::half::from_float(x));
  EXPECT_EQ(moe::to_float(moe::bfloat16::from_bits(0x4049)), 3.140625f);
  EXPECT_EQ(moe::from_float<float>(x), x);
}

// ---------------------------------------------------------------------------------------------
// Epilogue expressions: the Eigen path (what the CPU backend runs) and the scalar path (what the
// CUDA epilogues run) agree bit for bit.

// The scalar context: one element (r, c) of a block, with the same layout conventions as
// moe::cpu::BlockContext (gate at column c and up at cols + c, or interleaved at 2c / 2c + 1).
template <class A>
struct ScalarContext {
  const float* acc;
  Index ld, cols;
  bool interleaved;
  const float* bias_data;
  const float* weight;
  const typename A::Arguments* args;
  Index r = 0, c = 0;

  template <epilogue::Part P>
  Index column() const {
    if constexpr (P == epilogue::Part::kAll) {
      return c;
    } else {
      constexpr bool up = P == epilogue::Part::kUp;
      return interleaved ? 2 * c + (up ? 1 : 0) : c + (up ? cols : 0);
    }
  }
  template <epilogue::Part P>
  float accumulator() const {
    return acc[r * ld + column<P>()];
  }
  template <epilogue::Part P>
  float bias() const {
    return bias_data[column<P>()];
  }
  float router_weight() const { return weight[r]; }
  template <class B>
  const typename B::Arguments& activation_arguments() const {
    return *args;
  }
};

struct Block {
  Index rows, cols, width, ld;
  std::vector<float> acc, bias, weight;
};

Block make_block(Random& rng, Index rows, Index cols, Index width, float stddev) {
  Block b{rows, cols, width, width + 3, {}, {}, {}};
  b.acc = rng.normal_vector<float>(static_cast<std::size_t>(rows * b.ld), stddev);
  for (Index r = 0; r < rows; ++r) {  // the padding columns must never be read
    for (Index c = width; c < b.ld; ++c) b.acc[r * b.ld + c] = std::numeric_limits<float>::quiet_NaN();
  }
  b.bias = rng.normal_vector<float>(static_cast<std::size_t>(width), 1.0f);
  b.weight = rng.uniform_vector<float>(static_cast<std::size_t>(rows), 0.0f, 1.0f);
  return b;
}

// Evaluates Expr over the block both ways; bitwise comparison, and every element finite.
template <class Expr, class A>
::testing::AssertionResult paths_agree(const Block& b, bool interleaved, bool has_bias, bool has_weight,
                                       const typename A::Arguments& args, std::vector<float>* values = nullptr) {
  const moe::cpu::BlockContext<A> block{b.acc.data(), b.rows, b.cols, b.ld, interleaved,
                                        has_bias ? b.bias.data() : nullptr, has_weight ? b.weight.data() : nullptr, &args};
  moe::cpu::ArrayRM row_major = Expr::eigen(block);
  Eigen::ArrayXXf col_major = Expr::eigen(block);
  if (row_major.rows() != b.rows || row_major.cols() != b.cols) {
    return ::testing::AssertionFailure() << "eigen block is " << row_major.rows() << "x" << row_major.cols();
  }
  ScalarContext<A> ctx{b.acc.data(), b.ld, b.cols, interleaved, b.bias.data(), b.weight.data(), &args};
  if (values) values->assign(static_cast<std::size_t>(b.rows * b.cols), 0.0f);
  for (Index r = 0; r < b.rows; ++r) {
    for (Index c = 0; c < b.cols; ++c) {
      ctx.r = r;
      ctx.c = c;
      const float s = Expr::eval(ctx);
      if (values) (*values)[r * b.cols + c] = s;
      const float e1 = row_major(r, c), e2 = col_major(r, c);
      if (std::bit_cast<std::uint32_t>(s) != std::bit_cast<std::uint32_t>(e1) ||
          std::bit_cast<std::uint32_t>(s) != std::bit_cast<std::uint32_t>(e2)) {
        return ::testing::AssertionFailure() << "element (" << r << ", " << c << "): scalar " << std::hexfloat << s
                                             << ", eigen row-major " << e1 << ", eigen col-major " << e2;
      }
      if (!std::isfinite(s)) return ::testing::AssertionFailure() << "element (" << r << ", " << c << ") is " << s;
    }
  }
  return ::testing::AssertionSuccess();
}

template <class T>
double storage_rel_eps() {
  if constexpr (std::is_same_v<T, moe::bfloat16>) return 0x1p-8;
  if constexpr (std::is_same_v<T, moe::half>) return 0x1p-11;
  return 0.0;
}

template <class T>
std::string type_name() {
  if constexpr (std::is_same_v<T, moe::bfloat16>) return "bfloat16";
  if constexpr (std::is_same_v<T, moe::half>) return "half";
  return "float";
}

// Gemm1Epilogue<A, T, HasBias> over a random block, both layouts; the values also match the
// naive double activation within the storage type's rounding.
template <class A, class T, bool HasBias, class Ref>
void check_gemm1(const Ref& reference, const typename A::Arguments& args = {}) {
  using Expr = epilogue::Gemm1Epilogue<A, T, HasBias>;
  Random rng(7000 + A::kName.size() * 7 + sizeof(T) + HasBias);
  const Index rows = 37, cols = 29, width = A::kGated ? 2 * cols : cols;
  const Block b = make_block(rng, rows, cols, width, 4.0f);
  const std::string what = std::string(A::kName) + " " + type_name<T>() + (HasBias ? " bias" : " no bias");
  for (bool interleaved : {false, true}) {
    std::vector<float> values;
    ASSERT_TRUE((paths_agree<Expr, A>(b, interleaved, HasBias, false, args, &values))) << what << " interleaved=" << interleaved;
    int exceeded_limit = 0, failures = 0;
    for (Index r = 0; r < rows; ++r) {
      for (Index c = 0; c < cols; ++c) {
        double expected;
        if constexpr (A::kGated) {
          const Index g = interleaved ? 2 * c : c, u = interleaved ? 2 * c + 1 : cols + c;
          // accumulator + bias is a float addition, stored in T, then the activation.
          const double gate = moe::round_to<T>(b.acc[r * b.ld + g] + (HasBias ? b.bias[g] : 0.0f));
          const double up = moe::round_to<T>(b.acc[r * b.ld + u] + (HasBias ? b.bias[u] : 0.0f));
          expected = reference(gate, up);
          exceeded_limit += gate > 7.0 || std::abs(up) > 7.0;
        } else {
          const double x = moe::round_to<T>(b.acc[r * b.ld + c] + (HasBias ? b.bias[c] : 0.0f));
          expected = reference(x, 0.0);
        }
        const double got = values[r * cols + c];
        const double tol = (storage_rel_eps<T>() + 2e-6) * std::abs(expected) + 1e-5;
        if (!(std::abs(got - expected) <= tol) && ++failures <= 3) {
          ADD_FAILURE() << what << " interleaved=" << interleaved << " (" << r << ", " << c << "): " << got << " vs "
                        << expected;
        }
      }
    }
    EXPECT_EQ(failures, 0) << what;
    if (A::kGated) {
      EXPECT_GT(exceeded_limit, 10) << what;  // stddev 4: the clamp of swigluoai is reached
    }
  }
}

template <class A, class Ref>
void check_gemm1_all(const Ref& reference, const typename A::Arguments& args = {}) {
  check_gemm1<A, float, false>(reference, args);
  check_gemm1<A, float, true>(reference, args);
  check_gemm1<A, moe::bfloat16, false>(reference, args);
  check_gemm1<A, moe::bfloat16, true>(reference, args);
  check_gemm1<A, moe::half, false>(reference, args);
  check_gemm1<A, moe::half, true>(reference, args);
}

TEST(Epilogue, Gemm1GatedBuiltIns) {
  check_gemm1_all<moe::SiluAndMul>([](double g, double u) { return naive::silu(g) * u; });
  check_gemm1_all<moe::GeluAndMul>([](double g, double u) { return naive::gelu(g) * u; });
  check_gemm1_all<moe::GeluTanhAndMul>([](double g, double u) { return naive::gelu_tanh(g) * u; });
  check_gemm1_all<moe::SwigluOai>([](double g, double u) { return naive::swigluoai(g, u); });
  check_gemm1_all<moe::SwigluOai>([](double g, double u) { return naive::swigluoai(g, u, 1.0, 3.0); },
                                  moe::SwigluOai::Arguments{1.0f, 3.0f});
}

TEST(Epilogue, Gemm1Ungated) {
  check_gemm1_all<moe::Silu>([](double x, double) { return naive::silu(x); });
  check_gemm1_all<moe::Gelu>([](double x, double) { return naive::gelu(x); });
  check_gemm1_all<moe::Relu2>([](double x, double) { return naive::relu2(x); });
}

TEST(Epilogue, Gemm1UserActivation) {
  check_gemm1_all<ClampedSiluAndMul>([](double g, double u) { return clamped_silu_reference(g, u, 2.0); },
                                     ClampedSiluAndMul::Arguments{2.0f});
}

// The tree shapes: what the aliases expand to.
static_assert(std::is_same_v<
              epilogue::Gemm1Epilogue<moe::SiluAndMul, moe::half, true>,
              epilogue::RoundTo<moe::half,
                                epilogue::GatedActivate<
                                    moe::SiluAndMul,
                                    epilogue::RoundTo<moe::half, epilogue::Plus<epilogue::Accumulator<epilogue::Part::kGate>,
                                                                                epilogue::Bias<epilogue::Part::kGate>>>,
                                    epilogue::RoundTo<moe::half, epilogue::Plus<epilogue::Accumulator<epilogue::Part::kUp>,
                                                                                epilogue::Bias<epilogue::Part::kUp>>>>>>);
static_assert(std::is_same_v<epilogue::Gemm1Epilogue<moe::Relu2, float, false>,
                             epilogue::RoundTo<float, epilogue::Activate<moe::Relu2, epilogue::RoundTo<float, epilogue::Accumulator<>>>>>);
static_assert(std::is_same_v<epilogue::Gemm2Epilogue<moe::bfloat16, false, true>,
                             epilogue::RoundTo<moe::bfloat16, epilogue::Times<epilogue::RoundTo<moe::bfloat16, epilogue::Accumulator<>>,
                                                                              epilogue::RouterWeight>>>);

template <class T, bool HasBias, bool WeightOutput>
void check_gemm2() {
  using Expr = epilogue::Gemm2Epilogue<T, HasBias, WeightOutput>;
  using A = moe::SiluAndMul;  // the activation plays no part in GEMM2's epilogue
  Random rng(8000 + sizeof(T) * 4 + HasBias * 2 + WeightOutput);
  const Index rows = 41, cols = 67;
  const Block b = make_block(rng, rows, cols, cols, 3.0f);
  const std::string what = type_name<T>() + (HasBias ? " bias" : " no bias") + (WeightOutput ? " weighted" : " unweighted");
  for (bool interleaved : {false, true}) {  // GEMM2 reads whole rows: the flag must not matter
    std::vector<float> values;
    ASSERT_TRUE((paths_agree<Expr, A>(b, interleaved, HasBias, WeightOutput, {}, &values))) << what;
    for (Index r = 0; r < rows; ++r) {
      for (Index c = 0; c < cols; ++c) {
        float x = b.acc[r * b.ld + c];
        if (HasBias) x = x + b.bias[c];
        x = moe::round_to<T>(x);  // stored GEMM2 output
        if (WeightOutput) x = moe::round_to<T>(x * b.weight[r]);
        // Exactly: float add, rounding to T, float multiply, rounding to T.
        ASSERT_EQ(std::bit_cast<std::uint32_t>(values[r * cols + c]), std::bit_cast<std::uint32_t>(x))
            << what << " (" << r << ", " << c << ")";
      }
    }
  }
}

TEST(Epilogue, Gemm2AllVariants) {
  check_gemm2<float, false, false>();
  check_gemm2<float, false, true>();
  check_gemm2<float, true, false>();
  check_gemm2<float, true, true>();
  check_gemm2<moe::bfloat16, false, false>();
  check_gemm2<moe::bfloat16, false, true>();
  check_gemm2<moe::bfloat16, true, false>();
  check_gemm2<moe::bfloat16, true, true>();
  check_gemm2<moe::half, false, false>();
  check_gemm2<moe::half, false, true>();
  check_gemm2<moe::half, true, false>();
  check_gemm2<moe::half, true, true>();
}

// A hand-written tree (not one of the two aliases) through both paths: leaves and nodes compose.
TEST(Epilogue, CustomTreeComposes) {
  using namespace epilogue;
  using Expr = RoundTo<moe::half, Times<Plus<Activate<moe::Silu, Plus<Accumulator<>, Bias<>>>, Accumulator<>>, RouterWeight>>;
  Random rng(9001);
  const Block b = make_block(rng, 13, 21, 21, 2.0f);
  std::vector<float> values;
  ASSERT_TRUE((paths_agree<Expr, moe::Silu>(b, false, true, true, {}, &values)));
  for (Index r = 0; r < b.rows; ++r) {
    for (Index c = 0; c < b.cols; ++c) {
      const float a = b.acc[r * b.ld + c];
      const float x = moe::round_to<moe::half>((moe::Silu::apply(a + b.bias[c]) + a) * b.weight[r]);
      ASSERT_EQ(values[r * b.cols + c], x) << r << ", " << c;
    }
  }
}

// Single-row and single-column blocks (Eigen's replicate / stride corner cases).
TEST(Epilogue, DegenerateBlocks) {
  Random rng(9002);
  for (Index rows : {1, 2, 5}) {
    for (Index cols : {1, 2, 9}) {
      const Block g = make_block(rng, rows, cols, 2 * cols, 3.0f);
      for (bool interleaved : {false, true}) {
        EXPECT_TRUE((paths_agree<epilogue::Gemm1Epilogue<moe::SwigluOai, moe::bfloat16, true>, moe::SwigluOai>(
            g, interleaved, true, false, {})))
            << rows << "x" << cols;
      }
      const Block o = make_block(rng, rows, cols, cols, 3.0f);
      EXPECT_TRUE((paths_agree<epilogue::Gemm2Epilogue<moe::half, true, true>, moe::SiluAndMul>(o, false, true, true, {})))
          << rows << "x" << cols;
    }
  }
}

}  // namespace
