// Hopper grouped expert GEMM (wgmma + TMA, warp-specialized, persistent): the plain entry point.
//
//   d[seg_begin[g] + r, n] = sum_k a[seg_begin[g] + r, k] * w[g, n, k]    r < seg_count[g]
//
// for every group (local expert) g at once, with the per-group row counts read on the device, so
// nothing is synchronized with the host and the launch captures into a CUDA graph. Operands and
// output are 16-bit (bf16 or f16), fp32 accumulation, output rounded once. The mainloop and the
// persistent tile scheduler come from CUTLASS 3's sm90 ptr-array collectives (see README: why
// CUTLASS); this header includes none of CUTLASS, so policy code that includes moe/cuda/kernel.cuh
// compiles fast, and the heavy instantiations live in two translation units (bf16, f16).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <span>

#include "moe/cuda/gemm/schedule.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::cuda::gemm {

enum class Element16 { kBF16, kF16 };

struct Sm90GroupedGemmArgs {
  Element16 element = Element16::kBF16;
  int num_groups = 0;
  Index n = 0, k = 0;                 // output columns (weight rows), reduction length
  const void* a = nullptr;            // [rows, k], row stride lda (elements)
  Index lda = 0;
  const Index* seg_begin = nullptr;   // device [num_groups]: first row of each group
  const Index* seg_count = nullptr;   // device [num_groups]: rows of each group
  const void* w = nullptr;            // [num_groups, n, k]: group stride, row stride ldw
  Index w_group_stride = 0, ldw = 0;
  void* d = nullptr;                  // [rows, n], row stride ldd
  Index ldd = 0;
};

// Whether the Hopper mainloop can run these operands: 16-byte aligned bases and rows (TMA).
bool sm90_grouped_gemm_applies(const Sm90GroupedGemmArgs& args);

// Device workspace of one launch with `num_groups` groups (problem descriptors and CUTLASS's
// per-SM tensor maps), the same for every tile configuration.
std::size_t sm90_grouped_gemm_workspace_bytes(int num_groups);

// Enqueues the grouped GEMM on `stream`. No allocation, no synchronization.
Status sm90_grouped_gemm(const Sm90GroupedGemmArgs& args, Sm90Tile tile, std::span<std::byte> workspace,
                         cudaStream_t stream);

}  // namespace moe::cuda::gemm
