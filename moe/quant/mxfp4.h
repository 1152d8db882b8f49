// MXFP4 weights (OCP Microscaling; gpt-oss's checkpoints): 4-bit E2M1 values, two per byte along K
// (the even k in the low nibble), and one E8M0 scale (a power of two, 2^(s - 127)) per 32 K
// elements; activations stay in the IO type. Kept packed as the checkpoint stores them:
//
//   w13 [E, N1, H / 2] uint8, w2 [E, H, I / 2] uint8           gpt-oss's *_blocks [.., K / 32, 16]
//   w13_scale [E, N1, H / 32], w2_scale [E, H, I / 32] uint8    gpt-oss's *_scales, E8M0
//
// The arithmetic, the same on every backend: w = IO(e2m1(q) * 2^(s - 127)), then the unquantized
// GEMM. (The product is exact in float; the one rounding is to IO, as widening the weights at load
// rounds them.) The E2M1 values: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (bit 3 the sign).
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "moe/quant/numeric.h"
#include "moe/quant/scheme.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::quant {

struct Mxfp4 {
  using WeightElement = std::uint8_t;  // two E2M1 codes
  using DefaultIO = bfloat16;
  static constexpr int kBits = 4;
  static constexpr Index kPack = 2;
  static constexpr Index kBlock = 32;  // K elements per E8M0 scale
  static constexpr bool kQuantized = false;
  static constexpr bool kWeightOnly = true;
  static constexpr ScaleGranularity kWeightScale = ScaleGranularity::kGroup;
  static constexpr ScaleGranularity kActScale = ScaleGranularity::kNone;
  static constexpr std::string_view kName = "mxfp4";

  MOE_HOST_DEVICE static unsigned code(const std::uint8_t* row, Index k) { return (row[k / 2] >> (4 * (k % 2))) & 0xFu; }
  MOE_HOST_DEVICE static float e2m1(unsigned q) {
    const float magnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    const float v = magnitude[q & 7u];
    return (q & 8u) ? -v : v;
  }
  // 2^(s - 127); 255 is E8M0's NaN.
  MOE_HOST_DEVICE static float e8m0(std::uint8_t s) {
    // The float's exponent field is s (2^-127, s = 0, is float's largest subnormal).
    const std::uint32_t bits = s == 0 ? 0x00400000u : s == 255 ? 0x7FC00000u : static_cast<std::uint32_t>(s) << 23;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  template <class IO>
  MOE_HOST_DEVICE static float dequantize(unsigned q, std::uint8_t scale) {
    return to_float(from_float<IO>(e2m1(q) * e8m0(scale)));
  }

  template <class Space>
  struct Arguments {
    TensorView<const std::uint8_t, 3, Space> w13_scale;  // [E, N1, H / 32]
    TensorView<const std::uint8_t, 3, Space> w2_scale;   // [E, H, I / 32]

    Status validate(Index E, Index N1, Index H, Index I) const {
      if (H % kBlock != 0 || I % kBlock != 0) {
        return invalid_argument("mxfp4: hidden and intermediate sizes must be multiples of 32 (one E8M0 scale per 32 "
                                "K elements), got H=", H, ", I=", I);
      }
      MOE_RETURN_IF_ERROR(check_scheme_tensor("quant.w13_scale", w13_scale, {E, N1, H / kBlock}));
      return check_scheme_tensor("quant.w2_scale", w2_scale, {E, H, I / kBlock});
    }

  };
};

static_assert(QuantScheme<Mxfp4>);

}  // namespace moe::quant
