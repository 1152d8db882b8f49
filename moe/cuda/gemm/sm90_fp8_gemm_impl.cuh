// What the two FP8 grouped GEMMs behind moe/cuda/gemm/sm90_fp8_gemm.h share: operand types, the
// bf16 epilogue, and the per-group operands written from Sm90Fp8GemmArgs. Included by
// sm90_fp8_gemm_block.cu and sm90_fp8_gemm_tensor.cu only.
#pragma once

#include "moe/cuda/gemm/sm90_fp8_gemm.h"
#include "moe/cuda/gemm/sm90_grouped_gemm_impl.cuh"

namespace moe::cuda::gemm::sm90_detail {

using Fp8Code = cutlass::float_e4m3_t;
using Fp8Out = cutlass::bfloat16_t;
inline constexpr int kFp8AlignCodes = 16;  // 16 bytes of 8-bit codes
inline constexpr int kFp8AlignOut = 8;     // 16 bytes of bf16

// D = alpha * accumulators, rounded to bf16 once, stored row-major by TMA.
template <class TileShape, class ClusterShape, class EpilogueSchedule>
using Fp8Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, RowMajor*, kFp8AlignOut, Fp8Out, RowMajor*,
    kFp8AlignOut, EpilogueSchedule, cutlass::epilogue::fusion::LinearCombination<Fp8Out, float, void>>::CollectiveOp;

template <class G>
using Fp8Operands = GroupOperands<G, Fp8Code, Fp8Code, Fp8Out>;

// Group g = e * halves + h: expert e's rows times its weight half h. Writes the group's operands
// and returns where it sits.
struct Fp8Group {
  int expert, half, rows;
  Index begin;  // the expert's first row
};
template <class G>
__device__ Fp8Group set_fp8_group(const Sm90Fp8GemmArgs& a, int g, const Fp8Operands<G>& ops) {
  const int e = g / a.halves, h = g % a.halves;
  const Index begin = a.seg_begin[e];
  const int rows = static_cast<int>(a.seg_count[e]);
  ops.set(g, rows, static_cast<int>(a.n), static_cast<int>(a.k), static_cast<const Fp8Code*>(a.a) + begin * a.lda,
          a.lda, static_cast<const Fp8Code*>(a.w) + e * a.w_expert_stride + h * a.n * a.ldw, a.ldw,
          static_cast<Fp8Out*>(a.d) + begin * a.ldd + h * a.n, a.ldd);
  return {e, h, rows, begin};
}

}  // namespace moe::cuda::gemm::sm90_detail
