// The registry's CUDA entries: the same prebuilt combinations on moe::Kernel<Spec, cuda::Sm90>
// (moe/layer/device_experts.h). Each entry takes host tensors (the ForwardRequest of registry.h),
// copies them to the device, runs, and copies the output back: a convenience, not the way to serve
// a model (moe/layer/device_layer.h is: weights resident, device tensors, no copies or syncs).
#pragma once

#include "moe/layer/device_layer.h"  // cuda_device_available, upload_to_device
#include "moe/layer/moe_layer.h"
#include "moe/layer/registry.h"

namespace moe::layer {

Status find_cuda_kernel(const KernelKey& key, ForwardFn* out);

// Copies a layer's weights to the device once; its forward then runs on the CUDA registry and
// copies only activations per call.
Status make_layer_resident(MoeLayer* layer);

}  // namespace moe::layer
