// Kernel launches with Hopper's programmatic dependent launch (PDL).
//
// A kernel launched with `programmatic = true` may start while the kernel before it on the stream
// is still running: its CTAs become resident as the previous kernel's CTAs leave, so launch
// latency and the previous kernel's tail overlap. The contract every such kernel keeps:
//   * `grid_dependency_wait()` before it touches memory that an earlier kernel of the forward
//     writes or reads (it returns once the previous grid has completed and its writes are visible);
//   * `allow_dependents_launch()` only after that wait, so the kernel after it may read, before its
//     own wait, whatever kernels two or more launches back wrote (the swap mainloop reads the expert
//     counts that way and prefetches weights into shared memory during the previous kernel's tail).
// Both are no-ops when the kernel was launched without the attribute, or below sm_90.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "moe/cuda/check.h"

namespace moe::cuda::detail {

__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when `programmatic`
// (callers pass it only for kernels that keep the contract above, on sm_90 devices).
template <class... Params, class... Args>
Status launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                     bool programmatic, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = programmatic ? &attribute : nullptr;
  config.numAttrs = programmatic ? 1 : 0;
  MOE_CUDA_TRY(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
  return Status::ok();
}

}  // namespace moe::cuda::detail
