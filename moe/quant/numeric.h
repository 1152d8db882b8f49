// Storage number types shared by both backends: moe::bfloat16, moe::half and moe::float8_e4m3.
//
// Conversions from float round to nearest even, exactly as the GPU's cvt.rn instructions do, so
// the CPU reference rounds bit-for-bit like the device wherever the algorithm allows. On the
// device the conversions are those instructions (NaNs keep the host's payload rule). Arithmetic
// is always done in float: these types only store.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>

#include "moe/config.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#endif

namespace moe {

struct bfloat16 {
  std::uint16_t bits = 0;

  bfloat16() = default;
  MOE_HOST_DEVICE explicit bfloat16(float x) : bits(from_float(x)) {}
  MOE_HOST_DEVICE explicit operator float() const { return to_float(bits); }

  MOE_HOST_DEVICE static bfloat16 from_bits(std::uint16_t b) {
    bfloat16 v;
    v.bits = b;
    return v;
  }
  MOE_HOST_DEVICE static std::uint16_t from_float(float x) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
#if defined(__CUDA_ARCH__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));  // cvt.rn.bf16.f32: the same bits, one instruction
#else
    const std::uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
    return static_cast<std::uint16_t>((u + rounding_bias) >> 16);
#endif
  }
  MOE_HOST_DEVICE static float to_float(std::uint16_t b) {
    return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
  }
};

struct half {
  std::uint16_t bits = 0;

  half() = default;
  MOE_HOST_DEVICE explicit half(float x) : bits(from_float(x)) {}
  MOE_HOST_DEVICE explicit operator float() const { return to_float(bits); }

  MOE_HOST_DEVICE static half from_bits(std::uint16_t b) {
    half v;
    v.bits = b;
    return v;
  }
  // IEEE binary16, round to nearest even, overflow to infinity, gradual underflow.
  MOE_HOST_DEVICE static std::uint16_t from_float(float x) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
    const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
    const std::uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(x));  // cvt.rn.f16.f32: the same bits, one instruction
#else
    if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (abs >= 0x38800000u) {  // normal half range (>= 2^-14)
      const std::uint32_t mant_round = abs + 0xfffu + ((abs >> 13) & 1u);
      return static_cast<std::uint16_t>(sign | ((mant_round - 0x38000000u) >> 13));
    }
    if (abs < 0x33000000u) return sign;  // below half of the smallest subnormal (2^-25): zero
    // Subnormal half: value = m * 2^-24, m = round_even(abs_value * 2^24).
    const int exp = static_cast<int>(abs >> 23);                   // biased float exponent
    const std::uint32_t mant = (abs & 0x7fffffu) | 0x800000u;     // with the implicit bit
    const int shift = 126 - exp;                                   // 14..24 for this range
    const std::uint32_t half_ulp = 1u << (shift - 1);
    std::uint32_t m = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1u);
    if (rem > half_ulp || (rem == half_ulp && (m & 1u))) ++m;
    return static_cast<std::uint16_t>(sign | m);
#endif
  }
  MOE_HOST_DEVICE static float to_float(std::uint16_t h) {
#if defined(__CUDA_ARCH__)
    if ((h & 0x7c00u) != 0x7c00u) return __half2float(__ushort_as_half(h));  // exact; inf/NaN below
#endif
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1fu;
    const std::uint32_t mant = h & 0x3ffu;
    if (exp == 0x1fu) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
    if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
    // Subnormal or zero: exact in float.
    const float magnitude = static_cast<float>(mant) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -magnitude : magnitude;
  }
};

// OCP FP8 E4M3 ("e4m3fn", torch.float8_e4m3fn, safetensors F8_E4M3): 1 sign, 4 exponent bits
// (bias 7), 3 mantissa bits, no infinities, NaN = S.1111.111, largest finite 448. From float:
// round to nearest even, saturating to +-448 (infinities too) as the quantizers of vLLM and the
// GPU's cvt.rn.satfinite do; NaN stays NaN.
struct float8_e4m3 {
  std::uint8_t bits = 0;

