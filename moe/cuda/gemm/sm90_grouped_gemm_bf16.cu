// bf16 instantiations of the Hopper grouped GEMM (see sm90_grouped_gemm_impl.cuh).
#include "moe/cuda/gemm/sm90_grouped_gemm_impl.cuh"

namespace moe::cuda::gemm::sm90_detail {
Status dispatch_bf16(const Sm90GroupedGemmArgs& a, Sm90Tile tile, std::span<std::byte> ws, cudaStream_t s) {
  return Tiles<cutlass::bfloat16_t>::dispatch(a, tile, ws, s);
}
std::size_t workspace_bf16(int groups, int sm_count) { return Tiles<cutlass::bfloat16_t>::workspace(groups, sm_count); }
}  // namespace moe::cuda::gemm::sm90_detail
