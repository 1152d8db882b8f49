// Hopper grouped expert GEMM on FP8 E4M3 codes with block scales: the prefill GEMMs of the
// block-scaled FP8 schemes (DeepSeek-V3's 128x128 weight blocks, 1x128 activation groups).
//
//   d[seg_begin[e] + r, h * n + c] = sum over K blocks b of
//       s_a[seg_begin[e] + r, b] * s_w[e, h * ceil(n/128) + c / 128, b] *
//       sum_{k in b} a[seg_begin[e] + r, k] * w[e, h * n + c, k]          r < seg_count[e], c < n
//
// for every local expert e and weight half h at once (`halves` = 2 for a gated w13 whose gate and
// up halves are blocked separately, so each half is its own group). Each K block's partial sums
// are promoted into fp32 with their two scales, as the CPU reference (moe/quant/w8a8.h) does.
// Output bf16, rounded once. Row counts stay on the device: no host sync, graph-capturable.
// The mainloop is CUTLASS 3's sm90 ptr-array blockwise-scaled FP8 collective (see README: why
// CUTLASS); this header includes none of it, and its one instantiation lives in the .cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <span>

#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::cuda::gemm {

// The scale block of both operands along K and of the weights along N.
inline constexpr int kFp8ScaleBlock = 128;

struct Sm90Fp8BlockGemmArgs {
  int num_experts = 0;
  int halves = 1;                      // weight row halves per expert, each blocked separately
  Index n = 0, k = 0;                  // output columns per half, reduction length
  const void* a = nullptr;             // float8_e4m3 codes [rows, k], row stride lda
  Index lda = 0;
  const float* a_scales = nullptr;     // [rows, ceil(k / 128)] (row-major, exactly that stride)
  const Index* seg_begin = nullptr;    // device [num_experts]
  const Index* seg_count = nullptr;    // device [num_experts]
  const void* w = nullptr;             // float8_e4m3 codes [E, halves * n, k]: expert stride, row stride ldw
  Index w_expert_stride = 0, ldw = 0;
  const float* w_scales = nullptr;     // [E, halves * ceil(n / 128), ceil(k / 128)]
  Index w_scales_expert_stride = 0;
  void* d = nullptr;                   // bf16 [rows, ldd]; half h writes columns [h * n, h * n + n)
  Index ldd = 0;
};

// Why the kernel cannot run these operands (TMA needs 16-byte aligned bases and rows), or nullptr.
const char* sm90_fp8_block_gemm_refusal(const Sm90Fp8BlockGemmArgs& args);

// Device workspace of one launch over `num_experts * halves` groups.
std::size_t sm90_fp8_block_gemm_workspace_bytes(int num_groups);

// Enqueues the grouped GEMM on `stream`. No allocation, no synchronization.
Status sm90_fp8_block_gemm(const Sm90Fp8BlockGemmArgs& args, std::span<std::byte> workspace, cudaStream_t stream);

}  // namespace moe::cuda::gemm
