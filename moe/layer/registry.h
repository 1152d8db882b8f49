// Run-time selection of the prebuilt routed-experts kernels.
//
// A model config decides activation, dtype and weight-on-input only at run time; the kernel type
// needs them at compile time. The registry maps a run-time KernelKey to one of the kernels built
// from moe/layer/built_policies.h's BuiltExperts (registry.cc; the CUDA ones in cuda_registry.cu)
// and runs it on type-erased tensors. A combination that is not built is an error that lists the
// ones that are.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "moe/any_tensor.h"
#include "moe/cpu/options.h"
#include "moe/layer/built_policies.h"
#include "moe/quant/none.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::layer {

// A prebuilt routed-experts kernel (routing precomputed: the layer routes on its own): one entry
// of BuiltExperts (moe/layer/built_policies.h) in one dtype.
struct KernelKey {
  std::string activation = std::string(SiluAndMul::kName);  // an activation policy's kName
  DType dtype = DType::kBF16;  // hidden states, output (and unquantized weights)
  bool weight_on_input = false;
  std::string quant = "none";  // scheme_key of the weights' scheme (moe/layer/built_policies.h)
  bool operator==(const KernelKey&) const = default;
  std::string to_string() const;
};

// The tensors a quantized scheme keeps beside the codes (moe/quant/w8a8.h, moe/quant/weight_only.h),
// each absent where the scheme has none: weight scales f32; static activation scales f32 [1];
// weight-only zero points u8 (the scales' shapes) and act-order i32 [E, H]; the weight-only group.
struct SchemeTensors {
  std::optional<AnyTensor> w13_scale, w2_scale, a13_scale, a2_scale, w13_zero, w2_zero, w13_k_order;
  Index group_size = 0;        // the weight-only integer schemes'
  bool signed_codes = false;   // their codes stored two's complement (moe/quant/weight_only.h)
  static constexpr int kTensors = 7;  // members `each` visits
  // f(name, tensor) for every member, in this order (uploads, copies, messages).
  template <class Self, class F>
  static void each(Self& self, F&& f) {
    f("w13_scale", self.w13_scale), f("w2_scale", self.w2_scale), f("a13_scale", self.a13_scale);
    f("a2_scale", self.a2_scale), f("w13_zero", self.w13_zero), f("w2_zero", self.w2_zero);
    f("w13_k_order", self.w13_k_order);
  }
  bool any() const {
    bool found = false;
    each(*this, [&](const char*, const std::optional<AnyTensor>& t) { found = found || t.has_value(); });
    return found;
  }
};

// Binds `t` into scheme Q's arguments (views on host or device memory: Space), with an error that
// names a tensor the scheme requires but `t` lacks, or one it has that Q does not take.
template <class Q, class Space>
Status bind_scheme_tensors(const SchemeTensors& t, typename Q::template Arguments<Space>* a) {
  constexpr bool kWeightOnly = quant::weight_only_v<Q>;
  const auto optional = [](const std::optional<AnyTensor>& from, std::string_view name, auto* to) -> Status {
    if (!from) return Status::ok();
    typename std::remove_reference_t<decltype(*to)>::value_type v;
    MOE_RETURN_IF_ERROR(bind(*from, name, &v));
    *to = v;
    return Status::ok();
  };
  if constexpr (Q::kQuantized || kWeightOnly) {
    if (!t.w13_scale || !t.w2_scale) return invalid_argument("w13_scale/w2_scale: required by ", scheme_key<Q>(), " weights");
    MOE_RETURN_IF_ERROR(bind(*t.w13_scale, "w13_scale", &a->w13_scale));
    MOE_RETURN_IF_ERROR(bind(*t.w2_scale, "w2_scale", &a->w2_scale));
    if constexpr (kWeightOnly) {
      if (t.a13_scale || t.a2_scale) return invalid_argument("a13_scale/a2_scale: ", scheme_key<Q>(), " takes no activation scales");
      if constexpr (requires { a->w13_zero; }) {  // the integer schemes
        MOE_RETURN_IF_ERROR(optional(t.w13_zero, "w13_zero", &a->w13_zero));
        MOE_RETURN_IF_ERROR(optional(t.w2_zero, "w2_zero", &a->w2_zero));
        MOE_RETURN_IF_ERROR(optional(t.w13_k_order, "w13_k_order", &a->w13_k_order));
        a->group_size = t.group_size;
        a->signed_codes = t.signed_codes;
      } else if (t.w13_zero || t.w2_zero || t.w13_k_order) {
        return invalid_argument("w13_zero/w2_zero/w13_k_order: ", scheme_key<Q>(), " takes no zero points or K order");
      }
    } else {
      if (t.w13_zero || t.w2_zero || t.w13_k_order) {
        return invalid_argument("w13_zero/w2_zero/w13_k_order: ", scheme_key<Q>(), " takes no zero points or K order");
      }
      MOE_RETURN_IF_ERROR(optional(t.a13_scale, "a13_scale", &a->a13_scale));
      MOE_RETURN_IF_ERROR(optional(t.a2_scale, "a2_scale", &a->a2_scale));
    }
    return Status::ok();
  } else {
    if (t.any()) return invalid_argument("w13_scale/w2_scale: given for unquantized weights");
    return Status::ok();
  }
}

