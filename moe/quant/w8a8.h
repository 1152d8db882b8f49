// W8A8 schemes: 8-bit weights (FP8 E4M3 or INT8) times 8-bit activations quantized before each
// GEMM, with vLLM's scale layouts (../shared/reference/vllm-semantics.md, section 3).
//
//   Fp8PerTensor          w scale per expert and GEMM [E, 1, 1]; activations static per-tensor
//                         (a13_scale, a2_scale: [1], the max over experts as vLLM loads them)
//   Fp8PerTokenChannel    w scale per output channel [E, N, 1]; activations dynamic per token
//   Fp8Block<BN, BK>      w scale per BN x BK block [E, ceil(N/BN), ceil(K/BK)] (DeepSeek-V3: 128x128,
//                         `weight_scale_inv`); a gated w13 ([gate; up]) is blocked per half, as
//                         vLLM stores it: [E, 2 * ceil(I/BN), ceil(H/BK)], so an I that is not a
//                         multiple of BN (192, or 320 per TP rank) is exact; activations dynamic per
//                         token and BK columns
//   Int8PerTokenChannel   INT8 weights, per-channel scales; activations dynamic per token (int8)
//
// The arithmetic, the same on every backend (and in the tests' independent reference):
//   quantize a row x (already rounded to the IO type):
//     dynamic: per group g (the row, or BK columns of it), amax = max |x| over g,
//              s = max(amax, 1e-10) / Q where Q = 448 (fp8) or 127 (int8);
//     static:  s = the given scale;
//     y = x * (1 / s) for static scales (1 / s rounded to fp32 first: vLLM's static quantizer
//         multiplies by the inverted scale), x / s for dynamic ones (vLLM's per-token kernel
//         divides);
//     q = fp8(y) (round to nearest even, saturating at +-448) or
//         int8(clamp(round_half_away(y), -128, 127)).
//     All-zero rows and tiny amax give a finite scale and zero codes: never inf or NaN.
//   GEMM: for each K block b (BK columns for Fp8Block, else the whole K):
//     acc += (sum over k in b of q[k] * w[n, k]) * s_x[b] * s_w[n, b]   (fp32, left to right)
//     the inner sum exact for int8 (an int32 accumulation) and in fp32 for fp8.
//   Between the GEMMs, as for the unquantized schemes, GEMM1's output is rounded to the IO type,
//   the activation applied and its output rounded to the IO type (vLLM's intermediate caches 1
//   and 2); that is quantized like the GEMM1 input (static schemes with a2_scale).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "moe/quant/numeric.h"
#include "moe/quant/scheme.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::quant {

template <class W>
struct W8Traits;
template <>
struct W8Traits<float8_e4m3> {
  static constexpr float kMax = 448.0f;
  MOE_HOST_DEVICE static float code(float v) { return float8_e4m3::to_float(float8_e4m3::from_float(v)); }
};
template <>
struct W8Traits<std::int8_t> {
  static constexpr float kMax = 127.0f;
  MOE_HOST_DEVICE static float code(float v) {
    if (!(v == v)) return 0.0f;  // NaN input: 0 (the scale is finite, so only a NaN element does this)
    const float r = v < 0.0f ? -std::floor(-v + 0.5f) : std::floor(v + 0.5f);  // half away from zero
    return r < -128.0f ? -128.0f : (r > 127.0f ? 127.0f : r);
  }
};

// The scale of a dynamically quantized group whose largest magnitude is `amax`.
template <class W>
MOE_HOST_DEVICE float dynamic_scale(float amax) {
  return (amax > 1e-10f ? amax : 1e-10f) / W8Traits<W>::kMax;
}

