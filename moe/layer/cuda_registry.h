// The registry's CUDA entries: the same prebuilt combinations on moe::Kernel<Spec, cuda::Sm90>.
// Each entry takes host tensors (the ForwardRequest of registry.h), copies them to the device,
// runs, and copies the output back: a convenience for the tool, not the way to serve a model
// (which keeps weights resident and calls the kernel directly).
#pragma once

#include "moe/layer/moe_layer.h"
#include "moe/layer/registry.h"

namespace moe::layer {

// True when a Hopper GPU (compute capability 9.x) is present: the build carries machine code for
// sm_90a and sm_80 and no PTX.
bool cuda_device_available();

Status find_cuda_kernel(const KernelKey& key, ForwardFn* out);

// Copies a layer's weights to the device once; its forward then runs on the CUDA registry and
// copies only activations per call.
Status make_layer_resident(MoeLayer* layer);

// Device memory holding a copy of `bytes` bytes of `host`, freed when the last holder goes.
Status upload_to_device(const void* host, std::size_t bytes, std::shared_ptr<void>* device);

}  // namespace moe::layer
