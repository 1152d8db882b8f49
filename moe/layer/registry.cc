#include "moe/layer/registry.h"

#include "moe/cpu/kernel.h"
#include "moe/quant/none.h"

namespace moe::layer {

std::string KernelKey::to_string() const {
  return activation + " @ " + std::string(moe::to_string(dtype)) + (quant != "none" ? ", weights " + quant : "") +
         (weight_on_input ? " (router weight on input)" : "");
}

namespace {

template <class T, int R, class View>
Status bind_optional(const std::optional<AnyTensor>& t, std::string_view name, std::optional<View>* out) {
  if (!t) return Status::ok();
  HostView<const T, R> v;
  MOE_RETURN_IF_ERROR(bind(*t, name, &v));
  *out = v;
  return Status::ok();
}

// The one generic body behind every CPU registry entry: routing given as ids and weights.
template <class ExpertsPolicies, class T, class Q>
Status forward(const ForwardRequest& r) {
  using Activation = typename ExpertsPolicies::Activation;
  using Spec = moe::Spec<routing::Precomputed, StandardPrepareFinalize<ExpertsPolicies::kWeightOnInput>,
                         Experts<Activation, Q, T>>;
  using Kernel = moe::Kernel<Spec, cpu::Eigen>;
  typename Kernel::Arguments a;
  MOE_RETURN_IF_ERROR(bind(r.hidden_states, "hidden_states", &a.hidden_states));
  MOE_RETURN_IF_ERROR(bind(r.w13, "w13", &a.w13));
  MOE_RETURN_IF_ERROR(bind(r.w2, "w2", &a.w2));
  MOE_RETURN_IF_ERROR(bind(r.output, "output", &a.output));
  MOE_RETURN_IF_ERROR((bind_optional<std::int32_t, 2>(r.topk_ids, "topk_ids", &a.topk_ids)));
  MOE_RETURN_IF_ERROR((bind_optional<float, 2>(r.topk_weights, "topk_weights", &a.topk_weights)));
  MOE_RETURN_IF_ERROR((bind_optional<T, 2>(r.w13_bias, "w13_bias", &a.w13_bias)));
  MOE_RETURN_IF_ERROR((bind_optional<T, 2>(r.w2_bias, "w2_bias", &a.w2_bias)));
  MOE_RETURN_IF_ERROR((bind_optional<std::int32_t, 1>(r.expert_map, "expert_map", &a.expert_map)));
  a.top_k = r.top_k;
  a.activation = activation_arguments<Activation>(r.activation);
  MOE_RETURN_IF_ERROR((bind_scheme_tensors<Q, HostSpace>(r.quant, &a.quant)));
  return Kernel(r.options).run(a);
}

const KernelTable<ForwardFn, BuiltSchemes>& table() {
  static const KernelTable<ForwardFn, BuiltSchemes> t(
      []<class E, class T, class Q>() -> ForwardFn { return &forward<E, T, Q>; });
  return t;
}

}  // namespace

Status find_kernel(const KernelKey& key, ForwardFn* out) { return table().find(key, "CPU", out); }

}  // namespace moe::layer
