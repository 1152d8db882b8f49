// The mixed-input grouped GEMM on two's-complement codes: 128 weight rows x 256 tokens, clusters of
// two along the weight rows (sm90_weight_only_gemm_impl.cuh).
#include "moe/cuda/gemm/sm90_weight_only_gemm_impl.cuh"

namespace moe::cuda::gemm::sm90_detail {
MOE_SM90_WEIGHT_ONLY_TILE(128, 256, 2, kTwosComplement)
}  // namespace moe::cuda::gemm::sm90_detail
