// The unquantized schemes: weights stored as T (float, half or bfloat16), activations in the IO
// type, products accumulated in float.
#pragma once

#include <string_view>

#include "moe/quant/numeric.h"
#include "moe/quant/scheme.h"

namespace moe::quant {

template <class T>
struct None {
  static_assert(is_storage_float_v<T>, "moe::quant::None<T>: T must be float, moe::half or moe::bfloat16");
  using WeightElement = T;
  using DefaultIO = T;
  template <class Space>
  struct Arguments {
    Status validate(Index, Index, Index, Index) const { return Status::ok(); }
  };
  static constexpr std::string_view kName = std::is_same_v<T, float> ? "f32" : (std::is_same_v<T, half> ? "f16" : "bf16");
  static constexpr bool kQuantized = false;
  static constexpr ScaleGranularity kActScale = ScaleGranularity::kNone;
  static constexpr ScaleGranularity kWeightScale = ScaleGranularity::kNone;
  MOE_HOST_DEVICE static float dequantize_weight(T w) { return to_float(w); }
};

using F32 = None<float>;
using F16 = None<half>;
using BF16 = None<bfloat16>;

static_assert(QuantScheme<F32>);
static_assert(QuantScheme<F16>);
static_assert(QuantScheme<BF16>);

}  // namespace moe::quant
