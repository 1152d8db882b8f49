#include "moe/layer/cuda_registry.h"

#include "moe/cuda/check.h"
#include "moe/layer/device_experts.h"

namespace moe::layer {
namespace {

// Device copy of a host tensor (contiguous), freed on scope exit.
class DeviceCopy {
 public:
  DeviceCopy() = default;
  DeviceCopy(const DeviceCopy&) = delete;
  DeviceCopy& operator=(const DeviceCopy&) = delete;
  ~DeviceCopy() {
    if (p_) cudaFree(p_);
  }
  Status upload(const void* host, std::size_t bytes) {
    MOE_CUDA_TRY(cudaMalloc(&p_, bytes > 0 ? bytes : 1));
    if (bytes > 0) MOE_CUDA_TRY(cudaMemcpy(p_, host, bytes, cudaMemcpyHostToDevice));
    return Status::ok();
  }
  Status allocate(std::size_t bytes) {
    MOE_CUDA_TRY(cudaMalloc(&p_, bytes > 0 ? bytes : 1));
    return Status::ok();
  }
  void* get() const { return p_; }

 private:
  void* p_ = nullptr;
};

// A host tensor's contiguous bytes on the device; `expected` is the dtype the kernel takes.
Status to_device(const AnyTensor& t, std::string_view name, DType expected, DeviceCopy& mem, AnyTensor* out) {
  if (t.dtype != expected) return invalid_argument(name, ": expected dtype ", to_string(expected), ", got ", to_string(t.dtype));
  if (!t.strides.empty()) return invalid_argument(name, ": expected a contiguous tensor");
  Index n = 1;
  for (Index e : t.extents) {
    if (e < 0) return invalid_argument(name, ": negative extent in shape ", detail::format_shape(t.extents));
    n *= e;
  }
  const std::size_t element = expected == DType::kF32 || expected == DType::kI32             ? 4
                              : expected == DType::kF8E4M3 || expected == DType::kI8 || expected == DType::kU8 ? 1
                                                                                                  : 2;
  MOE_RETURN_IF_ERROR(mem.upload(t.data, static_cast<std::size_t>(n) * element));
  *out = AnyTensor{mem.get(), t.dtype, t.extents, {}};
  return Status::ok();
}

Status to_device_optional(const std::optional<AnyTensor>& t, std::string_view name, DType expected, DeviceCopy& mem,
                          std::optional<AnyTensor>* out) {
  if (!t) return Status::ok();
  return to_device(*t, name, expected, mem, &out->emplace());
}

// Host tensors in, the routed experts on the device (moe/layer/device_experts.h), host tensor out.
// `scheme`: the weights' (scheme_key); `weight_dtype` their storage (dt for unquantized ones).
Status forward(const ForwardRequest& r, std::string_view activation, bool weight_on_input, std::string_view scheme,
               std::optional<DType> weight_dtype) {
  const DType dt = r.hidden_states.dtype;
  DeviceExpertsCall c;
  c.key = {std::string(activation), dt, weight_on_input, std::string(scheme)};
  c.activation = r.activation;
  if (r.hidden_states.extents.size() != 2) return invalid_argument("hidden_states: expected rank 2");
  if (r.output.dtype != dt || r.output.extents != r.hidden_states.extents || !r.output.strides.empty()) {
    return invalid_argument("output: expected a contiguous tensor of the shape and dtype of hidden_states");
  }
  if (!r.topk_ids || !r.topk_weights) return invalid_argument("topk_ids, topk_weights: required (precomputed routing)");
  c.tokens = r.hidden_states.extents[0];
  c.hidden_size = r.hidden_states.extents[1];
  if (r.topk_ids->extents != std::vector<Index>{c.tokens, r.top_k} || r.topk_weights->extents != r.topk_ids->extents) {
    return invalid_argument("topk_ids/topk_weights: expected shape [M, top_k=", r.top_k, "]");
  }
  c.top_k = r.top_k;
  DeviceCopy hidden, ids, weights, w13, w2, b13, b2, map, out, ws;
  DeviceCopy scheme_copies[SchemeTensors::kTensors];  // one per SchemeTensors member
  AnyTensor h, i, w;
  MOE_RETURN_IF_ERROR(to_device(r.hidden_states, "hidden_states", dt, hidden, &h));
  MOE_RETURN_IF_ERROR(to_device(*r.topk_ids, "topk_ids", DType::kI32, ids, &i));
  MOE_RETURN_IF_ERROR(to_device(*r.topk_weights, "topk_weights", DType::kF32, weights, &w));
  c.hidden = h.data;
  c.topk_ids = static_cast<const std::int32_t*>(i.data);
  c.topk_weights = static_cast<const float*>(w.data);
  if (r.weights_on_device) {
    c.w13 = r.w13;
    c.w2 = r.w2;
    c.w13_bias = r.w13_bias;
    c.w2_bias = r.w2_bias;
    c.expert_map = r.expert_map;
    c.quant = r.quant;  // resident scales too
  } else {
    MOE_RETURN_IF_ERROR(to_device(r.w13, "w13", weight_dtype.value_or(dt), w13, &c.w13));
    MOE_RETURN_IF_ERROR(to_device(r.w2, "w2", weight_dtype.value_or(dt), w2, &c.w2));
    MOE_RETURN_IF_ERROR(to_device_optional(r.w13_bias, "w13_bias", dt, b13, &c.w13_bias));
    MOE_RETURN_IF_ERROR(to_device_optional(r.w2_bias, "w2_bias", dt, b2, &c.w2_bias));
    MOE_RETURN_IF_ERROR(to_device_optional(r.expert_map, "expert_map", DType::kI32, map, &c.expert_map));
    c.quant = r.quant;  // host tensors, replaced by their device copies
    int next = 0;
    Status st = Status::ok();
    SchemeTensors::each(c.quant, [&](const char* name, std::optional<AnyTensor>& t) {
      if (st.is_ok() && t) st = to_device(AnyTensor(*t), name, t->dtype, scheme_copies[next], &*t);
      ++next;
    });
    MOE_RETURN_IF_ERROR(st);
  }
  const std::size_t out_bytes = static_cast<std::size_t>(c.tokens * c.hidden_size) * (dt == DType::kF32 ? 4 : 2);
  MOE_RETURN_IF_ERROR(out.allocate(out_bytes));
  c.output = out.get();
  std::size_t ws_bytes = 0;
  MOE_RETURN_IF_ERROR(device_experts_workspace_bytes(c, &ws_bytes));
  MOE_RETURN_IF_ERROR(ws.allocate(ws_bytes));
  MOE_RETURN_IF_ERROR(run_device_experts(c, std::span<std::byte>(static_cast<std::byte*>(ws.get()), ws_bytes), nullptr));
  MOE_CUDA_TRY(cudaDeviceSynchronize());
  if (out_bytes > 0) MOE_CUDA_TRY(cudaMemcpy(r.output.data, out.get(), out_bytes, cudaMemcpyDeviceToHost));
  return Status::ok();
}

template <class Experts, class Q>
Status forward_as(const ForwardRequest& r) {
  std::optional<DType> weight_dtype;  // unquantized: the hidden states' dtype
  if constexpr (Q::kQuantized || quant::weight_only_v<Q>) weight_dtype = dtype_of<typename Q::WeightElement>;
  return forward(r, Experts::Activation::kName, Experts::kWeightOnInput, scheme_key<Q>(), weight_dtype);
}

}  // namespace

Status find_cuda_kernel(const KernelKey& key, ForwardFn* out) {
  static const KernelTable<ForwardFn, BuiltSchemes> table([&]<class E, class T, class Q>() -> ForwardFn {
    return &forward_as<E, Q>;
  });
  return table.find(key, "CUDA", out);
}

Status make_layer_resident(MoeLayer* layer) {
  if (!cuda_device_available()) return unsupported("make_layer_resident: no CUDA device with compute capability >= 9.0");
  return layer->make_resident(&upload_to_device, &find_cuda_kernel);
}

}  // namespace moe::layer
