// Run-time selection of prebuilt policy combinations.
//
// A model config decides routing, activation, dtype and weight-on-input only at run time; the
// kernel type needs them at compile time. The registry maps a run-time KernelKey to one of the
// combinations compiled into the library (registry.cc) and runs it on type-erased tensors. A
// combination that is not built is an error that lists the ones that are.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "moe/any_tensor.h"
#include "moe/cpu/options.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::layer {

enum class RoutingKind { kSoftmax, kSigmoid, kGroupedSoftmax, kGroupedSigmoid, kLlama4, kPrecomputed };
enum class ActivationKind { kSiluAndMul, kGeluAndMul, kGeluTanhAndMul, kSwigluOai, kSilu, kGelu, kRelu2 };

std::string_view to_string(RoutingKind k);
std::string_view to_string(ActivationKind k);

struct KernelKey {
  RoutingKind routing = RoutingKind::kSoftmax;
  ActivationKind activation = ActivationKind::kSiluAndMul;
  DType dtype = DType::kBF16;
  bool weight_on_input = false;
  bool operator==(const KernelKey&) const = default;
  std::string to_string() const;
};

// Routing parameters of every built-in policy; each policy reads the ones it has.
struct RoutingParams {
  bool renormalize = false;
  float routed_scaling_factor = 1.0f;
  int num_expert_group = 1;
  int topk_group = 1;
};

struct ActivationParams {
  float swiglu_alpha = 1.702f;
  float swiglu_limit = 7.0f;
};

// One forward on type-erased host tensors. dtypes: hidden_states, w13, w2, biases and output in
// KernelKey::dtype; router_logits / correction_bias / topk_weights f32; topk_ids / expert_map i32.
struct ForwardRequest {
  AnyTensor hidden_states;                   // [M, H]
  std::optional<AnyTensor> router_logits;    // [M, E] (routing from logits)
  std::optional<AnyTensor> correction_bias;  // [E]
  std::optional<AnyTensor> topk_ids;         // [M, k] (RoutingKind::kPrecomputed)
  std::optional<AnyTensor> topk_weights;     // [M, k]
  int top_k = 1;
  AnyTensor w13, w2;                         // [E_local, 2I|I, H], [E_local, H, I]
  std::optional<AnyTensor> w13_bias, w2_bias;
  std::optional<AnyTensor> expert_map;       // [E]
  RoutingParams routing;
  ActivationParams activation;
  AnyTensor output;                          // [M, H]
  cpu::Options options;
  // The CUDA entries only: w13, w2, their biases and expert_map already live in device memory
  // (a layer made resident); the other tensors are host tensors, copied per call.
  bool weights_on_device = false;
};

using ForwardFn = Status (*)(const ForwardRequest&);

// The prebuilt combinations, and lookup with an error that lists them.
const std::vector<KernelKey>& built_kernels();
Status find_kernel(const KernelKey& key, ForwardFn* out);

}  // namespace moe::layer
