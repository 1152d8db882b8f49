// Backend tags of the CUDA backend. Host-compilable: naming a tag needs no nvcc; running the
// backend needs moe/cuda/kernel.cuh in a .cu file.
#pragma once

#include <string_view>

#include "moe/tensor.h"

namespace moe::cuda {

struct Sm80 {
  using Space = DeviceSpace;
  static constexpr std::string_view kName = "cuda_sm80";
  static constexpr int kMinComputeCapability = 80;
};

struct Sm90 {
  using Space = DeviceSpace;
  static constexpr std::string_view kName = "cuda_sm90";
  static constexpr int kMinComputeCapability = 90;
};

template <class A>
concept ArchTag = requires {
  { A::kMinComputeCapability } -> std::convertible_to<int>;
} && std::is_same_v<typename A::Space, DeviceSpace>;

// Options of the CUDA forward.
struct Options {
  Index chunk_tokens = 16384;  // tokens per chunk; bounds the workspace
  // Checked mode: before the forward, copy ids and the expert map to the host (on the forward's
  // stream, then a synchronization) and report out-of-range ids and malformed maps as errors.
  // Off by default: unchecked, such ids contribute zero and never form an address. In the batched
  // format, slots beyond max_tokens_per_expert are dropped in both modes (the counts are only
  // known on the device).
  bool check_device_inputs = false;
};

}  // namespace moe::cuda
