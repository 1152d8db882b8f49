// The quantization-scheme concept: what the expert GEMMs multiply, in which storage, with which
// scales. The element type of hidden states and output is not the scheme's: it is the Experts
// policy's (moe::Experts<Activation, Scheme, IO>), so one scheme serves bf16, f16 and f32 models.
//
// A scheme declares
//   WeightElement        storage of w13 / w2 (the IO type for the unquantized schemes, float8_e4m3
//                        or int8 for W8A8)
//   DefaultIO            the IO type when the Experts policy names none
//   kQuantized           whether activations are quantized before each GEMM and scales applied
//   kWeightScale         weight scale layout (kBlock: kBlockN x kBlockK blocks of [N, K])
//   kActScale            activation quantizer: kPerTensor (static scales), kPerToken (dynamic, one per
//                        row), kGroup (dynamic, one per row and kBlockK columns)
//   Arguments<Space>     the scale tensors it adds to a forward's arguments, with
//                        validate(E, N1, H, I) naming a tensor whose shape is wrong
//   dequantize_weight    the stored weight as the float the GEMM multiplies (before scales)
// A weight-only scheme (moe/quant/weight_only.h) declares instead
//   kWeightOnly = true   integer codes dequantized per group to the IO type; activations as they are
//   kPack                codes per stored element along K (2: two 4-bit codes per byte)
// Both backends implement the same arithmetic, written out in moe/quant/w8a8.h and weight_only.h.
#pragma once

#include <array>
#include <concepts>
#include <string_view>

#include "moe/config.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::quant {

// How a scale tensor is indexed.
enum class ScaleGranularity {
  kNone,       // no scale (unquantized)
  kPerTensor,  // one scale (per expert for weights)
  kPerToken,   // one per activation row
  kPerChannel, // one per weight output row
  kBlock,      // one per (block_n x block_k) tile of a weight, e.g. 128x128 for DeepSeek fp8
  kGroup,      // one per group of K elements (per-token-group activations, weight-only groups)
};

template <class Q>
concept QuantScheme = requires {
  typename Q::WeightElement;
  typename Q::DefaultIO;
  typename Q::template Arguments<HostSpace>;
  typename Q::template Arguments<DeviceSpace>;
  { Q::kName } -> std::convertible_to<std::string_view>;
  { Q::kQuantized } -> std::convertible_to<bool>;
  { Q::kActScale } -> std::convertible_to<ScaleGranularity>;
  { Q::kWeightScale } -> std::convertible_to<ScaleGranularity>;
} && requires(const typename Q::template Arguments<HostSpace>& a, Index n) {
  { a.validate(n, n, n, n) } -> std::same_as<Status>;
} && (requires { requires Q::kWeightOnly; } || requires(typename Q::WeightElement w) {
  { Q::dequantize_weight(w) } -> std::convertible_to<float>;
});

// Whether Q stores integer codes dequantized per group (activations unquantized).
template <class Q>
inline constexpr bool weight_only_v = [] {
  if constexpr (requires { Q::kWeightOnly; }) return static_cast<bool>(Q::kWeightOnly);
  else return false;
}();
// Codes per stored weight element along K (the stored tensors are [.., N, K / pack]).
template <class Q>
inline constexpr Index weight_pack_v = [] {
  if constexpr (requires { Q::kPack; }) return static_cast<Index>(Q::kPack);
  else return Index{1};
}();

// A scheme tensor of rank 3 against its expected shape: given (unless empty), the shape, contiguous.
template <class T, class Space>
Status check_scheme_tensor(const char* name, const TensorView<const T, 3, Space>& v, const std::array<Index, 3>& expect) {
  if (v.data() == nullptr && expect[0] * expect[1] * expect[2] > 0) {
    return invalid_argument(name, ": required, expected shape ", moe::detail::format_shape(expect), ", not given");
  }
  if (v.extents() != expect) {
    return invalid_argument(name, ": expected shape ", moe::detail::format_shape(expect), ", got ",
                            moe::detail::format_shape(v.extents()));
  }
  if (!v.is_contiguous()) return invalid_argument(name, ": expected a contiguous tensor");
  return Status::ok();
}

}  // namespace moe::quant
