// The mixed-input grouped GEMM on offset codes (zero points): 128 weight rows x 256 tokens, clusters
// of two along the weight rows (sm90_weight_only_gemm_impl.cuh).
#include "moe/cuda/gemm/sm90_weight_only_gemm_impl.cuh"

namespace moe::cuda::gemm::sm90_detail {
MOE_SM90_WEIGHT_ONLY_TILE(128, 256, 2, kOffset)
}  // namespace moe::cuda::gemm::sm90_detail
