// Standalone MoE ops on the GPU: the CUDA counterparts of moe/cpu/ops.h (the spec), with the
// same semantics, the same outputs (bit for bit: index outputs exactly, and the float outputs of
// moe_permute, moe_unpermute and moe_fused_mul_sum bitwise; select_experts' weights differ from
// the CPU's only by the device expf) and the same validation messages. Include only from .cu
// files (CUB is included here and nowhere in the host-compilable headers).
//
// Every op
//   * validates shapes and scalar arguments on the host exactly as the CPU op does (same
//     moe::detail::expect_shape calls, same order, same messages) before it enqueues anything, so
//     a rejected call leaves every output untouched;
//   * takes its scratch from a caller-provided `workspace` where it needs any (size from the
//     matching *_workspace_bytes function; any alignment: the op aligns inside), and returns
//     kWorkspaceTooSmall when it is smaller;
//   * is stream-ordered on `stream`, with no host synchronization and no allocation (it can be
//     captured in a CUDA graph), unless `checked` is true;
//   * never forms an address from an expert id outside [0, E), or from one that maps to -1.
//
// Data-dependent validation. The CPU ops also check the *contents* of some device-resident
// inputs (expert_map entries, inv_permuted_idx rows, the last expert_first_token_offset, EPLB
// replica counts and physical ids). That needs the data on the host, i.e. a synchronization, so
// here it is opt-in: with `checked = true` the op copies those inputs to the host on `stream`,
// synchronizes it, and runs the CPU's checks (same messages, same order relative to the shape
// checks) before writing anything. With `checked = false` (the default) such inputs are not
// reported; the kernels stay memory-safe and their behaviour on them is documented per op.
//
// One header per op under moe/cuda/ops/; this one includes them all.
#pragma once

#include "moe/cuda/ops/align_block_size.cuh"
#include "moe/cuda/ops/eplb.cuh"
#include "moe/cuda/ops/fused_mul_sum.cuh"
#include "moe/cuda/ops/permute.cuh"
#include "moe/cuda/ops/select_experts.cuh"
