// Hopper grouped expert GEMM on packed 4-bit weights (W4A16), the prefill GEMMs of the weight-only
// schemes (moe/quant/weight_only.h):
//
//   d[seg_begin[e] + r, c] = IO(sum_k a[seg_begin[e] + r, k] * wq(e, c, k) + bias[e, c])   r < seg_count[e]
//   wq(e, c, k) = IO(float(q - z) * float(IO(scale[e, c, k / G])))               q = code, z = zero
//
// for every local expert e at once, fp32 accumulation, output rounded once (the bias, where given,
// added to the fp32 sums first, as the reference's epilogues). The dequantized weight is
// bit-identical to the CPU reference's: the codes become floats, the scale is rounded to IO first,
// and q * s - z * s is exact in fp32 before the one rounding to IO.
//
// Why a second weight-only GEMM: our register GEMM (weight_only_gemm.cuh) streams the codes for
// decode but re-reads and re-dequantizes every weight tile per 16 tokens, so prefill ran at a
// fraction of bf16's speed. This one is CUTLASS 3's sm90 ptr-array mixed-input collective
// (TMA loads of the codes, dequantized once per token tile in registers, wgmma with the
// weights as the register operand), persistent over (expert, tile) pairs whose row counts stay on
// the device. The collective takes scales and zero points [groups, n] with n contiguous; a small
// kernel writes them per launch into the workspace from the scheme's [E, n, groups] scales.
//
// Two conversions, one instantiation set each:
//  - offset codes (zero points or the default): fp32 scales s and zeros z' = -z * s, so that
//    q * s + z' is the exact product above in fp32 before the one rounding (4-6 instructions per
//    weight);
//  - two's-complement codes (`signed_codes`, moe/quant/weight_only.h; no zero points): the codes
//    become bf16 exactly and one bf16 multiply by the bf16 scale rounds once (about 2 per weight).
// Both run the same tiles: 128 weight rows x 32 tokens for short segments, 256 x 128, and 128 x 256
// in clusters of two for long ones (the tile per problem: sm90_weight_only_gemm.cu).
// MXFP4 does not run here: the collective takes one scale per row and 64-wide K tile (its
// smallest), and E8M0 scales cover 32.
//
// This header includes none of CUTLASS; the instantiation lives in the .cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <span>

#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::cuda::gemm {

// How the 4-bit codes become values (one instantiation set each).
enum class Sm90WeightOnlyCodes {
  kOffset,          // unsigned codes minus zero points (given, or the default)
  kTwosComplement,  // signed codes, no zero points
};

struct Sm90WeightOnlyGemmArgs {
  int num_experts = 0;
  Index n = 0, k = 0;                    // weight rows (output columns), reduction length
  const void* a = nullptr;               // bf16 [rows, k], row stride lda (elements)
  Index lda = 0;
  const Index* seg_begin = nullptr;      // device [num_experts]
  const Index* seg_count = nullptr;      // device [num_experts]
  const std::uint8_t* w = nullptr;       // 4-bit codes [E, n, k / 2] bytes, the low nibble the even k
  Index w_expert_stride = 0, ldw = 0;    // bytes
  const float* scale = nullptr;          // [E, n, groups] contiguous
  const std::uint8_t* zero = nullptr;    // [E, n, groups] contiguous, or null: default_zero
  unsigned default_zero = 8;
  bool signed_codes = false;             // two's-complement codes (moe/quant/weight_only.h): w = IO(c * IO(scale))
  Index group_size = 0;                  // K per scale group; 0: one group over K
  const void* bias = nullptr;            // bf16 [E, n] contiguous or null: added to the sums before the rounding
  void* d = nullptr;                     // bf16 [rows, ldd]
  Index ldd = 0;
  Index rows_per_expert = 0;             // a host-side estimate of the average rows (picks the token tile)

  Sm90WeightOnlyCodes codes() const {
    return signed_codes ? Sm90WeightOnlyCodes::kTwosComplement : Sm90WeightOnlyCodes::kOffset;
  }
};

// Why the kernel cannot run these operands, or nullptr: TMA's 16-byte aligned bases and rows, a
// group size that is a multiple of the 64-wide K tile (or one group over K), int32 extents.
const char* sm90_weight_only_gemm_refusal(const Sm90WeightOnlyGemmArgs& args);

// Device workspace of one launch: descriptors, CUTLASS's tensor maps, the transposed scales and
// zero points (2 * E * n * groups floats; bf16 scales alone for two's-complement codes).
// `rows_per_expert` and `codes` as in the arguments.
std::size_t sm90_weight_only_gemm_workspace_bytes(int num_experts, Index n, Index k, Index group_size,
                                                  Index rows_per_expert, Sm90WeightOnlyCodes codes);

// Enqueues the grouped GEMM on `stream`. No allocation, no synchronization.
Status sm90_weight_only_gemm(const Sm90WeightOnlyGemmArgs& args, std::span<std::byte> workspace, cudaStream_t stream);

}  // namespace moe::cuda::gemm
