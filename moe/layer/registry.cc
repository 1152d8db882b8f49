#include "moe/layer/registry.h"

#include <sstream>

#include "moe/cpu/kernel.h"
#include "moe/quant/none.h"

namespace moe::layer {

std::string_view to_string(RoutingKind k) {
  switch (k) {
    case RoutingKind::kSoftmax: return "softmax_topk";
    case RoutingKind::kSigmoid: return "sigmoid_topk";
    case RoutingKind::kGroupedSoftmax: return "grouped_softmax_topk";
    case RoutingKind::kGroupedSigmoid: return "grouped_sigmoid_topk";
    case RoutingKind::kLlama4: return "llama4_top1_sigmoid";
    case RoutingKind::kPrecomputed: return "precomputed";
  }
  return "?";
}

std::string_view to_string(ActivationKind k) {
  switch (k) {
    case ActivationKind::kSiluAndMul: return "silu_and_mul";
    case ActivationKind::kGeluAndMul: return "gelu_and_mul";
    case ActivationKind::kGeluTanhAndMul: return "gelu_tanh_and_mul";
    case ActivationKind::kSwigluOai: return "swigluoai";
    case ActivationKind::kSilu: return "silu";
    case ActivationKind::kGelu: return "gelu";
    case ActivationKind::kRelu2: return "relu2";
  }
  return "?";
}

std::string KernelKey::to_string() const {
  std::ostringstream os;
  os << layer::to_string(routing) << " + " << layer::to_string(activation) << " @ " << moe::to_string(dtype)
     << (weight_on_input ? " (router weight on input)" : "");
  return os.str();
}

namespace {

template <class R>
void set_routing(typename R::Arguments& a, const RoutingParams& p) {
  if constexpr (requires { a.renormalize; }) a.renormalize = p.renormalize;
  if constexpr (requires { a.routed_scaling_factor; }) a.routed_scaling_factor = p.routed_scaling_factor;
  if constexpr (requires { a.num_expert_group; }) a.num_expert_group = p.num_expert_group;
  if constexpr (requires { a.topk_group; }) a.topk_group = p.topk_group;
}

template <class A>
void set_activation(typename A::Arguments& a, const ActivationParams& p) {
  if constexpr (requires { a.alpha; }) a.alpha = p.swiglu_alpha;
  if constexpr (requires { a.limit; }) a.limit = p.swiglu_limit;
}

template <class T, int R, class View>
Status bind_optional(const std::optional<AnyTensor>& t, std::string_view name, std::optional<View>* out) {
  if (!t) return Status::ok();
  HostView<const T, R> v;
  MOE_RETURN_IF_ERROR(bind(*t, name, &v));
  *out = v;
  return Status::ok();
}

// The one generic body behind every registry entry.
template <class Routing, class Activation, class T, bool WeightOnInput>
Status forward(const ForwardRequest& r) {
  using Spec = moe::Spec<Routing, StandardPrepareFinalize<WeightOnInput>, Experts<Activation, quant::None<T>>>;
  using Kernel = moe::Kernel<Spec, cpu::Eigen>;
  typename Kernel::Arguments a;
  MOE_RETURN_IF_ERROR(bind(r.hidden_states, "hidden_states", &a.hidden_states));
  MOE_RETURN_IF_ERROR(bind(r.w13, "w13", &a.w13));
  MOE_RETURN_IF_ERROR(bind(r.w2, "w2", &a.w2));
  MOE_RETURN_IF_ERROR(bind(r.output, "output", &a.output));
  if constexpr (Routing::kUsesLogits) {
    if (!r.router_logits) return invalid_argument("router_logits: required by routing ", Routing::kName);
    MOE_RETURN_IF_ERROR(bind(*r.router_logits, "router_logits", &a.router_logits));
  }
  MOE_RETURN_IF_ERROR((bind_optional<float, 1>(r.correction_bias, "correction_bias", &a.correction_bias)));
  MOE_RETURN_IF_ERROR((bind_optional<std::int32_t, 2>(r.topk_ids, "topk_ids", &a.topk_ids)));
  MOE_RETURN_IF_ERROR((bind_optional<float, 2>(r.topk_weights, "topk_weights", &a.topk_weights)));
  MOE_RETURN_IF_ERROR((bind_optional<T, 2>(r.w13_bias, "w13_bias", &a.w13_bias)));
  MOE_RETURN_IF_ERROR((bind_optional<T, 2>(r.w2_bias, "w2_bias", &a.w2_bias)));
  MOE_RETURN_IF_ERROR((bind_optional<std::int32_t, 1>(r.expert_map, "expert_map", &a.expert_map)));
  a.top_k = r.top_k;
  set_routing<Routing>(a.routing, r.routing);
  set_activation<Activation>(a.activation, r.activation);
  return Kernel(r.options).run(a);
}

struct Entry {
  KernelKey key;
  ForwardFn fn;
};

template <class Routing, class Activation, bool WeightOnInput = false>
void add_all_dtypes(std::vector<Entry>& v, RoutingKind rk, ActivationKind ak) {
  v.push_back({{rk, ak, DType::kF32, WeightOnInput}, &forward<Routing, Activation, float, WeightOnInput>});
  v.push_back({{rk, ak, DType::kBF16, WeightOnInput}, &forward<Routing, Activation, bfloat16, WeightOnInput>});
  v.push_back({{rk, ak, DType::kF16, WeightOnInput}, &forward<Routing, Activation, half, WeightOnInput>});
}

// The combinations the supported architectures need (see moe/layer/model_config.h).
const std::vector<Entry>& entries() {
  static const std::vector<Entry> v = [] {
    std::vector<Entry> e;
    add_all_dtypes<routing::SoftmaxTopK, SiluAndMul>(e, RoutingKind::kSoftmax, ActivationKind::kSiluAndMul);
    add_all_dtypes<routing::SoftmaxTopK, SwigluOai>(e, RoutingKind::kSoftmax, ActivationKind::kSwigluOai);
    add_all_dtypes<routing::GroupedTopK<routing::Softmax>, SiluAndMul>(e, RoutingKind::kGroupedSoftmax,
                                                                        ActivationKind::kSiluAndMul);
    add_all_dtypes<routing::GroupedTopK<routing::Sigmoid>, SiluAndMul>(e, RoutingKind::kGroupedSigmoid,
                                                                        ActivationKind::kSiluAndMul);
    add_all_dtypes<routing::Llama4TopK, SiluAndMul, true>(e, RoutingKind::kLlama4, ActivationKind::kSiluAndMul);
    // Routing done by the layer (which reports the ids and weights), experts here; also shared
    // experts: one dense expert with a per-token weight (1, or Qwen2-MoE's sigmoid gate).
    add_all_dtypes<routing::Precomputed, SiluAndMul>(e, RoutingKind::kPrecomputed, ActivationKind::kSiluAndMul);
    add_all_dtypes<routing::Precomputed, SwigluOai>(e, RoutingKind::kPrecomputed, ActivationKind::kSwigluOai);
    add_all_dtypes<routing::Precomputed, SiluAndMul, true>(e, RoutingKind::kPrecomputed, ActivationKind::kSiluAndMul);
    return e;
  }();
  return v;
}

}  // namespace

const std::vector<KernelKey>& built_kernels() {
  static const std::vector<KernelKey> keys = [] {
    std::vector<KernelKey> k;
    for (const Entry& e : entries()) k.push_back(e.key);
    return k;
  }();
  return keys;
}

Status find_kernel(const KernelKey& key, ForwardFn* out) {
  for (const Entry& e : entries()) {
    if (e.key == key) {
      *out = e.fn;
      return Status::ok();
    }
  }
  std::ostringstream os;
  os << "no prebuilt kernel for " << key.to_string() << "; built combinations:";
  for (const Entry& e : entries()) os << "\n  " << e.key.to_string();
  return unsupported(os.str());
}

}  // namespace moe::layer