// `W`: weight and activation code type; `WeightScale`: kPerTensor, kPerChannel or kBlock;
// `ActScale`: kPerTensor (static), kPerToken or kGroup (dynamic, groups of BlockK).
template <class W, ScaleGranularity WeightScale, ScaleGranularity ActScale, int BlockN = 0, int BlockK = 0>
struct W8A8 {
  static_assert(std::is_same_v<W, float8_e4m3> || std::is_same_v<W, std::int8_t>,
                "moe::quant::W8A8: weights are moe::float8_e4m3 or std::int8_t");
  static_assert(WeightScale == ScaleGranularity::kPerTensor || WeightScale == ScaleGranularity::kPerChannel ||
                    WeightScale == ScaleGranularity::kBlock,
                "moe::quant::W8A8: weight scales are per tensor, per channel or per block");
  static_assert(ActScale == ScaleGranularity::kPerTensor || ActScale == ScaleGranularity::kPerToken ||
                    ActScale == ScaleGranularity::kGroup,
                "moe::quant::W8A8: activation scales are static per tensor, or dynamic per token or per group");
  static_assert((WeightScale == ScaleGranularity::kBlock) == (BlockN > 0 && BlockK > 0),
                "moe::quant::W8A8: block sizes are given exactly for block weight scales");
  static_assert(ActScale != ScaleGranularity::kGroup || WeightScale == ScaleGranularity::kBlock,
                "moe::quant::W8A8: per-group activations pair with block weight scales (the group is the block's K)");
  static_assert(!std::is_same_v<W, std::int8_t> || ActScale == ScaleGranularity::kPerToken,
                "moe::quant::W8A8: INT8 runs with dynamic per-token activations only (as vLLM: a static int8 "
                "activation scale is refused)");

  using WeightElement = W;
  using DefaultIO = bfloat16;
  static constexpr bool kQuantized = true;
  static constexpr ScaleGranularity kWeightScale = WeightScale;
  static constexpr ScaleGranularity kActScale = ActScale;
  static constexpr bool kStaticActivations = ActScale == ScaleGranularity::kPerTensor;
  static constexpr int kBlockN = BlockN, kBlockK = BlockK;
  static constexpr float kMax = W8Traits<W>::kMax;
  // fp8_block, fp8_per_token_channel, fp8_per_tensor, int8_per_token_channel (block sizes apart).
  static constexpr std::string_view kName =
      std::is_same_v<W, std::int8_t>                 ? "int8_per_token_channel"
      : WeightScale == ScaleGranularity::kBlock      ? "fp8_block"
      : WeightScale == ScaleGranularity::kPerChannel ? "fp8_per_token_channel"
                                                     : "fp8_per_tensor";

  MOE_HOST_DEVICE static float dequantize_weight(W w) { return to_float(w); }
  // v / s as vLLM's quantizers form it: static scales are inverted once (1 / s, rounded to fp32)
  // and multiplied, dynamic ones divide (vLLM's per-token kernel does, to match FBGEMM).
  MOE_HOST_DEVICE static float scaled(float v, float s) {
    if constexpr (kStaticActivations) return v * (1.0f / s);
    else return v / s;
  }
  // The code of value v at scale s, as a float (exact: every code is a float).
  MOE_HOST_DEVICE static float quantize(float v, float s) { return W8Traits<W>::code(scaled(v, s)); }
  // The same code in storage (what the GPU's GEMMs read).
  MOE_HOST_DEVICE static W encode(float v, float s) {
    if constexpr (std::is_same_v<W, float8_e4m3>) return float8_e4m3::from_bits(float8_e4m3::from_float(scaled(v, s)));
    else return static_cast<std::int8_t>(W8Traits<W>::code(scaled(v, s)));
  }

  // K blocks of a GEMM with reduction length k: the scale blocks along K.
  static constexpr Index k_blocks(Index k) { return BlockK > 0 ? (k + BlockK - 1) / BlockK : 1; }
  // The weight scale tensor's shape for weights [E, n, k]; `half` > 0: the rows are two halves of
  // `half` rows each ([gate; up]), blocked separately.
  static std::array<Index, 3> weight_scale_shape(Index e, Index n, Index k, Index half = 0) {
    if constexpr (WeightScale == ScaleGranularity::kPerTensor) return {e, 1, 1};
    else if constexpr (WeightScale == ScaleGranularity::kPerChannel) return {e, n, 1};
    else if (half > 0) return {e, 2 * ((half + BlockN - 1) / BlockN), (k + BlockK - 1) / BlockK};
    else return {e, (n + BlockN - 1) / BlockN, (k + BlockK - 1) / BlockK};
  }
  // The scale row of weight row `n` (the scale tensor's dimension 1), `half` as above.
  MOE_HOST_DEVICE static Index weight_scale_row(Index n, Index half = 0) {
    if constexpr (WeightScale == ScaleGranularity::kPerTensor) return 0;
    else if constexpr (WeightScale == ScaleGranularity::kPerChannel) return n;
    else if (half > 0 && n >= half) return (half + BlockN - 1) / BlockN + (n - half) / BlockN;
    else return n / BlockN;
  }

