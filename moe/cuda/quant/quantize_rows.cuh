// The activation quantizer of the W8A8 schemes on the GPU (moe/quant/w8a8.h spells out the
// arithmetic; the CPU stage's scaled_product is the reference): rows of the IO type become 8-bit
// codes and their scales, before GEMM1 (the gathered rows) and before GEMM2 (the activated
// intermediate). Codes are bit-identical to the CPU's: the same amax, the same scale
// (max(amax, 1e-10) / Q), the same IEEE division and rounding.
#pragma once

#include <cuda_runtime_api.h>

#include "moe/cuda/check.h"
#include "moe/cuda/launch.h"
#include "moe/quant/w8a8.h"
#include "moe/tensor.h"

namespace moe::cuda::quant_detail {

constexpr int kQuantizeThreads = 128;

// The largest of every thread's `v` (all threads of the block call it).
__device__ __forceinline__ float block_max(float v) {
  __shared__ float warp_max[kQuantizeThreads / 32];
  for (int d = 16; d > 0; d /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, d));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = v;
  __syncthreads();
  float m = warp_max[0];
#pragma unroll
  for (int w = 1; w < kQuantizeThreads / 32; ++w) m = fmaxf(m, warp_max[w]);
  __syncthreads();  // warp_max is reused by the next group
  return m;
}

// One block per entry of `row_list` (-1: skipped): codes[row, :] and, for dynamic schemes, the
// scale of each group g of the row at scales[g * scale_ld + row] (one group per row for per-token
// scales, Quant::kBlockK columns each for per-group ones). Static schemes use *static_scale.
template <class Quant, class In>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_rows_kernel(const In* x, Index k, const Index* row_list, typename Quant::WeightElement* codes,
                         float* scales, Index scale_ld, const float* static_scale) {
  using W = typename Quant::WeightElement;
  cuda::detail::grid_dependency_wait();
  cuda::detail::allow_dependents_launch();
  const Index row = row_list[blockIdx.x];
  if (row < 0) return;  // the whole block: no barrier is left waiting
  const In* src = x + row * k;
  W* dst = codes + row * k;
  const Index group = Quant::kActScale == quant::ScaleGranularity::kGroup ? Quant::kBlockK : k;
  Index g = 0;
  for (Index g0 = 0; g0 < k; g0 += group, ++g) {
    const Index g1 = g0 + group < k ? g0 + group : k;
    float s;
    if constexpr (Quant::kStaticActivations) {
      s = *static_scale;
    } else {
      float amax = 0.0f;
      for (Index i = g0 + threadIdx.x; i < g1; i += kQuantizeThreads) amax = fmaxf(amax, fabsf(to_float(src[i])));
      s = quant::dynamic_scale<W>(block_max(amax));
      if (threadIdx.x == 0) scales[g * scale_ld + row] = s;
    }
    for (Index i = g0 + threadIdx.x; i < g1; i += kQuantizeThreads) dst[i] = Quant::encode(to_float(src[i]), s);
  }
}

// Launches the quantizer over `num_rows` entries of row_list.
template <class Quant, class In>
Status quantize_rows(const In* x, Index k, const Index* row_list, Index num_rows, typename Quant::WeightElement* codes,
                     float* scales, Index scale_ld, const float* static_scale, bool programmatic, cudaStream_t stream) {
  if (num_rows == 0) return Status::ok();
  return cuda::detail::launch_kernel(&quantize_rows_kernel<Quant, In>, static_cast<unsigned>(num_rows), kQuantizeThreads,
                                     0, stream, programmatic, x, k, row_list, codes, scales, scale_ld, static_scale);
}

}  // namespace moe::cuda::quant_detail
