// The activation quantizer of the W8A8 schemes on the GPU (moe/quant/w8a8.h spells out the
// arithmetic; the CPU stage's scaled_product is the reference): rows of the IO type become 8-bit
// codes and their scales, before GEMM1 (the gathered rows) and before GEMM2 (the activated
// intermediate). Codes are bit-identical to the CPU's: the same amax, the same scale
// (max(amax, 1e-10) / Q), the same IEEE division and rounding.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>

#include "moe/cuda/check.h"
#include "moe/cuda/launch.h"
#include "moe/cuda/stages.cuh"
#include "moe/quant/w8a8.h"
#include "moe/tensor.h"

namespace moe::cuda::quant_detail {

// Stored rows of the IO type as a row source: row r's columns [c0, c0 + 8).
template <class In>
struct StoredRows {
  using Element = In;
  const In* x;
  Index ld;
  __device__ __forceinline__ cuda::detail::Vec8<In> load(Index row, Index c0) const {
    return *reinterpret_cast<const cuda::detail::Vec8<In>*>(x + row * ld + c0);
  }
};

// Which rows a launch quantizes: entry e reads source row `source(e)` (-1: skipped) and writes
// its codes and scales to rows destination(e, j), j < fanout() (-1: skipped).
// The listed rows themselves (the gathered rows, the intermediate): one entry per row_list entry.
struct ListedRows {
  const Index* row_list;
  __device__ __forceinline__ Index source(Index e) const { return row_list[e]; }
  __device__ __forceinline__ int fanout() const { return 1; }
  __device__ __forceinline__ Index destination(Index e, int) const { return row_list[e]; }
};
// Token rows to their slots' rows (the gather fused into the quantizer): one entry per token,
// whose codes go to the rows of its top_k slots (slot_row[m * top_k + j], -1 for a dropped slot).
// A token is quantized once however many experts it goes to.
struct TokenSlots {
  const Index* slot_row;
  int top_k;
  __device__ __forceinline__ Index source(Index e) const { return e; }
  __device__ __forceinline__ int fanout() const { return top_k; }
  __device__ __forceinline__ Index destination(Index e, int j) const { return slot_row[e * top_k + j]; }
};

// Where a row's group scales go: scales[g * group_stride + row * row_stride]. The swap mainloop
// reads them group-major (group_stride = rows, row_stride = 1), CUTLASS's blockwise FP8 GEMM
// row-major (group_stride = 1, row_stride = groups per row).
struct ScaleLayout {
  float* scales = nullptr;
  Index group_stride = 0, row_stride = 0;
};

// Codes of 8 values under scale s, as the bytes of one 8-byte store.
template <class Quant, class In>
__device__ __forceinline__ uint2 encode8(const cuda::detail::Vec8<In>& v, float s) {
  static_assert(sizeof(typename Quant::WeightElement) == 1);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  if constexpr (std::is_same_v<typename Quant::WeightElement, float8_e4m3>) {
    // cvt.rn.satfinite.e4m3x2.f32: two codes per instruction, rounded and saturated as
    // float8_e4m3::from_float's one-code form (moe/quant/numeric.h), first value in the low byte.
    unsigned pairs[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 x = make_float2(Quant::scaled(to_float(v.v[2 * j]), s), Quant::scaled(to_float(v.v[2 * j + 1]), s));
      pairs[j] = __nv_cvt_float2_to_fp8x2(x, __NV_SATFINITE, __NV_E4M3);
    }
    return make_uint2(pairs[0] | pairs[1] << 16, pairs[2] | pairs[3] << 16);
  }
#endif
  alignas(8) unsigned char bytes[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const typename Quant::WeightElement c = Quant::encode(to_float(v.v[j]), s);
    memcpy(&bytes[j], &c, 1);
  }
  return *reinterpret_cast<const uint2*>(bytes);
}

// One warp per entry of `rows` (RowMap: ListedRows or TokenSlots): codes[destination, :] of the
// `k` columns the source row gives and, for dynamic schemes, the scale of each group of the row at
// `out` (one group per row for per-token scales, Quant::kBlockK columns each for per-group ones). Static schemes use
// *static_scale. Lanes take 8 adjacent columns (16-byte loads), a warp pass 256 columns, and
// kUnroll passes (a chunk) are loaded before any is encoded (a row per block left the H200's DRAM
// at 1.6 TB/s: too few loads in flight). A 128-column group is 16 lanes, reduced by shuffles.
// Where scales are per group or static, each chunk of a row is its own warp's work (a few rows at
// decode still spread over many warps); a per-token scale needs the whole row in one warp. k is a
// multiple of 8; rows start 16-byte aligned.
// Few rows (decode) take one pass per warp instead: a lone warp's dependent instructions, not
// memory, bound those launches (ncu, qwen3 M = 1: 7-10 µs per quantizer with 1024-column warps).
constexpr int kQuantizeWarps = 8;
constexpr int kQuantizeUnroll = 4;
constexpr Index kQuantizePass = 8 * 32;  // columns per warp pass

// Passes loaded at once by the kernel: kQuantizeUnroll, but 2 over activated rows, whose every
// load is two (gate and up) and whose activation holds more registers (at 4 the kernel took 75
// registers, 3 blocks per SM, and was issue-bound at 2.1 TB/s). A chunk of 4 passes is then two
// rounds.
template <class Source>
struct QuantizeLoadPasses {
  static constexpr int value = kQuantizeUnroll;
};
template <class T, class Expr, class Activation, int kLayoutMode>
struct QuantizeLoadPasses<cuda::detail::ActivatedRows<T, Expr, Activation, kLayoutMode>> {
  static constexpr int value = 2;
};

template <class Quant>
constexpr bool quantize_whole_rows() {
  return Quant::kActScale == quant::ScaleGranularity::kPerToken;
}
// Columns per warp: whole rows, one pass while the launch has fewer warps than the GPU holds at
// once (about 132 SMs x 64), else kQuantizeUnroll passes.
inline Index quantize_chunk_columns(bool whole_rows, Index entries, Index k) {
  if (whole_rows) return k;
  const Index passes = (k + kQuantizePass - 1) / kQuantizePass;
  return entries * passes < 132 * 64 ? kQuantizePass : kQuantizeUnroll * kQuantizePass;
}
template <class Quant, class Source, class RowMap>
__global__ void __launch_bounds__(32 * kQuantizeWarps)
    quantize_rows_kernel(Source src, RowMap rows, Index k, Index num_entries, Index chunk,
                         typename Quant::WeightElement* codes, ScaleLayout out, const float* static_scale) {
  using W = typename Quant::WeightElement;
  using In = typename Source::Element;
  using Vec = cuda::detail::Vec8<In>;
  constexpr int kUnroll = QuantizeLoadPasses<Source>::value;
  constexpr Index kPass = kQuantizePass;
  const Index chunks = (k + chunk - 1) / chunk;  // per row
  constexpr bool kGroups = Quant::kActScale == quant::ScaleGranularity::kGroup;
  cuda::detail::grid_dependency_wait();
  cuda::detail::allow_dependents_launch();
  const int lane = static_cast<int>(threadIdx.x % 32);
  const Index warp = static_cast<Index>(blockIdx.x) * kQuantizeWarps + threadIdx.x / 32;
  const Index warps = static_cast<Index>(gridDim.x) * kQuantizeWarps;
  for (Index item = warp; item < num_entries * chunks; item += warps) {
    const Index entry = item / chunks;
    const Index first = (item % chunks) * chunk;    // this warp's columns:
    const Index last = std::min(k, first + chunk);  // [first, last)
    const Index row = rows.source(entry);
    if (row < 0) continue;  // the whole warp
    const int fanout = rows.fanout();
    // The codes of columns [c, c + 8) and, from one lane per group, the group's scale.
    const auto store = [&](uint2 bits, Index c, Index group, float s, bool scale_lane) {
      for (int j = 0; j < fanout; ++j) {
        const Index d = rows.destination(entry, j);
        if (d < 0) continue;
        *reinterpret_cast<uint2*>(codes + d * k + c) = bits;
        if (scale_lane) out.scales[group * out.group_stride + d * out.row_stride] = s;
      }
    };
    // Passes over the row, kUnroll at a time; `use` sees each loaded vector in column order.
    const auto for_each_vector = [&](auto&& use) {
      for (Index base = first; base < last; base += kUnroll * kPass) {
        Vec v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const Index c = base + u * kPass + 8 * lane;
          if (c < last) v[u] = src.load(row, c);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) use(v[u], base + u * kPass + 8 * lane);
      }
    };
    const auto amax8 = [](const Vec& v) {
      float m = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(to_float(v.v[j])));
      return m;
    };
    if constexpr (kGroups) {
      constexpr int kLanes = Quant::kBlockK / 8;  // lanes per group; passes start on a group boundary
      static_assert(Quant::kBlockK % 8 == 0 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0 && kPass % Quant::kBlockK == 0,
                    "quantize_rows: a group is a power-of-two run of lanes within one warp pass");
      for_each_vector([&](const Vec& v, Index c) {  // every lane takes part (shuffles)
        float amax = c < last ? amax8(v) : 0.0f;
#pragma unroll
        for (int d = kLanes / 2; d > 0; d /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
        const float s = quant::dynamic_scale<W>(amax);
        if (c < last) store(encode8<Quant, In>(v, s), c, c / Quant::kBlockK, s, lane % kLanes == 0);
      });
    } else {
      float s;
      if constexpr (Quant::kStaticActivations) {
        s = *static_scale;
      } else {  // per token: the row's amax first (the second pass reads the row from cache)
        float amax = 0.0f;
        for_each_vector([&](const Vec& v, Index c) { amax = c < last ? fmaxf(amax, amax8(v)) : amax; });
#pragma unroll
        for (int d = 16; d > 0; d /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
        s = quant::dynamic_scale<W>(amax);
      }
      for_each_vector([&](const Vec& v, Index c) {
        if (c < last) store(encode8<Quant, In>(v, s), c, 0, s, !Quant::kStaticActivations && c == 0);
      });
    }
  }
}

// Launches the quantizer over `num_entries` entries of `rows`.
template <class Quant, class Source, class RowMap>
Status quantize_rows(const Source& src, const RowMap& rows, Index k, Index num_entries,
                     typename Quant::WeightElement* codes, ScaleLayout scales, const float* static_scale,
                     bool programmatic, cudaStream_t stream) {
  if (num_entries == 0) return Status::ok();
  const Index chunk = quantize_chunk_columns(quantize_whole_rows<Quant>(), num_entries, k);
  const Index items = num_entries * ((k + chunk - 1) / chunk);
  const auto blocks = static_cast<unsigned>(std::min<Index>((items + kQuantizeWarps - 1) / kQuantizeWarps, 1 << 20));
  return cuda::detail::launch_kernel(&quantize_rows_kernel<Quant, Source, RowMap>, blocks, 32 * kQuantizeWarps, 0,
                                     stream, programmatic, src, rows, k, num_entries, chunk, codes, scales, static_scale);
}

}  // namespace moe::cuda::quant_detail
