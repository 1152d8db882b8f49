// The routed-experts forward of the layer's CUDA paths (moe::Kernel<Spec, cuda::Sm90> for each
// prebuilt activation x dtype x weight-on-input), behind a plain call on device tensors, so that
// the kernels are instantiated in one translation unit (device_layer.cu) for both the DeviceLayer
// and the registry's per-call CUDA entries.
#pragma once

#include <cuda_runtime_api.h>

#include <optional>
#include <span>

#include "moe/layer/registry.h"

namespace moe::layer {

// Every pointer and AnyTensor data is device memory.
struct DeviceExpertsCall {
  KernelKey key;                      // activation, dtype, weight_on_input, scheme (routing: precomputed)
  ActivationParams activation;
  const void* hidden = nullptr;       // [tokens, hidden_size] in key.dtype, contiguous
  Index tokens = 0, hidden_size = 0;
  const std::int32_t* topk_ids = nullptr;  // [tokens, top_k], contiguous
  const float* topk_weights = nullptr;     // [tokens, top_k]
  int top_k = 1;
  AnyTensor w13, w2;                  // [E_local, 2I|I, H], [E_local, H, I]; codes for key.quant != "none"
  SchemeTensors quant;                // quantized and weight-only schemes (moe/layer/registry.h)
  std::optional<AnyTensor> w13_bias, w2_bias, expert_map;
  void* output = nullptr;             // [tokens, hidden_size] in key.dtype
  Index chunk_tokens = 16384;         // the kernel's own chunking
};

Status device_experts_workspace_bytes(const DeviceExpertsCall& call, std::size_t* bytes);
Status run_device_experts(const DeviceExpertsCall& call, std::span<std::byte> workspace, cudaStream_t stream);

}  // namespace moe::layer
