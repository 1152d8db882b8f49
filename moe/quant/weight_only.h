// Weight-only integer schemes (W4A16, W8A16): weights stored as unsigned integer codes with a
// scale (and optionally a zero point) per output row and group of `group_size` K elements;
// activations stay in the IO type (bf16, f16). vLLM's `moe_wna16` layout
// (../shared/reference/vllm-semantics.md, section 3):
//
//   w13 [E, N1, H / kPack] uint8, w2 [E, H, I / kPack] uint8   codes along K; 4-bit: two per byte,
//                                                               the low nibble the even k
//   w13_scale [E, N1, ceil(H / G)], w2_scale [E, H, ceil(I / G)] float, G = group_size
//                                                               (0: one group over the whole K)
//   w13_zero, w2_zero (optional) uint8, the scales' shapes     one code per (row, group), unpacked
//                                                               (the loaders unpack GPTQ/AWQ's)
//   w13_k_order (optional) int32 [E, H]                         act-order (GPTQ desc_act): K element
//                                                               k of expert e's w13 codes multiplies
//                                                               hidden column w13_k_order[e][k]
//
// Act-order keeps groups contiguous: a loader sorts K by GPTQ's g_idx and stores the codes in that
// order with the order beside them, so group g is again K elements [g G, (g + 1) G). Only GEMM1
// needs the order at run time: w2's K order is the intermediate's, which the loader folds into the
// order of w13's rows (moe/layer/moe_layer.cc).
//
// The arithmetic, the same on every backend (and in the tests' independent reference):
//   s_io = IO(scale)          the scale in the activation dtype, as vLLM keeps it
//   w    = IO(float(q - z) * s_io)   z = the zero point, or kDefaultZero (8 for 4-bit, 128 for 8-bit)
//   then the unquantized GEMM: products of IO values accumulated in float.
// A K that is not a multiple of G has a shorter last group (exact). Only the low kBits bits of a
// zero point are read (a packed format carries no more).
//
// Two's-complement codes (`Arguments::signed_codes`, no zero points): a stored code c is the
// signed integer c - 2^b [c >= 2^(b-1)], w = IO(signed(c) * s_io). That is the offset code
// q = c XOR 2^(b-1) with the default zero point, so the arithmetic above is unchanged; it is the
// layout CUTLASS's mixed-input GEMM converts with bf16 scales in three instructions per two
// weights (the Hopper prefill path, moe/cuda/gemm/sm90_weight_only_gemm.h). The layer stores
// checkpoints without zero points so.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

#include "moe/quant/numeric.h"
#include "moe/quant/scheme.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::quant {

template <int Bits>
struct WeightOnlyInt {
  static_assert(Bits == 4 || Bits == 8, "moe::quant::WeightOnlyInt: 4- or 8-bit codes");
  using WeightElement = std::uint8_t;  // one byte: two 4-bit codes or one 8-bit code
  using DefaultIO = bfloat16;
  static constexpr int kBits = Bits;
  static constexpr Index kPack = 8 / Bits;  // codes per stored byte, along K
  static constexpr unsigned kCodeMask = (1u << Bits) - 1;
  static constexpr unsigned kDefaultZero = 1u << (Bits - 1);  // 8 or 128, as vLLM
  static constexpr bool kQuantized = false;  // activations are not quantized
  static constexpr bool kWeightOnly = true;
  static constexpr ScaleGranularity kWeightScale = ScaleGranularity::kGroup;
  static constexpr ScaleGranularity kActScale = ScaleGranularity::kNone;
  static constexpr std::string_view kName = Bits == 4 ? "w4a16" : "w8a16";

  // Code of K element k of a row of stored bytes.
  MOE_HOST_DEVICE static unsigned code(const std::uint8_t* row, Index k) {
    if constexpr (Bits == 4) return (row[k / 2] >> (4 * (k % 2))) & 0xFu;
    else return row[k];
  }
  // The offset code q of a stored code: two's-complement codes flip their top bit.
  MOE_HOST_DEVICE static unsigned offset_code(unsigned stored, bool signed_codes) {
    return signed_codes ? stored ^ kDefaultZero : stored;
  }
  // A whole packed byte (or word) between the two code layouts (the same flip both ways).
  static constexpr std::uint8_t kSignFlipByte = Bits == 4 ? 0x88 : 0x80;
  // Groups along a reduction of length k (group_size 0: one).
  static constexpr Index groups(Index k, Index group_size) {
    return group_size > 0 ? (k + group_size - 1) / group_size : (k > 0 ? 1 : 0);
  }
  // The dequantized weight, as a float holding an IO value.
  template <class IO>
  MOE_HOST_DEVICE static float dequantize(unsigned q, unsigned zero, float scale) {
    const float s = to_float(from_float<IO>(scale));
    return to_float(from_float<IO>(static_cast<float>(static_cast<int>(q) - static_cast<int>(zero & kCodeMask)) * s));
  }

