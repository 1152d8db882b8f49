// The mixed-input grouped GEMM on offset codes (zero points): 256 weight rows x 128 tokens (sm90_weight_only_gemm_impl.cuh).
#include "moe/cuda/gemm/sm90_weight_only_gemm_impl.cuh"

namespace moe::cuda::gemm::sm90_detail {
MOE_SM90_WEIGHT_ONLY_TILE(256, 128, 1, kOffset)
}  // namespace moe::cuda::gemm::sm90_detail
