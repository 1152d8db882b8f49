#include "moe/layer/cuda_registry.h"

#include <sstream>

#include "moe/cuda/kernel.cuh"
#include "moe/quant/none.h"

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

template <class T, int R>
Status to_device(const AnyTensor& t, std::string_view name, DeviceCopy& mem, DeviceView<const T, R>* out) {
  HostView<const T, R> h;
  MOE_RETURN_IF_ERROR(bind(t, name, &h));
  if (!h.is_contiguous()) return invalid_argument(name, ": expected a contiguous tensor");
  MOE_RETURN_IF_ERROR(mem.upload(h.data(), static_cast<std::size_t>(h.size()) * sizeof(T)));
  *out = DeviceView<const T, R>(static_cast<const T*>(mem.get()), h.extents());
  return Status::ok();
}

template <class T, int R, class Opt>
Status to_device_optional(const std::optional<AnyTensor>& t, std::string_view name, DeviceCopy& mem, Opt* out) {
  if (!t) return Status::ok();
  DeviceView<const T, R> v;
  MOE_RETURN_IF_ERROR((to_device<T, R>(*t, name, mem, &v)));
  *out = v;
  return Status::ok();
}

// A tensor that already lives on the device (a resident layer's weights): checks dtype and rank,
// then views the device pointer.
template <class T, int R>
Status wrap_device(const AnyTensor& t, std::string_view name, DeviceView<const T, R>* out) {
  HostView<const T, R> meta;  // shape and dtype only; never dereferenced here
  MOE_RETURN_IF_ERROR(bind(t, name, &meta));
  *out = DeviceView<const T, R>(meta.data(), meta.extents(), meta.strides());
  return Status::ok();
}
template <class T, int R, class Opt>
Status wrap_device_optional(const std::optional<AnyTensor>& t, std::string_view name, Opt* out) {
  if (!t) return Status::ok();
  DeviceView<const T, R> v;
  MOE_RETURN_IF_ERROR((wrap_device<T, R>(*t, name, &v)));
  *out = v;
  return Status::ok();
}

template <class Activation, class T, bool WeightOnInput>
Status forward(const ForwardRequest& r) {
  using Spec = moe::Spec<routing::Precomputed, StandardPrepareFinalize<WeightOnInput>, Experts<Activation, quant::None<T>>>;
  using Kernel = moe::Kernel<Spec, cuda::Sm90>;
  typename Kernel::Arguments a;
  DeviceCopy hidden, ids, weights, w13, w2, b13, b2, map, out, ws;
  MOE_RETURN_IF_ERROR((to_device<T, 2>(r.hidden_states, "hidden_states", hidden, &a.hidden_states)));
  MOE_RETURN_IF_ERROR((to_device_optional<std::int32_t, 2>(r.topk_ids, "topk_ids", ids, &a.topk_ids)));
  MOE_RETURN_IF_ERROR((to_device_optional<float, 2>(r.topk_weights, "topk_weights", weights, &a.topk_weights)));
  if (r.weights_on_device) {
    MOE_RETURN_IF_ERROR((wrap_device<T, 3>(r.w13, "w13", &a.w13)));
    MOE_RETURN_IF_ERROR((wrap_device<T, 3>(r.w2, "w2", &a.w2)));
    MOE_RETURN_IF_ERROR((wrap_device_optional<T, 2>(r.w13_bias, "w13_bias", &a.w13_bias)));
    MOE_RETURN_IF_ERROR((wrap_device_optional<T, 2>(r.w2_bias, "w2_bias", &a.w2_bias)));
    MOE_RETURN_IF_ERROR((wrap_device_optional<std::int32_t, 1>(r.expert_map, "expert_map", &a.expert_map)));
  } else {
    MOE_RETURN_IF_ERROR((to_device<T, 3>(r.w13, "w13", w13, &a.w13)));
    MOE_RETURN_IF_ERROR((to_device<T, 3>(r.w2, "w2", w2, &a.w2)));
    MOE_RETURN_IF_ERROR((to_device_optional<T, 2>(r.w13_bias, "w13_bias", b13, &a.w13_bias)));
    MOE_RETURN_IF_ERROR((to_device_optional<T, 2>(r.w2_bias, "w2_bias", b2, &a.w2_bias)));
    MOE_RETURN_IF_ERROR((to_device_optional<std::int32_t, 1>(r.expert_map, "expert_map", map, &a.expert_map)));
  }
  HostView<T, 2> host_out;
  MOE_RETURN_IF_ERROR(bind(r.output, "output", &host_out));
  if (!host_out.is_contiguous()) return invalid_argument("output: expected a contiguous tensor");
  const std::size_t out_bytes = static_cast<std::size_t>(host_out.size()) * sizeof(T);
  MOE_RETURN_IF_ERROR(out.allocate(out_bytes));
  a.output = DeviceView<T, 2>(static_cast<T*>(out.get()), host_out.extents());
  a.top_k = r.top_k;
  if constexpr (requires { a.activation.alpha; }) {
    a.activation.alpha = r.activation.swiglu_alpha;
    a.activation.limit = r.activation.swiglu_limit;
  }
  Kernel kernel;
  MOE_RETURN_IF_ERROR(kernel.can_implement(a));
  const std::size_t ws_bytes = kernel.workspace_bytes(a);
  MOE_RETURN_IF_ERROR(ws.allocate(ws_bytes));
  MOE_RETURN_IF_ERROR(kernel.run(a, std::span<std::byte>(static_cast<std::byte*>(ws.get()), ws_bytes)));
  MOE_CUDA_TRY(cudaDeviceSynchronize());
  if (out_bytes > 0) MOE_CUDA_TRY(cudaMemcpy(host_out.data(), out.get(), out_bytes, cudaMemcpyDeviceToHost));
  return Status::ok();
}