  template <class Space>
  struct Arguments {
    TensorView<const float, 3, Space> w13_scale;  // [E, N1, groups(H)]
    TensorView<const float, 3, Space> w2_scale;   // [E, H, groups(I)]
    std::optional<TensorView<const std::uint8_t, 3, Space>> w13_zero, w2_zero;  // the scales' shapes
    // Act-order: a permutation of [0, H) per expert. Host tensors are checked to be one; the CUDA
    // backend reads 0 for an index outside [0, H) rather than outside the row.
    std::optional<TensorView<const std::int32_t, 2, Space>> w13_k_order;  // [E, H]
    Index group_size = 128;  // K elements per scale; 0: per channel (one group over K)
    bool signed_codes = false;  // two's-complement codes (see above); excludes zero points

    // The shapes against a forward's sizes; an error names the tensor, the expected and the
    // actual shape. (The packed weights' shapes are checked with the weights.)
    Status validate(Index E, Index N1, Index H, Index I) const {
      if (group_size < 0 || (group_size > 0 && group_size % 32 != 0)) {
        return invalid_argument("quant.group_size: expected 0 (per channel) or a positive multiple of 32, got ", group_size);
      }
      const std::array<Index, 3> s13{E, N1, groups(H, group_size)}, s2{E, H, groups(I, group_size)};
      MOE_RETURN_IF_ERROR(check_scheme_tensor("quant.w13_scale", w13_scale, s13));
      MOE_RETURN_IF_ERROR(check_scheme_tensor("quant.w2_scale", w2_scale, s2));
      if (w13_zero.has_value() != w2_zero.has_value()) {
        return invalid_argument(w13_zero ? "quant.w2_zero" : "quant.w13_zero",
                                ": zero points are given for both GEMMs or for neither");
      }
      if (w13_zero && signed_codes) {
        return invalid_argument("quant.w13_zero: two's-complement codes (quant.signed_codes) take no zero points");
      }
      if (w13_zero) {
        MOE_RETURN_IF_ERROR(check_scheme_tensor("quant.w13_zero", *w13_zero, s13));
        MOE_RETURN_IF_ERROR(check_scheme_tensor("quant.w2_zero", *w2_zero, s2));
      }
      if (w13_k_order) MOE_RETURN_IF_ERROR(check_k_order(*w13_k_order, E, H));
      return Status::ok();
    }

   private:
    static Status check_k_order(const TensorView<const std::int32_t, 2, Space>& v, Index E, Index H) {
      const std::array<Index, 2> expect{E, H};
      if (v.extents() != expect) {
        return invalid_argument("quant.w13_k_order: expected shape ", detail::format_shape(expect), ", got ",
                                detail::format_shape(v.extents()));
      }
      if (!v.is_contiguous()) return invalid_argument("quant.w13_k_order: expected a contiguous tensor");
      if constexpr (std::is_same_v<Space, HostSpace>) {
        std::vector<bool> seen(static_cast<std::size_t>(H));
        for (Index e = 0; e < E; ++e) {
          std::fill(seen.begin(), seen.end(), false);
          for (Index k = 0; k < H; ++k) {
            const std::int32_t c = v(e, k);
            if (c < 0 || c >= H || seen[static_cast<std::size_t>(c)]) {
              return invalid_argument("quant.w13_k_order: row ", e, " is not a permutation of [0, ", H, ") (", c,
                                      " at ", k, ")");
            }
            seen[static_cast<std::size_t>(c)] = true;
          }
        }
      }
      return Status::ok();
    }
  };
};

using W4A16 = WeightOnlyInt<4>;
using W8A16 = WeightOnlyInt<8>;

static_assert(QuantScheme<W4A16>);
static_assert(QuantScheme<W8A16>);

}  // namespace moe::quant