  template <class Space>
  struct Arguments {
    TensorView<const float, 3, Space> w13_scale;  // see weight_scale_shape(E, N1, H)
    TensorView<const float, 3, Space> w2_scale;   // see weight_scale_shape(E, H, I)
    // Static activation scales (Fp8PerTensor): [1] each. Unused by the dynamic schemes.
    std::optional<TensorView<const float, 1, Space>> a13_scale, a2_scale;

    // The shapes against a forward's sizes; an error names the tensor, the expected and the
    // actual shape. (Finite, positive values are the caller's: they come with the checkpoint,
    // whose loader checks them.)
    // `N1` = 2 * I: a gated w13, whose halves are blocked separately.
    Status validate(Index E, Index N1, Index H, Index I) const {
      MOE_RETURN_IF_ERROR(check_scale("quant.w13_scale", w13_scale, weight_scale_shape(E, N1, H, N1 == 2 * I ? I : 0)));
      MOE_RETURN_IF_ERROR(check_scale("quant.w2_scale", w2_scale, weight_scale_shape(E, H, I)));
      if constexpr (kStaticActivations) {
        if (!a13_scale || !a2_scale) {
          return invalid_argument(!a13_scale ? "quant.a13_scale" : "quant.a2_scale",
                                  ": required by static per-tensor activation scales (shape [1]), not given");
        }
        for (const auto& [name, v] : {std::pair{"quant.a13_scale", *a13_scale}, std::pair{"quant.a2_scale", *a2_scale}}) {
          if (v.extent(0) != 1 || v.data() == nullptr) {
            return invalid_argument(name, ": expected shape [1], got ", detail::format_shape(v.extents()));
          }
        }
      } else if (a13_scale || a2_scale) {
        return invalid_argument(a13_scale ? "quant.a13_scale" : "quant.a2_scale",
                                ": given, but this scheme quantizes activations dynamically");
      }
      return Status::ok();
    }

   private:
    static Status check_scale(const char* name, const TensorView<const float, 3, Space>& v,
                              const std::array<Index, 3>& expect) {
      if (v.data() == nullptr) return invalid_argument(name, ": required, expected shape ", detail::format_shape(expect), ", not given");
      if (v.extents() != expect) {
        return invalid_argument(name, ": expected shape ", detail::format_shape(expect), ", got ", detail::format_shape(v.extents()));
      }
      if (!v.is_contiguous()) return invalid_argument(name, ": expected a contiguous tensor");
      return Status::ok();
    }
  };
};

using Fp8PerTensor = W8A8<float8_e4m3, ScaleGranularity::kPerTensor, ScaleGranularity::kPerTensor>;
using Fp8PerTokenChannel = W8A8<float8_e4m3, ScaleGranularity::kPerChannel, ScaleGranularity::kPerToken>;
template <int BlockN = 128, int BlockK = 128>
using Fp8Block = W8A8<float8_e4m3, ScaleGranularity::kBlock, ScaleGranularity::kGroup, BlockN, BlockK>;
using Int8PerTokenChannel = W8A8<std::int8_t, ScaleGranularity::kPerChannel, ScaleGranularity::kPerToken>;

static_assert(QuantScheme<Fp8PerTensor>);
static_assert(QuantScheme<Fp8Block<>>);
static_assert(QuantScheme<Int8PerTokenChannel>);

}  // namespace moe::quant