  static constexpr float kMax = 448.0f;

  float8_e4m3() = default;
  MOE_HOST_DEVICE explicit float8_e4m3(float x) : bits(from_float(x)) {}
  MOE_HOST_DEVICE explicit operator float() const { return to_float(bits); }

  MOE_HOST_DEVICE static float8_e4m3 from_bits(std::uint8_t b) {
    float8_e4m3 v;
    v.bits = b;
    return v;
  }
  MOE_HOST_DEVICE static std::uint8_t from_float(float x) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
    const std::uint8_t sign = static_cast<std::uint8_t>((u >> 24) & 0x80u);
    const std::uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return static_cast<std::uint8_t>(sign | 0x7fu);  // NaN
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    // cvt.rn.satfinite.e4m3x2.f32: the same round-to-nearest-even and saturation to 448 as below.
    return static_cast<std::uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
#else
    if (abs >= 0x43e00000u) return static_cast<std::uint8_t>(sign | 0x7eu);  // >= 448 (inf too): saturate
    if (abs >= 0x3c800000u) {  // normal e4m3 (>= 2^-6): keep 3 of the 23 mantissa bits, round to even
      const std::uint32_t r = abs + 0x7ffffu + ((abs >> 20) & 1u);
      if (r >= 0x43e80000u) return static_cast<std::uint8_t>(sign | 0x7eu);  // rounds past 448
      const std::uint32_t exp = (r >> 23) - 127u + 7u;
      return static_cast<std::uint8_t>(sign | (exp << 3) | ((r >> 20) & 7u));
    }
    // Subnormal: m * 2^-9 with m = round_even(|x| * 2^9) in 0..8 (8 is the smallest normal, whose
    // encoding is the same bits).
    const float scaled = std::bit_cast<float>(abs) * 512.0f;  // exact: a power of two
    std::uint32_t m = static_cast<std::uint32_t>(scaled);
    const float rem = scaled - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return static_cast<std::uint8_t>(sign | m);
#endif
  }
  MOE_HOST_DEVICE static float to_float(std::uint8_t b) {
    const std::uint32_t sign = static_cast<std::uint32_t>(b & 0x80u) << 24;
    const std::uint32_t exp = (b >> 3) & 0xfu, mant = b & 7u;
    if (exp == 0xfu && mant == 7u) return std::bit_cast<float>(sign | 0x7fc00000u);  // NaN
    if (exp != 0) return std::bit_cast<float>(sign | ((exp + 120u) << 23) | (mant << 20));
    const float magnitude = static_cast<float>(mant) * 0.001953125f;  // 2^-9
    return sign ? -magnitude : magnitude;
  }
};

// Converts any storage type to float and back; float is its own storage type.
template <class T>
MOE_HOST_DEVICE float to_float(T x) {
  return static_cast<float>(x);
}
template <class T>
MOE_HOST_DEVICE T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return T(x);
  }
}
// Rounds a float to the precision of storage type T (identity for float).
template <class T>
MOE_HOST_DEVICE float round_to(float x) {
#if defined(__CUDA_ARCH__)
  // On the device a 16-bit round trip is the cvt alone: the NaN test of from_float only chooses
  // a NaN's payload, which the GPU's arithmetic does not keep anyway (its results are canonical
  // NaNs), and the store that ends a tree still goes through from_float. Every other value gets
  // the same bits; the epilogue passes spent most of their instructions on that test.
  if constexpr (std::is_same_v<T, bfloat16>) return __bfloat162float(__float2bfloat16_rn(x));
  if constexpr (std::is_same_v<T, half>) return __half2float(__float2half_rn(x));
#endif
  return to_float(from_float<T>(x));
}

template <class T>
inline constexpr bool is_storage_float_v =
    std::is_same_v<T, float> || std::is_same_v<T, half> || std::is_same_v<T, bfloat16>;

}  // namespace moe
