// select_experts on the GPU (moe/cuda/ops.cuh documents every op's contract).
#pragma once

#include "moe/cuda/ops/common.cuh"

namespace moe::cuda {
namespace ops_detail {

// ---- select_experts --------------------------------------------------------------------------

// Grid-stride over tokens; thread t owns scratch slot t (kScratchPerExpert*E floats, E ints).
template <class Routing>
__global__ void select_experts_kernel(const float* logits, Index ld_logits, Index num_tokens, int num_experts,
                                      int top_k, const float* correction_bias, typename Routing::Arguments args,
                                      float* scratch, std::int32_t* index_scratch, std::int32_t* ids, Index ld_ids,
                                      float* weights, Index ld_weights) {
  const Index t = global_thread();
  float* my_scratch = scratch + t * routing::kScratchPerExpert * num_experts;
  std::int32_t* my_index_scratch = index_scratch + t * num_experts;
  for (Index m = t; m < num_tokens; m += grid_threads()) {
    routing::TokenContext ctx{logits + m * ld_logits, num_experts,      top_k,          correction_bias,
                              my_scratch,             my_index_scratch, ids + m * ld_ids, weights + m * ld_weights};
    Routing::route_token(ctx, args);
  }
}

// Threads (hence scratch slots) of select_experts: all tokens up to a 64 MiB scratch budget,
// at least 1024 and at most 65536, a multiple of the block size.
constexpr int kRouteThreads = 128;
inline Index select_experts_threads(Index num_tokens, Index num_experts) {
  if (num_tokens <= 0 || num_experts <= 0) return 0;
  const Index per_token = (routing::kScratchPerExpert * 4 + 4) * num_experts;
  const Index cap = std::clamp<Index>((Index{64} << 20) / per_token, 1024, 65536);
  return round_up(std::min(num_tokens, cap), kRouteThreads);
}

}  // namespace ops_detail

// ---------------------------------------------------------------------------------------------
// select_experts: router logits [M, E] -> topk_ids [M, k], topk_weights [M, k], through the
// policy's route_token (the generic path: any policy whose route_token is __host__ __device__).
// Workspace: per-thread routing scratch (a grid-stride loop bounds it at ~64 MiB for large E).
// No data-dependent checks: every token gets k ids in [0, E) by the routing conventions.

inline std::size_t select_experts_workspace_bytes(Index num_tokens, Index num_experts) {
  const Index threads = ops_detail::select_experts_threads(num_tokens, num_experts);
  ops_detail::Carve c;
  c.take(ops_detail::count_of(threads * routing::kScratchPerExpert * num_experts) * sizeof(float));
  c.take(ops_detail::count_of(threads * num_experts) * sizeof(std::int32_t));
  return threads == 0 ? 0 : c.total();
}

template <class Routing>
Status select_experts(DeviceView<const float, 2> router_logits, int top_k, const typename Routing::Arguments& args,
                      OptDeviceView<const float, 1> correction_bias, DeviceView<std::int32_t, 2> topk_ids,
                      DeviceView<float, 2> topk_weights, std::span<std::byte> workspace, cudaStream_t stream = nullptr) {
  using namespace ops_detail;
  static_assert(Routing::kUsesLogits, "moe::cuda::select_experts: the routing policy must route from logits");
  MOE_RETURN_IF_ERROR(moe::detail::check_select_experts<Routing>(router_logits, top_k, args, correction_bias, topk_ids, topk_weights));
  const Index M = router_logits.extent(0), E = router_logits.extent(1);
  const std::size_t need = select_experts_workspace_bytes(M, E);
  MOE_RETURN_IF_ERROR(check_workspace(workspace, need, "select_experts_workspace_bytes"));
  if (M == 0) return Status::ok();

  const Index threads = select_experts_threads(M, E);
  Carve c;
  const std::size_t scratch_off = c.take(count_of(threads * routing::kScratchPerExpert * E) * sizeof(float));
  const std::size_t iscratch_off = c.take(count_of(threads * E) * sizeof(std::int32_t));
  std::byte* base = aligned_base(workspace.data());
  select_experts_kernel<Routing><<<static_cast<unsigned>(threads / kRouteThreads), kRouteThreads, 0, stream>>>(
      router_logits.data(), router_logits.stride(0), M, static_cast<int>(E), top_k,
      correction_bias ? correction_bias->data() : nullptr, args, at<float>(base, scratch_off),
      at<std::int32_t>(base, iscratch_off), topk_ids.data(), topk_ids.stride(0), topk_weights.data(),
      topk_weights.stride(0));
  MOE_CUDA_CHECK_LAUNCH();
  return Status::ok();
}

}  // namespace moe::cuda