// One forward on type-erased host tensors. dtypes: hidden_states, w13, w2, biases and output in
// KernelKey::dtype; topk_weights f32; topk_ids / expert_map i32.
struct ForwardRequest {
  AnyTensor hidden_states;                   // [M, H]
  std::optional<AnyTensor> topk_ids;         // [M, k]
  std::optional<AnyTensor> topk_weights;     // [M, k]
  int top_k = 1;
  AnyTensor w13, w2;                         // [E_local, 2I|I, H], [E_local, H, I]
  SchemeTensors quant;                       // quantized and weight-only schemes
  std::optional<AnyTensor> w13_bias, w2_bias;
  std::optional<AnyTensor> expert_map;       // [E]
  ActivationParams activation;
  AnyTensor output;                          // [M, H]
  cpu::Options options;
  // The CUDA entries only: w13, w2, their biases, the scheme's tensors and expert_map already live in device memory (a layer made resident); the other tensors are host
  // tensors, copied per call.
  bool weights_on_device = false;
};

using ForwardFn = Status (*)(const ForwardRequest&);

// The CPU registry: lookup with an error that lists what is built.
Status find_kernel(const KernelKey& key, ForwardFn* out);

// A backend's table of prebuilt kernels: one entry per BuiltExperts entry and dtype, and one per
// scheme of `Schemes` (quantized) and BuiltQuantizedExperts entry and dtype, each made by
// `make.template operator()<Experts, T, Scheme>()` (Experts an ExpertsPolicies, T the IO type:
// float/bfloat16/half, Scheme quant::None<T>, one of Schemes or of BuiltWeightOnlySchemes, or
// quant::Mxfp4 for BuiltMxfp4Experts; the weight-only ones in bfloat16 and half only).
template <class Fn, class Schemes = PolicyList<>>
class KernelTable {
 public:
  template <class Make>
  explicit KernelTable(Make make) {
    add_all(BuiltExperts{}, make);
    add_quantized(Schemes{}, make);
    add_quantized(BuiltWeightOnlySchemes{}, make);
    add_scheme<quant::Mxfp4>(BuiltMxfp4Experts{}, make);
  }
  // The entry for `key`, or an error naming the backend and listing what is built.
  Status find(const KernelKey& key, std::string_view backend, Fn* out) const {
    for (const auto& [k, fn] : entries_) {
      if (k == key) {
        *out = fn;
        return Status::ok();
      }
    }
    std::string built;
    for (const auto& e : entries_) built += "\n  " + e.first.to_string();
    return unsupported("no prebuilt ", backend, " kernel for ", key.to_string(), "; built combinations:", built);
  }

 private:
  template <class... E, class Make>
  void add_all(PolicyList<E...>, Make& make) {
    (add<E, float, quant::None<float>>(make), ...);
    (add<E, bfloat16, quant::None<bfloat16>>(make), ...);
    (add<E, half, quant::None<half>>(make), ...);
  }
  template <class... Q, class Make>
  void add_quantized(PolicyList<Q...>, Make& make) {
    (add_scheme<Q>(BuiltQuantizedExperts{}, make), ...);
  }
  template <class Q, class... E, class Make>
  void add_scheme(PolicyList<E...>, Make& make) {
    if constexpr (!quant::weight_only_v<Q>) (add<E, float, Q>(make), ...);  // weight-only: bf16/f16 activations
    (add<E, bfloat16, Q>(make), ...);
    (add<E, half, Q>(make), ...);
  }
  template <class E, class T, class Q, class Make>
  void add(Make& make) {
    entries_.emplace_back(KernelKey{std::string(E::Activation::kName), dtype_of<T>, E::kWeightOnInput, scheme_key<Q>()},
                          make.template operator()<E, T, Q>());
  }
  std::vector<std::pair<KernelKey, Fn>> entries_;
};

}  // namespace moe::layer
