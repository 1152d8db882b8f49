// Hopper grouped expert GEMMs on FP8 E4M3 codes: the prefill GEMMs of the FP8 W8A8 schemes.
//
// Block-scaled (kBlock128: DeepSeek-V3's 128x128 weight blocks, 1x128 activation groups):
//   d[seg_begin[e] + r, h * n + c] = sum over K blocks b of
//       s_a[seg_begin[e] + r, b] * s_w[e, h * ceil(n/128) + c / 128, b] *
//       sum_{k in b} a[seg_begin[e] + r, k] * w[e, h * n + c, k]          r < seg_count[e], c < n
//   Each K block's partial sums are promoted into fp32 with their two scales, as the CPU
//   reference (moe/quant/w8a8.h) does.
// Per-tensor (kPerTensor: one static activation scale, one weight scale per expert):
//   d[seg_begin[e] + r, h * n + c] = s_a * s_w[e] * sum_k a[seg_begin[e] + r, k] * w[e, h * n + c, k]
//   with the scales applied once, in the epilogue, and the sum kept in the tensor cores' FP8
//   accumulator across K (CUTLASS's "fast accumulation", what vLLM's grouped FP8 GEMM runs on
//   Hopper): see benchmarks/NOTES.md, "FP8 per-tensor prefill".
//
// for every local expert e and weight half h at once (`halves` = 2 for a gated w13 whose gate and
// up halves are blocked separately, so each half is its own group). Output bf16, rounded once.
// Row counts stay on the device: no host sync, graph-capturable. The mainloops are CUTLASS 3's
// sm90 ptr-array FP8 collectives (see README: why CUTLASS); this header includes none of it, and
// each scaling's one instantiation lives in its own translation unit (sm90_fp8_gemm_block.cu,
// sm90_fp8_gemm_tensor.cu), so the two compile in parallel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <span>

#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::cuda::gemm {

// The scale block of both operands along K and of the weights along N (kBlock128).
inline constexpr int kFp8ScaleBlock = 128;

enum class Fp8GemmScales { kBlock128, kPerTensor };

// Tiles of the per-tensor GEMM (the block-scaled GEMM has one: 128x128 in clusters of two).
enum class Fp8Tile : int {
  kCooperative128x256,  // both consumer warpgroups on one 128-row x 256-column tile
  kPingpong64x256,      // each consumer warpgroup its own 64 x 256 tile: one's epilogue under the other's mainloop
};

// The per-tensor GEMM's tile for experts averaging `rows_per_group` rows (a host-side estimate:
// slots / local experts) of a layer with these hidden and intermediate sizes. From the H200 runs of
// 2026-12-04 (benchmarks/NOTES.md, "FP8 per-tensor prefill tiles"; five tiles, one process each,
// two calls): ping-pong 64x256 wins from 128 to 1024 rows per expert where the hidden size is 4096
// or more (against the cooperative tile: mixtral M = 1024 -4..-14%, M = 4096 -6%, deepseek
// M = 4096 -2..-6%), as in the bf16 table, and from 64 to 256 rows where the intermediate size is
// at most 1024 (qwen3 M = 1024 / 4096 -2..-4%: GEMM2's K = 768 makes its epilogue a large share).
// It loses 3-4% on gpt-oss (hidden and intermediate 2880), 3% on mixtral's 64 rows, 3% on qwen3's
// 1024 rows, and 2% on deepseek's 512 rows, which this rule gives it (rows per expert alone cannot
// separate them from mixtral's 1024). Regenerate: `cuda_fused_moe_benchmark --quantized
// --ab_prefill_tiles` on the GPU machine.
inline Fp8Tile fp8_tensor_tile_for(double rows_per_group, Index hidden, Index intermediate) {
  const bool wide_hidden = hidden >= 4096 && rows_per_group >= 96.0 && rows_per_group < 2048.0;
  const bool short_gemm2 = intermediate <= 1024 && rows_per_group >= 48.0 && rows_per_group < 768.0;
  return wide_hidden || short_gemm2 ? Fp8Tile::kPingpong64x256 : Fp8Tile::kCooperative128x256;
}

struct Sm90Fp8GemmArgs {
  Fp8GemmScales scales = Fp8GemmScales::kBlock128;
  int num_experts = 0;
  int halves = 1;                      // weight row halves per expert, each its own group
  Index n = 0, k = 0;                  // output columns per half, reduction length
  const void* a = nullptr;             // float8_e4m3 codes [rows, k], row stride lda
  Index lda = 0;
  // kBlock128: [rows, ceil(k / 128)] (row-major, exactly that stride); kPerTensor: [1], the
  // static activation scale.
  const float* a_scales = nullptr;
  const Index* seg_begin = nullptr;    // device [num_experts]
  const Index* seg_count = nullptr;    // device [num_experts]
  const void* w = nullptr;             // float8_e4m3 codes [E, halves * n, k]: expert stride, row stride ldw
  Index w_expert_stride = 0, ldw = 0;
  // kBlock128: [E, halves * ceil(n / 128), ceil(k / 128)]; kPerTensor: one per expert (both
  // halves), at w_scales[e * w_scales_expert_stride].
  const float* w_scales = nullptr;
  Index w_scales_expert_stride = 0;
  void* d = nullptr;                   // bf16 [rows, ldd]; half h writes columns [h * n, h * n + n)
  Index ldd = 0;
  Fp8Tile tile = Fp8Tile::kCooperative128x256;  // kPerTensor only
};

// Why the kernels cannot run these operands (TMA needs 16-byte aligned bases and rows), or nullptr.
const char* sm90_fp8_gemm_refusal(const Sm90Fp8GemmArgs& args);

// Device workspace of one launch over `num_experts * halves` groups, whichever tile it runs.
std::size_t sm90_fp8_gemm_workspace_bytes(Fp8GemmScales scales, int num_groups);

// Enqueues the grouped GEMM on `stream`. No allocation, no synchronization.
Status sm90_fp8_gemm(const Sm90Fp8GemmArgs& args, std::span<std::byte> workspace, cudaStream_t stream);

namespace sm90_detail {
// One scaling's kernel, in its own translation unit; the arguments are checked by the caller.
std::size_t fp8_block_gemm_workspace_bytes(int num_groups, int sm_count);
Status fp8_block_gemm(const Sm90Fp8GemmArgs& args, std::span<std::byte> workspace, int sm_count, cudaStream_t stream);
std::size_t fp8_tensor_gemm_workspace_bytes(int num_groups, int sm_count);
Status fp8_tensor_gemm(const Sm90Fp8GemmArgs& args, std::span<std::byte> workspace, int sm_count, cudaStream_t stream);
}  // namespace sm90_detail

}  // namespace moe::cuda::gemm
