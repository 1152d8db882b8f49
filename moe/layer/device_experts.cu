// The routed-experts kernels of every CUDA path of the layer (moe/layer/device_experts.h): one
// moe::Kernel<Spec, cuda::Sm90> per BuiltExperts entry and dtype, instantiated here and only here.
#include "moe/layer/device_experts.h"

#include "moe/cuda/kernel.cuh"
#include "moe/quant/none.h"

namespace moe::layer {

namespace {

template <class T, int R>
Status device_view(const AnyTensor& t, std::string_view name, DeviceView<const T, R>* out) {
  HostView<const T, R> meta;  // dtype, rank and shape checks only; never dereferenced
  MOE_RETURN_IF_ERROR(bind(t, name, &meta));
  *out = DeviceView<const T, R>(meta.data(), meta.extents(), meta.strides());
  return Status::ok();
}

template <class T, int R, class Opt>
Status optional_device_view(const std::optional<AnyTensor>& t, std::string_view name, Opt* out) {
  if (!t) return Status::ok();
  DeviceView<const T, R> v;
  MOE_RETURN_IF_ERROR((device_view<T, R>(*t, name, &v)));
  *out = v;
  return Status::ok();
}

template <class ExpertsPolicies, class T, class Q>
struct TypedExperts {
  using Activation = typename ExpertsPolicies::Activation;
  using Spec = moe::Spec<routing::Precomputed, StandardPrepareFinalize<ExpertsPolicies::kWeightOnInput>,
                         Experts<Activation, Q, T>>;
  using Kernel = moe::Kernel<Spec, cuda::Sm90>;
  using W = typename Q::WeightElement;

  static Status arguments(const DeviceExpertsCall& c, typename Kernel::Arguments* a) {
    a->hidden_states = DeviceView<const T, 2>(static_cast<const T*>(c.hidden), {c.tokens, c.hidden_size});
    a->topk_ids = DeviceView<const std::int32_t, 2>(c.topk_ids, {c.tokens, c.top_k});
    a->topk_weights = DeviceView<const float, 2>(c.topk_weights, {c.tokens, c.top_k});
    a->top_k = c.top_k;
    MOE_RETURN_IF_ERROR((device_view<W, 3>(c.w13, "w13", &a->w13)));
    MOE_RETURN_IF_ERROR((device_view<W, 3>(c.w2, "w2", &a->w2)));
    MOE_RETURN_IF_ERROR((bind_scheme_tensors<Q, DeviceSpace>(c.quant, &a->quant)));
    MOE_RETURN_IF_ERROR((optional_device_view<T, 2>(c.w13_bias, "w13_bias", &a->w13_bias)));
    MOE_RETURN_IF_ERROR((optional_device_view<T, 2>(c.w2_bias, "w2_bias", &a->w2_bias)));
    MOE_RETURN_IF_ERROR((optional_device_view<std::int32_t, 1>(c.expert_map, "expert_map", &a->expert_map)));
    a->output = DeviceView<T, 2>(static_cast<T*>(c.output), {c.tokens, c.hidden_size});
    a->activation = activation_arguments<Activation>(c.activation);
    return Status::ok();
  }
  static Kernel kernel(const DeviceExpertsCall& c) {
    cuda::Options o;
    o.chunk_tokens = c.chunk_tokens;
    return Kernel(o);
  }
  static Status workspace(const DeviceExpertsCall& c, std::size_t* bytes) {
    typename Kernel::Arguments a;
    MOE_RETURN_IF_ERROR(arguments(c, &a));
    *bytes = kernel(c).workspace_bytes(a);
    return Status::ok();
  }
  static Status run(const DeviceExpertsCall& c, std::span<std::byte> ws, cudaStream_t stream) {
    typename Kernel::Arguments a;
    MOE_RETURN_IF_ERROR(arguments(c, &a));
    return kernel(c).run(a, ws, stream);
  }
};

struct ExpertsFns {
  Status (*workspace)(const DeviceExpertsCall&, std::size_t*);
  Status (*run)(const DeviceExpertsCall&, std::span<std::byte>, cudaStream_t);
};

// A W8A8 scheme with f32 hidden states: the CPU registry builds it, the 8-bit GEMMs do not take it.
Status refuse_f32_quantized(const DeviceExpertsCall& c) {
  return unsupported("no CUDA kernel for ", c.key.to_string(),
                     ": the 8-bit GEMMs take bf16 or f16 hidden states (run f32 on the CPU backend)");
}

// The prebuilt combinations (the CPU registry's, moe/layer/built_policies.h), the W8A8 schemes
// included.
Status find_experts(const KernelKey& key, ExpertsFns* out) {
  static const KernelTable<ExpertsFns, BuiltSchemes> table([&]<class E, class T, class Q>() {
    if constexpr (Q::kQuantized && std::is_same_v<T, float>) {
      return ExpertsFns{[](const DeviceExpertsCall& c, std::size_t*) { return refuse_f32_quantized(c); },
                        [](const DeviceExpertsCall& c, std::span<std::byte>, cudaStream_t) { return refuse_f32_quantized(c); }};
    } else {
      return ExpertsFns{&TypedExperts<E, T, Q>::workspace, &TypedExperts<E, T, Q>::run};
    }
  });
  return table.find(key, "CUDA", out);
}

}  // namespace

Status device_experts_workspace_bytes(const DeviceExpertsCall& call, std::size_t* bytes) {
  ExpertsFns e;
  MOE_RETURN_IF_ERROR(find_experts(call.key, &e));
  return e.workspace(call, bytes);
}

Status run_device_experts(const DeviceExpertsCall& call, std::span<std::byte> workspace, cudaStream_t stream) {
  ExpertsFns e;
  MOE_RETURN_IF_ERROR(find_experts(call.key, &e));
  return e.run(call, workspace, stream);
}

}  // namespace moe::layer
