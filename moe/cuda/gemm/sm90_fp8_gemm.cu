// Host entry of the Hopper FP8 grouped GEMMs: checks, then the scaling's instantiation.
#include "moe/cuda/gemm/sm90_fp8_gemm.h"

#include <algorithm>
#include <cstdint>

namespace moe::cuda::gemm {
namespace sm90_detail {
int current_sm_count();  // sm90_grouped_gemm.cu
}  // namespace sm90_detail

const char* sm90_fp8_gemm_refusal(const Sm90Fp8GemmArgs& a) {
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  if (a.scales != Fp8GemmScales::kBlock128 && a.scales != Fp8GemmScales::kPerTensor) return "unknown scaling";
  if (a.tile != Fp8Tile::kCooperative128x256 && a.tile != Fp8Tile::kPingpong64x256) return "unknown tile";
  if (a.halves != 1 && a.halves != 2) return "halves must be 1 or 2";
  if (a.num_experts <= 0 || a.num_experts > (1 << 20)) return "the expert count must be in [1, 2^20]";
  if (a.n <= 0 || a.k <= 0 || a.n > INT32_MAX / 2 || a.k > INT32_MAX) return "n and k must be positive int32 extents";
  if (!a.a || !a.w || !a.d || !a.a_scales || !a.w_scales || !a.seg_begin || !a.seg_count) return "a null operand";
  if (!aligned(a.a) || !aligned(a.w) || !aligned(a.d)) return "codes and output need 16-byte aligned bases (TMA)";
  if (a.k % 16 != 0 || a.lda % 16 != 0 || a.ldw % 16 != 0 || a.w_expert_stride % 16 != 0) {
    return "k and the code strides must be multiples of 16 (16-byte rows of FP8 codes)";
  }
  if (a.n % 8 != 0 || a.ldd % 8 != 0) return "n and ldd must be multiples of 8 (16-byte rows of bf16)";
  return nullptr;
}

std::size_t sm90_fp8_gemm_workspace_bytes(Fp8GemmScales scales, int num_groups) {
  const int sms = std::max(1, sm90_detail::current_sm_count());
  return scales == Fp8GemmScales::kPerTensor ? sm90_detail::fp8_tensor_gemm_workspace_bytes(num_groups, sms)
                                             : sm90_detail::fp8_block_gemm_workspace_bytes(num_groups, sms);
}

Status sm90_fp8_gemm(const Sm90Fp8GemmArgs& a, std::span<std::byte> workspace, cudaStream_t stream) {
  if (const char* why = sm90_fp8_gemm_refusal(a)) return invalid_argument("sm90_fp8_gemm: ", why);
  const int sm_count = sm90_detail::current_sm_count();
  if (sm_count <= 0) return make_status(StatusCode::kCudaError, "sm90_fp8_gemm: no device multiprocessor count");
  return a.scales == Fp8GemmScales::kPerTensor ? sm90_detail::fp8_tensor_gemm(a, workspace, sm_count, stream)
                                               : sm90_detail::fp8_block_gemm(a, workspace, sm_count, stream);
}

}  // namespace moe::cuda::gemm