struct Entry {
  KernelKey key;
  ForwardFn fn;
};

template <class Activation, bool WeightOnInput = false>
void add_all_dtypes(std::vector<Entry>& v, ActivationKind ak) {
  v.push_back({{RoutingKind::kPrecomputed, ak, DType::kF32, WeightOnInput}, &forward<Activation, float, WeightOnInput>});
  v.push_back({{RoutingKind::kPrecomputed, ak, DType::kBF16, WeightOnInput}, &forward<Activation, bfloat16, WeightOnInput>});
  v.push_back({{RoutingKind::kPrecomputed, ak, DType::kF16, WeightOnInput}, &forward<Activation, half, WeightOnInput>});
}

const std::vector<Entry>& entries() {
  static const std::vector<Entry> v = [] {
    std::vector<Entry> e;
    add_all_dtypes<SiluAndMul>(e, ActivationKind::kSiluAndMul);
    add_all_dtypes<SwigluOai>(e, ActivationKind::kSwigluOai);
    add_all_dtypes<SiluAndMul, true>(e, ActivationKind::kSiluAndMul);
    return e;
  }();
  return v;
}

}  // namespace

bool cuda_device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  // The build carries machine code for sm_90a (and sm_80) only, no PTX: Hopper is required.
  int major = 0;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0) == cudaSuccess && major == 9;
}

Status find_cuda_kernel(const KernelKey& key, ForwardFn* out) {
  for (const Entry& e : entries()) {
    if (e.key == key) {
      *out = e.fn;
      return Status::ok();
    }
  }
  std::ostringstream os;
  os << "no prebuilt CUDA kernel for " << key.to_string() << "; built combinations:";
  for (const Entry& e : entries()) os << "\n  " << e.key.to_string();
  return unsupported(os.str());
}

Status upload_to_device(const void* host, std::size_t bytes, std::shared_ptr<void>* device) {
  void* p = nullptr;
  MOE_CUDA_TRY(cudaMalloc(&p, bytes > 0 ? bytes : 1));
  std::shared_ptr<void> holder(p, [](void* q) { cudaFree(q); });
  if (bytes > 0) MOE_CUDA_TRY(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice));
  *device = std::move(holder);
  return Status::ok();
}

Status make_layer_resident(MoeLayer* layer) {
  if (!cuda_device_available()) return unsupported("make_layer_resident: no CUDA device with compute capability >= 9.0");
  return layer->make_resident(&upload_to_device, &find_cuda_kernel);
}

}  // namespace moe::layer
