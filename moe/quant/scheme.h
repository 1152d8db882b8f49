// The quantization-scheme concept. A scheme names the element types of activations and weights,
// the granularity of their scales, and the scalar quantize/dequantize both backends call.
//
// This release ships the unquantized schemes (quant::None<T> for float, half, bfloat16). The
// schemes to come satisfy the same concept: FP8 per-tensor / per-token x per-channel /
// 128x128 block, INT8 W8A8, INT4/INT8 weight-only with group scales and zero points, MXFP4.
// Their scale tensors travel in the scheme's Arguments; the CPU experts stage dequantizes
// weights with Q::dequantize_weight into float panels, and the GEMM1 epilogue's RoundTo becomes
// a quantize step where the scheme re-quantizes the intermediate.
#pragma once

#include <concepts>
#include <string_view>

#include "moe/config.h"

namespace moe::quant {

// How a scale tensor is indexed.
enum class ScaleGranularity {
  kNone,       // no scale (unquantized)
  kPerTensor,  // one scale (per expert for weights)
  kPerToken,   // one per activation row
  kPerChannel, // one per weight output row
  kBlock,      // one per (block_m x block_n) tile, e.g. 128x128 for DeepSeek fp8
  kGroup,      // one per group of K elements (int4/int8 weight-only, MXFP4's 32)
};

template <class Q>
concept QuantScheme = requires {
  typename Q::ActElement;     // storage of hidden states fed to GEMM1
  typename Q::WeightElement;  // storage of w13 / w2
  typename Q::Arguments;      // scale and zero-point tensors, static activation scales
  { Q::kName } -> std::convertible_to<std::string_view>;
  { Q::kActScale } -> std::convertible_to<ScaleGranularity>;
  { Q::kWeightScale } -> std::convertible_to<ScaleGranularity>;
  { Q::kRequantizeIntermediate } -> std::convertible_to<bool>;
} && requires(typename Q::WeightElement w, float scale) {
  { Q::dequantize_weight(w, scale) } -> std::convertible_to<float>;
};

}  // namespace moe::quant
