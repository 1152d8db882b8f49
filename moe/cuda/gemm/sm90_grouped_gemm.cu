// Host entry of the Hopper grouped GEMM: checks, then the element type's instantiations.
#include "moe/cuda/gemm/sm90_grouped_gemm.h"

#include <algorithm>
#include <cstdint>

namespace moe::cuda::gemm {
namespace sm90_detail {
Status dispatch_bf16(const Sm90GroupedGemmArgs&, Sm90Tile, std::span<std::byte>, cudaStream_t);
Status dispatch_f16(const Sm90GroupedGemmArgs&, Sm90Tile, std::span<std::byte>, cudaStream_t);
std::size_t workspace_bf16(int groups, int sm_count);
std::size_t workspace_f16(int groups, int sm_count);

int current_sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  return sms;
}
}  // namespace sm90_detail

bool sm90_grouped_gemm_applies(const Sm90GroupedGemmArgs& a) {
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  const auto mult8 = [](Index v) { return v % 8 == 0; };
  return a.num_groups > 0 && a.n > 0 && a.k > 0 && a.n <= INT32_MAX && a.k <= INT32_MAX && aligned(a.a) &&
         aligned(a.w) && aligned(a.d) && mult8(a.lda) && mult8(a.ldw) && mult8(a.ldd) && mult8(a.w_group_stride) &&
         mult8(a.n) && mult8(a.k);
}

std::size_t sm90_grouped_gemm_workspace_bytes(int num_groups) {
  const int sms = std::max(1, sm90_detail::current_sm_count());
  return std::max(sm90_detail::workspace_bf16(num_groups, sms), sm90_detail::workspace_f16(num_groups, sms));
}

Status sm90_grouped_gemm(const Sm90GroupedGemmArgs& a, Sm90Tile tile, std::span<std::byte> workspace,
                         cudaStream_t stream) {
  if (!sm90_grouped_gemm_applies(a)) {
    return invalid_argument("sm90_grouped_gemm: operands must be 16-byte aligned with n, k and strides multiples of 8");
  }
  if (a.num_groups == 0) return Status::ok();
  return a.element == Element16::kBF16 ? sm90_detail::dispatch_bf16(a, tile, workspace, stream)
                                       : sm90_detail::dispatch_f16(a, tile, workspace, stream);
}

}  // namespace moe::cuda::gemm
