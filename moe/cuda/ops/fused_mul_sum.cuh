// moe_fused_mul_sum on the GPU (moe/cuda/ops.cuh documents every op's contract).
#pragma once

#include "moe/cuda/ops/common.cuh"

namespace moe::cuda {
namespace ops_detail {

// ---- moe_fused_mul_sum ---------------------------------------------------------------------

template <class T>
__global__ void fused_mul_sum_kernel(const T* inputs, Index ld_token, Index ld_slot, Index num_tokens, Index top_k,
                                     Index hidden_size, const float* weights, Index ld_weights, const std::int32_t* ids,
                                     Index ld_ids, const std::int32_t* expert_map, Index map_size, T* out,
                                     Index ld_out) {
  for (Index m = blockIdx.x; m < num_tokens; m += gridDim.x) {
    for (Index c = threadIdx.x; c < hidden_size; c += blockDim.x) {
      float acc = 0.0f;
      for (Index j = 0; j < top_k; ++j) {
        if (expert_map != nullptr && local_expert_id(ids[m * ld_ids + j], expert_map, map_size) < 0) continue;
        acc = mul_add_rn(acc, weights[m * ld_weights + j], to_float(inputs[m * ld_token + j * ld_slot + c]));
      }
      out[m * ld_out + c] = from_float<T>(acc);
    }
  }
}

}  // namespace ops_detail

// ---------------------------------------------------------------------------------------------
// moe_fused_mul_sum: out[m] = sum_j topk_weights[m, j] * inputs[m, j] in float, ascending j,
// rounded once (bitwise the CPU's). With an expert_map, slots whose id is outside [0, E) or maps
// to a negative entry are skipped (the CPU op does not validate the map's contents either, so
// there is nothing to check). No workspace.
template <class T>
Status moe_fused_mul_sum(DeviceView<const T, 3> inputs, DeviceView<const float, 2> topk_weights, DeviceView<T, 2> out,
                         OptDeviceView<const std::int32_t, 2> topk_ids, OptDeviceView<const std::int32_t, 1> expert_map,
                         cudaStream_t stream = nullptr) {
  using namespace ops_detail;
  MOE_RETURN_IF_ERROR(moe::detail::check_fused_mul_sum_shapes(inputs, topk_weights, out, topk_ids, expert_map));
  const Index M = inputs.extent(0), k = inputs.extent(1), H = inputs.extent(2);
  if (M == 0 || H == 0) return Status::ok();
  const bool mapped = expert_map.has_value();
  fused_mul_sum_kernel<T><<<grid_for(M, 1), kRowThreads, 0, stream>>>(
      inputs.data(), inputs.stride(0), inputs.stride(1), M, k, H, topk_weights.data(), topk_weights.stride(0),
      mapped ? topk_ids->data() : nullptr, mapped ? topk_ids->stride(0) : 0, mapped ? expert_map->data() : nullptr,
      mapped ? expert_map->extent(0) : 0, out.data(), out.stride(0));
  MOE_CUDA_CHECK_LAUNCH();
  return Status::ok();
}

}  // namespace moe::cuda
