// The policies the runtime layer picks by name, and their run-time parameters, in one place.
//
// A model config decides routing and activation only at run time, while a kernel type needs them
// at compile time. The lists below are the policy types the library prebuilds; everything that
// maps a run-time name to a type (the CPU and CUDA registries, the layer's routing on both
// backends, the tool's messages) walks these lists. Adding a built-in routing or activation is its
// struct (moe/routing.h, moe/activation.h) plus one line here; a routing the device layer runs
// also names its warp-level fast path (moe/cuda/router.cuh, WarpRouteOf).
//
// Names are the policies' own kName, so a message, `moe info` and a lookup all say the same.
#pragma once

#include <string>
#include <string_view>
#include <type_traits>

#include "moe/activation.h"
#include "moe/quant/mxfp4.h"
#include "moe/quant/w8a8.h"
#include "moe/quant/weight_only.h"
#include "moe/routing.h"
#include "moe/status.h"

namespace moe::layer {

template <class... Policies>
struct PolicyList {};

// Routing from router logits, as the supported model configs use it (moe/layer/model_config.cc).
using BuiltRoutings = PolicyList<routing::SoftmaxTopK, routing::SigmoidTopK, routing::GroupedTopK<routing::Softmax>,
                                 routing::GroupedTopK<routing::Sigmoid>, routing::Llama4TopK>;

// One prebuilt routed-experts kernel per entry, in each of f32, bf16 and f16, on both backends:
// the activation and whether the router weight scales the expert input (Llama-4) or its output.
template <class A, bool WeightOnInput = false>
struct ExpertsPolicies {
  using Activation = A;
  static constexpr bool kWeightOnInput = WeightOnInput;
};
using BuiltExperts = PolicyList<ExpertsPolicies<SiluAndMul>, ExpertsPolicies<SwigluOai>,
                                ExpertsPolicies<SiluAndMul, /*WeightOnInput=*/true>>;

// Quantized routed-experts kernels (the CPU backend; moe/quant/w8a8.h): each scheme of
// BuiltSchemes for each entry of BuiltQuantizedExperts, in f32, bf16 and f16 IO. The layer keys
// them by scheme_key: the checkpoints' formats (DeepSeek-V3 and Qwen3 FP8: 128x128 blocks;
// compressed-tensors FP8 per channel or per tensor, INT8 per channel).
using BuiltSchemes = PolicyList<quant::Fp8Block<128, 128>, quant::Fp8PerTokenChannel, quant::Fp8PerTensor,
                                quant::Int8PerTokenChannel>;
using BuiltQuantizedExperts = PolicyList<ExpertsPolicies<SiluAndMul>>;
// Weight-only schemes (moe/quant/weight_only.h), for the same experts, in bf16 and f16 IO: GPTQ,
// AWQ and compressed-tensors pack-quantized checkpoints. Group size, zero points and act-order are
// run-time tensors of one kernel.
using BuiltWeightOnlySchemes = PolicyList<quant::W4A16, quant::W8A16>;
// MXFP4 (moe/quant/mxfp4.h) for gpt-oss's experts: SwigluOai with biases, interleaved rows.
using BuiltMxfp4Experts = PolicyList<ExpertsPolicies<SwigluOai>>;

// "none" for the unquantized schemes, else the scheme's name (with its block sizes).
template <class Q>
std::string scheme_key() {
  if constexpr (quant::weight_only_v<Q>) {
    return std::string(Q::kName);
  } else if constexpr (!Q::kQuantized) {
    return "none";
  } else if constexpr (Q::kWeightScale == quant::ScaleGranularity::kBlock) {
    return std::string(Q::kName) + "_" + std::to_string(Q::kBlockN) + "x" + std::to_string(Q::kBlockK);
  } else {
    return std::string(Q::kName);
  }
}

// ---- run-time parameters, read by whichever policy has them ---------------------------------

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

// Whether routing policy R ranks groups of experts first (reads num_expert_group / topk_group).
template <class R>
inline constexpr bool kRoutesByGroup = requires(typename R::Arguments a) { a.num_expert_group; };

template <class R>
typename R::Arguments routing_arguments(const RoutingParams& p) {
  typename R::Arguments a{};
  if constexpr (requires { a.renormalize; }) a.renormalize = p.renormalize;
  if constexpr (requires { a.routed_scaling_factor; }) a.routed_scaling_factor = p.routed_scaling_factor;
  if constexpr (kRoutesByGroup<R>) {
    a.num_expert_group = p.num_expert_group;
    a.topk_group = p.topk_group;
  }
  return a;
}

template <class A>
typename A::Arguments activation_arguments(const ActivationParams& p) {
  typename A::Arguments a{};
  if constexpr (requires { a.alpha; }) a.alpha = p.swiglu_alpha;
  if constexpr (requires { a.limit; }) a.limit = p.swiglu_limit;
  return a;
}

// ---- name -> type ------------------------------------------------------------------------

// "a, b, c": the names of a list, for messages.
template <class... P>
std::string policy_names(PolicyList<P...>) {
  std::string s;
  ((s += (s.empty() ? "" : ", "), s += P::kName), ...);
  return s;
}

// Calls `f.template operator()<P>()` (which returns Status) for the policy P of the list whose
// kName is `name`. No match: an error that names `what` and lists the built names.
template <class... P, class F>
Status visit_policy(PolicyList<P...> list, std::string_view what, std::string_view name, F&& f) {
  bool found = false;
  Status result = Status::ok();
  const auto try_policy = [&]<class Policy>() {
    if (found || Policy::kName != name) return;
    found = true;
    static_cast<void>(result = f.template operator()<Policy>());
  };
  (try_policy.template operator()<P>(), ...);
  if (!found) return unsupported(what, ": \"", name, "\" is not a built-in policy (built: ", policy_names(list), ")");
  return result;
}

// The w13 row layout (gate/up split or interleaved) the built activation named `name` expects;
// kSplit for a name not built.
template <class... E>
GateUpLayout gate_up_layout(PolicyList<E...>, std::string_view name) {
  static_assert((E::Activation::kGated && ...), "the layer loads gated experts (w13 = gate and up rows) only");
  GateUpLayout layout = GateUpLayout::kSplit;
  (void)((E::Activation::kName == name ? (layout = E::Activation::kLayout, true) : false) || ...);
  return layout;
}
inline GateUpLayout gate_up_layout(std::string_view name) { return gate_up_layout(BuiltExperts{}, name); }

// Whether the routing policy named `name` ranks groups first (false for a name not built).
inline bool routes_by_group(std::string_view name) {
  bool grouped = false;
  (void)visit_policy(BuiltRoutings{}, "routing", name, [&]<class R>() {
    grouped = kRoutesByGroup<R>;
    return Status::ok();
  });
  return grouped;
}

}  // namespace moe::layer
