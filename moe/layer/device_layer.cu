#include "moe/layer/device_layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "moe/cuda/cublas_runtime.h"
#include "moe/cuda/ops/eplb.cuh"
#include "moe/cuda/parallel/ep_all_to_all.cuh"
#include "moe/cuda/router.cuh"
#include "moe/detail/workspace.h"
#include "moe/layer/device_experts.h"

namespace moe::layer {

// ---- DeviceLayer ---------------------------------------------------------------------------------

template <class... R>
constexpr bool every_routing_has_a_warp_route(PolicyList<R...>) {
  return (cuda::detail::HasWarpRoute<R> && ...);
}
static_assert(every_routing_has_a_warp_route(BuiltRoutings{}),
              "every BuiltRoutings policy needs its warp fast path (WarpRouteOf in moe/cuda/router.cuh)");

bool cuda_device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  int major = 0;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0) == cudaSuccess && major == 9;
}

Status upload_to_device(const void* host, std::size_t bytes, std::shared_ptr<void>* device) {
  void* p = nullptr;
  MOE_CUDA_TRY(cudaMalloc(&p, bytes > 0 ? bytes : 1));
  std::shared_ptr<void> holder(p, [](void* q) { cudaFree(q); });
  if (bytes > 0) MOE_CUDA_TRY(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice));
  *device = std::move(holder);
  return Status::ok();
}

namespace {

std::size_t element_bytes(DType t) { return t == DType::kF32 ? 4 : 2; }

// Device memory freed with its owner.
struct DeviceMemory {
  std::shared_ptr<void> p;
  std::size_t bytes = 0;
  void* get() const { return p.get(); }
};

Status upload(const void* host, std::size_t bytes, DeviceMemory* out) {
  MOE_RETURN_IF_ERROR(upload_to_device(host, bytes, &out->p));
  out->bytes = bytes;
  return Status::ok();
}

Status allocate(std::size_t bytes, DeviceMemory* out) {
  void* p = nullptr;
  MOE_CUDA_TRY(cudaMalloc(&p, bytes > 0 ? bytes : 1));
  out->p = std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
  out->bytes = bytes;
  return Status::ok();
}

// Offsets of the per-forward buffers in the layer's workspace (256-byte aligned).
struct WorkspaceLayout {
  std::size_t logits = 0, ids = 0, physical_ids = 0, weights = 0, gate = 0, routed_out = 0, shared_out = 0, zeros = 0,
      experts = 0, shared_experts = 0;
  std::size_t experts_bytes = 0, shared_experts_bytes = 0, total = 0;
  // The all-to-all dispatch: ep_forward's buffers, and the dispatched rows' kernel call (a local
  // expert id and weight 1 per row, its own workspace).
  std::size_t a2a = 0, a2a_ids = 0, a2a_ones = 0, a2a_experts = 0;
  std::size_t a2a_bytes = 0, a2a_experts_bytes = 0;
  Index a2a_rows = 0;  // the most rows the experts can receive
};

}  // namespace

struct DeviceLayer::Impl {
  ModelConfig config;
  ParallelLayout parallel;
  DType dtype = DType::kBF16;
  Index H = 0, E_router = 0, L = 0, It = 0, St = 0;
  int k = 1;
  int appended = 0;         // fused shared-expert slots per token
  // Quantized layers: the scheme's key, the codes' dtype and the scale tensors (moe/quant/w8a8.h
  // layouts) beside the routed and the shared experts' codes.
  std::string scheme = "none";
  DType code_dtype = DType::kBF16;
  Index pack = 1;  // codes per stored element along K (2: 4-bit weight-only codes)
  struct Scales {
    DeviceMemory memory[SchemeTensors::kTensors];  // one per SchemeTensors member
    SchemeTensors tensors;   // views of `memory`
  };
  Scales routed_scales, shared_scales;
  bool shared_apart = false;  // shared expert as a second expert pass
  bool zero_experts_here = false;
  // EPLB: the routing's logical ids become physical ones (token-hash replica, as MoeLayer) in
  // ws.physical_ids, which the experts read; the tokens per physical expert add up in
  // expert_load (int64 atomics: deterministic) until reset.
  Index num_physical = 0;  // 0: no EPLB
  Index max_replicas = 0;
  bool all_to_all() const { return parallel.dispatch != EpDispatch::kPartialSums; }
  parallel::EpConfig ep_config() const {
    parallel::EpConfig c;
    c.experts_per_rank = num_physical > 0 ? num_physical / parallel.ep_size : L;
    c.mode = parallel.dispatch == EpDispatch::kAllToAllLowLatency ? parallel::DispatchMode::kLowLatency
                                                                   : parallel::DispatchMode::kNormal;
    c.max_tokens_per_rank = options.max_tokens;
    return c;
  }
  DeviceMemory eplb_map, eplb_replicas, expert_load;
  Options options;
  // bf16 layers with cuBLAS present: the router as bf16 pieces for a tensor-core GEMM (router.cuh)
  // above kTensorCoreRouterTokens tokens, through a handle with its own workspace (no allocation
  // in the forward; one forward at a time per layer).
  static constexpr Index kTensorCoreRouterTokens = 16;
  static constexpr std::size_t kCublasWorkspaceBytes = std::size_t{32} << 20;
  cublasHandle_t blas = nullptr;
  DeviceMemory router_pieces, blas_workspace;
  // An unfused shared expert runs on a second stream, overlapped with the routed experts: forked
  // after the routing, joined before the combine (events, so graph capture keeps the fork).
  cudaStream_t side = nullptr;
  cudaEvent_t fork = nullptr, join = nullptr;
  ~Impl() {
    if (blas) cuda::CublasRuntime::get().destroy(blas);
    if (side) cudaStreamDestroy(side);
    if (fork) cudaEventDestroy(fork);
    if (join) cudaEventDestroy(join);
  }
  Status prepare_router_pieces();
  int logit_pieces() const { return router_pieces.get() ? 3 : 1; }
  DeviceMemory router, router_bias, correction_bias, shared_gate, w13, w2, w13_bias, w2_bias, expert_map, shared_w13,
      shared_w2, workspace;
  std::vector<Index> w13_shape, w2_shape;
  WorkspaceLayout ws;

  int slots() const { return k + appended; }
  // The first id of the fused shared pieces: right after the ids the expert map covers.
  int appended_first_id() const { return static_cast<int>(num_physical > 0 ? num_physical : E_router); }
  // The ids the experts read: the routing's, or their physical replicas under EPLB.
  const std::int32_t* kernel_ids(std::byte* base) const {
    return reinterpret_cast<const std::int32_t*>(base + (num_physical > 0 ? ws.physical_ids : ws.ids));
  }
  bool combine() const { return shared_apart || zero_experts_here; }

  // The scale tensors of a quantized call (nothing for unquantized layers).
  void set_scales(const Scales& s, DeviceExpertsCall* c) const {
    if (scheme != "none") c->quant = s.tensors;
  }
  DeviceExpertsCall routed_call(const void* x, Index M, const std::int32_t* ids, const float* w, void* out) const {
    DeviceExpertsCall c;
    c.key = {config.activation, dtype, config.weight_on_input, scheme};
    c.activation = config.activation_params;
    c.hidden = x;
    c.tokens = M;
    c.hidden_size = H;
    c.topk_ids = ids;
    c.topk_weights = w;
    c.top_k = slots();
    c.w13 = AnyTensor{w13.get(), code_dtype, w13_shape, {}};
    c.w2 = AnyTensor{w2.get(), code_dtype, w2_shape, {}};
    set_scales(routed_scales, &c);
    if (w13_bias.get()) c.w13_bias = AnyTensor{w13_bias.get(), dtype, {L, w13_shape[1]}, {}};
    if (w2_bias.get()) c.w2_bias = AnyTensor{w2_bias.get(), dtype, {L, H}, {}};
    if (expert_map.get()) {
      c.expert_map = AnyTensor{expert_map.get(), DType::kI32, {static_cast<Index>(expert_map.bytes / 4)}, {}};
    }
    c.output = out;
    c.chunk_tokens = options.max_tokens;
    return c;
  }
  // The rows an all-to-all brings here: each a token routed to its local expert with weight 1,
  // so the kernel's finalize hands back the expert's output for the sender's combine.
  DeviceExpertsCall dispatched_call(const void* x, Index R, const std::int32_t* local_ids, const float* ones, void* out) const {
    DeviceExpertsCall c = routed_call(x, R, local_ids, ones, out);
    c.top_k = 1;
    c.expert_map.reset();
    return c;
  }
  DeviceExpertsCall shared_call(const void* x, Index M, const std::int32_t* zeros, const float* gate, void* out) const {
    DeviceExpertsCall c;
    c.key = {std::string(SiluAndMul::kName), dtype, false, scheme};
    c.hidden = x;
    c.tokens = M;
    c.hidden_size = H;
    c.topk_ids = zeros;
    c.topk_weights = gate;
    c.top_k = 1;
    c.w13 = AnyTensor{shared_w13.get(), code_dtype, {1, 2 * St, H / pack}, {}};
    c.w2 = AnyTensor{shared_w2.get(), code_dtype, {1, H, St / pack}, {}};
    set_scales(shared_scales, &c);
    c.output = out;
    c.chunk_tokens = options.max_tokens;
    return c;
  }

  // The routed experts of a chunk into `routed` ([M, H]): this rank's experts on its routing
  // (nullptr), or the all-to-all over the EP group (forward_all_to_all).
  template <class T>
  using RoutedPass = std::function<Status(const T* x, Index M, std::byte* base, T* routed, cudaStream_t stream)>;
  template <class T>
  Status forward_chunk(const T* x, Index M, T* out, std::byte* base, cudaStream_t stream,
                       const RoutedPass<T>* routed_pass = nullptr) const;
  // Shapes, routing support and the shared-expert plan from the config; then the workspace.
  Status plan(const ModelConfig& c, const ParallelLayout& par, DType dt, Index local_experts, Index intermediate_tp,
              Index shared_tp, const Options& o);
  Status allocate_workspace();
  // The all-to-all's workspace pieces, from allocate_workspace's carver.
  template <class Take>
  Status plan_all_to_all(Take take);
  Index ws_rows() const { return ws.a2a_rows; }
  // The routed slots of a chunk's tokens [m0, m0 + Mc), as MoeLayer::Result reports them.
  Status copy_routing(std::byte* base, Index m0, Index Mc, const std::optional<AnyTensor>& topk_ids,
                      const std::optional<AnyTensor>& topk_weights, cudaStream_t stream) const {
    if (topk_ids && Mc > 0) {
      MOE_CUDA_TRY(cudaMemcpy2DAsync(static_cast<std::int32_t*>(topk_ids->data) + m0 * k, k * 4, base + ws.ids, slots() * 4, k * 4,
                                     Mc, cudaMemcpyDeviceToDevice, stream));
    }
    if (topk_weights && Mc > 0) {
      MOE_CUDA_TRY(cudaMemcpy2DAsync(static_cast<float*>(topk_weights->data) + m0 * k, k * 4, base + ws.weights, slots() * 4, k * 4,
                                     Mc, cudaMemcpyDeviceToDevice, stream));
    }
    return Status::ok();
  }
  template <class T>
  Status forward_all_to_all(cuda::NcclCommunicator& comm, const T* x, Index M, T* out, std::byte* base, cudaStream_t stream) const;
};

namespace {

__global__ void fill_ones_kernel(float* v, Index n) {
  for (Index i = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; i < n; i += static_cast<Index>(gridDim.x) * blockDim.x) {
    v[i] = 1.0f;
  }
}

// One block per local expert e: the local id of each row of its segment (the other rows, the
// low-latency layout's padding, keep the -1 they were set to).
__global__ void segment_ids_kernel(const Index* seg_begin, const Index* seg_count, std::int32_t* ids) {
  const Index e = blockIdx.x, begin = seg_begin[e], count = seg_count[e];
  for (Index t = threadIdx.x; t < count; t += blockDim.x) ids[begin + t] = static_cast<std::int32_t>(e);
}

}  // namespace

template <class Take>
Status DeviceLayer::Impl::plan_all_to_all(Take take) {
  const parallel::EpConfig c = ep_config();
  const int P = parallel.ep_size;
  std::size_t bytes = 0;
  const auto ep_bytes = [&]<class T>() {
    return cuda::ep_forward_workspace_bytes<T>(c, P, H, k, &bytes);
  };
  switch (dtype) {
    case DType::kBF16: MOE_RETURN_IF_ERROR(ep_bytes.template operator()<bfloat16>()); break;
    case DType::kF16: MOE_RETURN_IF_ERROR(ep_bytes.template operator()<half>()); break;
    default: MOE_RETURN_IF_ERROR(ep_bytes.template operator()<float>()); break;
  }
  ws.a2a_bytes = bytes;
  ws.a2a = take(bytes);
  // Received rows: every peer's block in the normal mode, the batched layout in the low-latency one.
  Index rows = 0;
  if (!parallel::product_fits(options.max_tokens, k, P, &rows)) return invalid_argument("options.max_tokens: too large for the all-to-all");
  if (c.mode == parallel::DispatchMode::kLowLatency) rows = c.experts_per_rank * P * options.max_tokens;
  ws.a2a_rows = rows;
  ws.a2a_ids = take(static_cast<std::size_t>(rows) * 4);
  ws.a2a_ones = take(static_cast<std::size_t>(rows) * 4);
  // The kernel runs chunks of at most options.max_tokens rows (dispatched_call's chunk_tokens):
  // every count up to that, and the largest.
  std::size_t experts = 0;
  for (Index R = 1; R <= std::min(rows, options.max_tokens); ++R) {
    std::size_t b = 0;
    MOE_RETURN_IF_ERROR(device_experts_workspace_bytes(dispatched_call(nullptr, R, nullptr, nullptr, nullptr), &b));
    experts = std::max(experts, b);
  }
  std::size_t last = 0;
  MOE_RETURN_IF_ERROR(device_experts_workspace_bytes(dispatched_call(nullptr, rows, nullptr, nullptr, nullptr), &last));
  ws.a2a_experts_bytes = std::max(experts, last);
  ws.a2a_experts = take(ws.a2a_experts_bytes);
  return Status::ok();
}

template <class T>
Status DeviceLayer::Impl::forward_all_to_all(cuda::NcclCommunicator& comm, const T* x, Index M, T* out, std::byte* base,
                                             cudaStream_t stream) const {
  const RoutedPass<T> pass = [&](const T* xs, Index Mc, std::byte* b, T* routed, cudaStream_t s) -> Status {
    const Index ld = slots();
    cuda::DeviceEpTokens<T> tokens;
    tokens.hidden = DeviceView<const T, 2>(xs, {Mc, H});
    tokens.topk_ids = DeviceView<const std::int32_t, 2>(kernel_ids(b), {Mc, Index{k}}, {ld, 1});
    tokens.topk_weights = DeviceView<const float, 2>(reinterpret_cast<const float*>(b + ws.weights), {Mc, Index{k}}, {ld, 1});
    auto* ids = reinterpret_cast<std::int32_t*>(b + ws.a2a_ids);
    const auto* ones = reinterpret_cast<const float*>(b + ws.a2a_ones);
    const cuda::DeviceLocalExperts<T> experts = [&](const ExpertRows<T, DeviceSpace>& rows, cudaStream_t st) -> Status {
      const Index R = rows.input.extent(0), n = rows.seg_begin.extent(0);
      if (R == 0) return Status::ok();
      if (R > ws.a2a_rows) return make_status(StatusCode::kInternal, "DeviceLayer: ", R, " dispatched rows; planned ", ws.a2a_rows);
      MOE_CUDA_TRY(cudaMemsetAsync(ids, 0xFF, static_cast<std::size_t>(R) * 4, st));
      segment_ids_kernel<<<static_cast<unsigned>(n), 256, 0, st>>>(rows.seg_begin.data(), rows.seg_count.data(), ids);
      MOE_CUDA_CHECK_LAUNCH();
      return run_device_experts(dispatched_call(rows.input.data(), R, ids, ones, rows.output.data()),
                                std::span<std::byte>(b + ws.a2a_experts, ws.a2a_experts_bytes), st);
    };
    return cuda::ep_forward<T>(comm, ep_config(), tokens, experts, DeviceView<T, 2>(routed, {Mc, H}),
                               std::span<std::byte>(b + ws.a2a, ws.a2a_bytes), s);
  };
  return forward_chunk(x, M, out, base, stream, &pass);
}

namespace {

// Median of `iterations` CUDA-event timings of a graph launch, each after an L2 flush, in us.
Status time_graph(cudaGraphExec_t exec, cudaStream_t stream, void* flush, std::size_t flush_bytes, int iterations,
                  double* us) {
  cudaEvent_t start, stop;
  MOE_CUDA_TRY(cudaEventCreate(&start));
  MOE_CUDA_TRY(cudaEventCreate(&stop));
  std::vector<float> ms;
  const auto replays = [&]() -> Status {
    for (int i = 0; i < iterations + 2; ++i) {  // two warm-up replays
      float t = 0;
      MOE_CUDA_TRY(cudaMemsetAsync(flush, i, flush_bytes, stream));
      MOE_CUDA_TRY(cudaEventRecord(start, stream));
      MOE_CUDA_TRY(cudaGraphLaunch(exec, stream));
      MOE_CUDA_TRY(cudaEventRecord(stop, stream));
      MOE_CUDA_TRY(cudaEventSynchronize(stop));
      MOE_CUDA_TRY(cudaEventElapsedTime(&t, start, stop));
      if (i >= 2) ms.push_back(t);
    }
    return Status::ok();
  };
  const Status s = replays();
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  MOE_RETURN_IF_ERROR(s);
  std::sort(ms.begin(), ms.end());
  *us = ms.empty() ? 0.0 : 1e3 * ms[ms.size() / 2];
  return Status::ok();
}

// Captures `body` on `stream` into an executable graph.
template <class F>
Status capture(cudaStream_t stream, F body, cudaGraphExec_t* exec) {
  cudaGraph_t graph;
  MOE_CUDA_TRY(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const Status s = body();
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  MOE_RETURN_IF_ERROR(s);
  MOE_CUDA_TRY(end);
  const cudaError_t inst = cudaGraphInstantiate(exec, graph, 0);
  cudaGraphDestroy(graph);
  MOE_CUDA_TRY(inst);
  return Status::ok();
}

}  // namespace

DeviceLayer::DeviceLayer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DeviceLayer::~DeviceLayer() = default;
DType DeviceLayer::dtype() const { return impl_->dtype; }
Index DeviceLayer::hidden_size() const { return impl_->H; }
int DeviceLayer::top_k() const { return impl_->k; }
bool DeviceLayer::shared_experts_fused() const { return impl_->appended > 0; }
std::size_t DeviceLayer::workspace_bytes() const { return impl_->ws.total; }

Status DeviceLayer::expert_load(std::vector<std::int64_t>* out) const {
  const Impl& d = *impl_;
  if (d.num_physical == 0) return invalid_argument("expert_load: the layer was created without EPLB (redundant_experts)");
  std::vector<std::int64_t> load(static_cast<std::size_t>(d.num_physical));
  MOE_CUDA_TRY(cudaDeviceSynchronize());  // every forward's counts, on any stream
  MOE_CUDA_TRY(cudaMemcpy(load.data(), d.expert_load.get(), load.size() * 8, cudaMemcpyDeviceToHost));
  *out = std::move(load);
  return Status::ok();
}

Status DeviceLayer::reset_expert_load() {
  Impl& d = *impl_;
  if (d.num_physical == 0) return invalid_argument("reset_expert_load: the layer was created without EPLB (redundant_experts)");
  MOE_CUDA_TRY(cudaDeviceSynchronize());
  MOE_CUDA_TRY(cudaMemset(d.expert_load.get(), 0, d.expert_load.bytes));
  return Status::ok();
}

Status DeviceLayer::Impl::plan(const ModelConfig& c, const ParallelLayout& par, DType dt, Index local_experts,
                               Index intermediate_tp, Index shared_tp, const Options& o) {
  if (!cuda_device_available()) return unsupported("DeviceLayer: no CUDA device with compute capability 9.x");
  if (o.max_tokens < 1 || o.max_tokens > (Index{1} << 20)) {
    return invalid_argument("options.max_tokens: expected 1..2^20, got ", o.max_tokens);
  }
  config = c;
  parallel = par;
  dtype = dt;
  if (scheme == "none") code_dtype = dt;  // unquantized weights are stored like the activations
  options = o;
  H = c.hidden;
  E_router = c.num_experts + c.num_zero_experts;
  L = local_experts;
  It = intermediate_tp;
  St = shared_tp;
  k = c.top_k;
  // All-to-all: every rank adds the zero experts and the shared expert of its own tokens.
  const bool own_tokens = par.dispatch != EpDispatch::kPartialSums;
  zero_experts_here = c.num_zero_experts > 0 && par.tp_rank == 0 && (par.ep_rank == 0 || own_tokens);
  if (E_router > cuda::detail::kWarpRouteMaxExperts) {
    return unsupported("DeviceLayer: routing over ", E_router, " experts; the device routing takes at most ",
                       cuda::detail::kWarpRouteMaxExperts);
  }
  MOE_RETURN_IF_ERROR(visit_policy(BuiltRoutings{}, "routing", c.routing, [&]<class R>() { return Status::ok(); }));
  if (routes_by_group(c.routing) && c.routing_params.num_expert_group > 32) {
    return unsupported("DeviceLayer: ", c.routing_params.num_expert_group, " expert groups; the device routing takes at most 32");
  }
  // Shared experts fused as extra experts: same activation (SiluAndMul), no expert biases, a
  // width that is a whole number of routed experts' widths, and the router weight applied at the
  // output (Llama-4's weight on the input is defined for one slot per token only).
  const bool has_shared = St > 0;
  // Quantized shared experts run apart: their scale blocks need not line up with the routed ones'.
  // Under the all-to-all the shared expert runs apart: fused pieces would be dispatched.
  const bool fusable = has_shared && o.fuse_shared_experts && c.activation == SiluAndMul::kName &&
                       !c.expert_biases && !c.weight_on_input && It > 0 && St % It == 0 && scheme == "none" && !own_tokens;
  appended = fusable ? static_cast<int>(St / It) : 0;
  shared_apart = has_shared && !fusable;
  w13_shape = {L + appended, 2 * It, H / pack};
  w2_shape = {L + appended, H, It / pack};
  return Status::ok();
}

namespace {

__global__ void fill_normal_kernel(void* data, DType dtype, std::size_t n, float scale, std::uint64_t seed) {
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    // Irwin-Hall: the sum of four hashed uniforms, centred and scaled to unit variance.
    float sum = 0.0f;
    for (int j = 0; j < 4; ++j) {
      std::uint64_t z = seed + (4 * i + j) * 0x9E3779B97F4A7C15ull;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      sum += static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
    }
    const float v = scale * (sum - 2.0f) * 1.7320508f;
    if (dtype == DType::kF32) static_cast<float*>(data)[i] = v;
    else if (dtype == DType::kBF16) static_cast<bfloat16*>(data)[i] = from_float<bfloat16>(v);
    else static_cast<half*>(data)[i] = from_float<half>(v);
  }
}

Status fill_random(DeviceMemory* m, DType dtype, std::size_t count, float scale, std::uint64_t seed) {
  MOE_RETURN_IF_ERROR(allocate(count * element_bytes(dtype), m));
  fill_normal_kernel<<<1024, 256>>>(m->get(), dtype, count, scale, seed);
  MOE_CUDA_CHECK_LAUNCH();
  return Status::ok();
}

}  // namespace

Status DeviceLayer::create_random(const ModelConfig& config, DType dtype, const Options& options, std::uint64_t seed,
                                  std::unique_ptr<DeviceLayer>* out) {
  if (dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kF16) {
    return invalid_argument("dtype: expected f32, bf16 or f16, got ", to_string(dtype));
  }
  auto impl = std::make_unique<Impl>();
  Impl& d = *impl;
  MOE_RETURN_IF_ERROR(d.plan(config, {}, dtype, config.num_experts, config.intermediate, config.shared_intermediate, options));
  const auto count = [](const std::vector<Index>& shape) {
    std::size_t n = 1;
    for (Index e : shape) n *= static_cast<std::size_t>(e);
    return n;
  };
  // Weights ~ N(0, 0.02^2) (fused shared pieces included), router ~ N(0, 1/H): logits of unit scale.
  MOE_RETURN_IF_ERROR(fill_random(&d.w13, dtype, count(d.w13_shape), 0.02f, seed + 1));
  MOE_RETURN_IF_ERROR(fill_random(&d.w2, dtype, count(d.w2_shape), 0.02f, seed + 2));
  MOE_RETURN_IF_ERROR(fill_random(&d.router, DType::kF32, static_cast<std::size_t>(d.E_router * d.H),
                                  1.0f / std::sqrt(static_cast<float>(d.H)), seed + 3));
  if (config.expert_biases) {
    MOE_RETURN_IF_ERROR(fill_random(&d.w13_bias, dtype, static_cast<std::size_t>(d.L * 2 * d.It), 0.02f, seed + 4));
    MOE_RETURN_IF_ERROR(fill_random(&d.w2_bias, dtype, static_cast<std::size_t>(d.L * d.H), 0.02f, seed + 5));
  }
  if (config.router_bias) MOE_RETURN_IF_ERROR(fill_random(&d.router_bias, DType::kF32, d.E_router, 0.1f, seed + 6));
  if (config.correction_bias) MOE_RETURN_IF_ERROR(fill_random(&d.correction_bias, DType::kF32, d.E_router, 0.1f, seed + 7));
  if (d.shared_apart) {
    MOE_RETURN_IF_ERROR(fill_random(&d.shared_w13, dtype, static_cast<std::size_t>(2 * d.St * d.H), 0.02f, seed + 8));
    MOE_RETURN_IF_ERROR(fill_random(&d.shared_w2, dtype, static_cast<std::size_t>(d.H * d.St), 0.02f, seed + 9));
  }
  if (config.shared_expert_gate && d.St > 0) {
    MOE_RETURN_IF_ERROR(fill_random(&d.shared_gate, DType::kF32, static_cast<std::size_t>(d.H), 0.02f, seed + 10));
  }
  if (config.num_zero_experts > 0 || d.appended > 0) {  // routed ids -> local ids, zero experts -> -1, pieces after
    std::vector<std::int32_t> map(static_cast<std::size_t>(d.E_router + d.appended), -1);
    for (Index e = 0; e < config.num_experts; ++e) map[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(e);
    for (int s = 0; s < d.appended; ++s) map[static_cast<std::size_t>(d.E_router + s)] = static_cast<std::int32_t>(d.L + s);
    if (config.num_zero_experts > 0) MOE_RETURN_IF_ERROR(upload(map.data(), map.size() * 4, &d.expert_map));
  }
  MOE_RETURN_IF_ERROR(d.prepare_router_pieces());
  MOE_RETURN_IF_ERROR(d.allocate_workspace());
  out->reset(new DeviceLayer(std::move(impl)));
  return Status::ok();
}

Status DeviceLayer::Impl::prepare_router_pieces() {
  const cuda::CublasRuntime& cublas = cuda::CublasRuntime::get();
  if (dtype != DType::kBF16 || !cublas.available()) return Status::ok();  // the SIMT router only
  const std::size_t n = static_cast<std::size_t>(E_router) * H;
  MOE_RETURN_IF_ERROR(allocate(3 * n * sizeof(bfloat16), &router_pieces));
  cuda::detail::split_router_kernel<<<1024, 256>>>(static_cast<const float*>(router.get()), n,
                                                   static_cast<bfloat16*>(router_pieces.get()));
  MOE_CUDA_CHECK_LAUNCH();
  MOE_RETURN_IF_ERROR(allocate(kCublasWorkspaceBytes, &blas_workspace));
  if (cublas.create(&blas) != CUBLAS_STATUS_SUCCESS) {
    blas = nullptr;
    router_pieces = {};
    return Status::ok();  // no handle: the SIMT router
  }
  if (cublas.set_workspace(blas, blas_workspace.get(), kCublasWorkspaceBytes) != CUBLAS_STATUS_SUCCESS) {
    return make_status(StatusCode::kCudaError, "cublasSetWorkspace failed");
  }
  return Status::ok();
}

Status DeviceLayer::Impl::allocate_workspace() {
  Impl& d = *this;
  const std::size_t elem = element_bytes(d.dtype);
  // Workspace: per-forward buffers for max_tokens, then the largest expert-kernel workspace over
  // every chunk size (the kernel's tile and split choices depend on the token count).
  const Index Mx = d.options.max_tokens;
  detail::WorkspaceCarver<256> carver;  // cudaMalloc's base is aligned: no slack needed, total() has it
  const auto take = [&](std::size_t bytes) { return carver.take(bytes); };
  d.ws.logits = take(static_cast<std::size_t>(Mx) * d.logit_pieces() * d.E_router * 4);
  d.ws.ids = take(static_cast<std::size_t>(Mx) * d.slots() * 4);
  d.ws.physical_ids = take(d.num_physical > 0 ? static_cast<std::size_t>(Mx) * d.slots() * 4 : 0);
  d.ws.weights = take(static_cast<std::size_t>(Mx) * d.slots() * 4);
  d.ws.gate = take(d.shared_apart ? static_cast<std::size_t>(Mx) * 4 : 0);
  d.ws.routed_out = take(d.combine() ? static_cast<std::size_t>(Mx) * d.H * elem : 0);
  d.ws.shared_out = take(d.shared_apart ? static_cast<std::size_t>(Mx) * d.H * elem : 0);
  d.ws.zeros = take(d.shared_apart ? static_cast<std::size_t>(Mx) * 4 : 0);
  std::size_t experts = 0, shared = 0;
  for (Index M = 1; M <= Mx; ++M) {
    std::size_t b = 0;
    if (!d.all_to_all()) {  // the all-to-all runs the received rows instead (plan_all_to_all)
      MOE_RETURN_IF_ERROR(device_experts_workspace_bytes(d.routed_call(nullptr, M, nullptr, nullptr, nullptr), &b));
      experts = std::max(experts, b);
    }
    if (d.shared_apart) {
      MOE_RETURN_IF_ERROR(device_experts_workspace_bytes(d.shared_call(nullptr, M, nullptr, nullptr, nullptr), &b));
      shared = std::max(shared, b);
    }
  }
  d.ws.experts_bytes = experts;
  d.ws.experts = take(experts);
  d.ws.shared_experts_bytes = shared;  // its own: the two passes run concurrently
  d.ws.shared_experts = take(shared);
  if (d.all_to_all()) MOE_RETURN_IF_ERROR(d.plan_all_to_all(take));
  d.ws.total = carver.total();
  MOE_RETURN_IF_ERROR(allocate(d.ws.total, &d.workspace));
  if (d.shared_apart) {  // the shared pass routes every token to its one expert: ids stay zero
    MOE_CUDA_TRY(cudaMemset(static_cast<std::byte*>(d.workspace.get()) + d.ws.zeros, 0, static_cast<std::size_t>(Mx) * 4));
    MOE_CUDA_TRY(cudaStreamCreateWithFlags(&d.side, cudaStreamNonBlocking));
    MOE_CUDA_TRY(cudaEventCreateWithFlags(&d.fork, cudaEventDisableTiming));
    MOE_CUDA_TRY(cudaEventCreateWithFlags(&d.join, cudaEventDisableTiming));
  }
  if (d.all_to_all()) {  // the dispatched rows' weights: 1 each, written once
    fill_ones_kernel<<<256, 256>>>(reinterpret_cast<float*>(static_cast<std::byte*>(d.workspace.get()) + d.ws.a2a_ones), d.ws_rows());
    MOE_CUDA_CHECK_LAUNCH();
  }
  MOE_CUDA_TRY(cudaDeviceSynchronize());
  return Status::ok();
}

Status DeviceLayer::create(const MoeLayer& layer, const Options& options, std::unique_ptr<DeviceLayer>* out) {
  if (layer.parallel().dispatch != EpDispatch::kPartialSums && layer.config().weight_on_input) {
    return unsupported("DeviceLayer: apply_router_weight_on_input with the all-to-all dispatch is not supported on the device "
                       "layer yet; use the per-call path (MoeLayer::forward_all_to_all)");
  }
  auto impl = std::make_unique<Impl>();
  Impl& d = *impl;
  // Quantized layers keep their codes and scales; a scheme the CUDA registry does not build for
  // this dtype is refused by allocate_workspace's first workspace query, with the reason.
  d.scheme = layer.weight_scheme();
  d.code_dtype = layer.w13_.dtype;
  if (layer.w13_.shape.size() == 3 && layer.w13_.shape[2] > 0) d.pack = layer.config_.hidden / layer.w13_.shape[2];
  if (d.scheme != "none") {
    // The host buffers' views, each replaced by a view of its device copy.
    const auto put_scales = [&](const MoeLayer::SchemeBuffers& held, Impl::Scales* s) {
      s->tensors = held.tensors(layer.group_size_, layer.signed_codes_);
      int i = 0;
      Status st = Status::ok();
      SchemeTensors::each(s->tensors, [&](const char*, std::optional<AnyTensor>& t) {
        DeviceMemory& mem = s->memory[i++];
        if (!st.is_ok() || !t) return;
        std::size_t bytes = t->dtype == DType::kU8 ? 1 : 4;  // f32 scales, i32 orders, u8 zero points
        for (Index e : t->extents) bytes *= static_cast<std::size_t>(e);
        st = upload(t->data, bytes, &mem);
        t->data = mem.get();
      });
      return st;
    };
    MOE_RETURN_IF_ERROR(put_scales(layer.routed_quant_, &d.routed_scales));
    if (layer.shared_tp_ > 0) MOE_RETURN_IF_ERROR(put_scales(layer.shared_quant_, &d.shared_scales));
  }
  MOE_RETURN_IF_ERROR(d.plan(layer.config_, layer.parallel_, layer.dtype_, layer.local_experts_,
                             layer.intermediate_tp_, layer.shared_tp_, options));
  if (layer.eplb_) {  // the placement's maps, and a zeroed load counter per physical expert
    const parallel::EplbPlacement& pl = layer.eplb_->placement;
    d.num_physical = pl.num_physical;
    d.max_replicas = pl.max_replicas;
    MOE_RETURN_IF_ERROR(upload(pl.logical_to_physical.data(), pl.logical_to_physical.size() * 4, &d.eplb_map));
    MOE_RETURN_IF_ERROR(upload(pl.replica_count.data(), pl.replica_count.size() * 4, &d.eplb_replicas));
    MOE_RETURN_IF_ERROR(allocate(static_cast<std::size_t>(pl.num_physical) * 8, &d.expert_load));
    MOE_CUDA_TRY(cudaMemset(d.expert_load.get(), 0, d.expert_load.bytes));
  }
  const std::size_t elem = element_bytes(d.dtype);

  // Routed (and fused shared) expert weights.
  {
    const std::size_t w13_routed = layer.w13_.bytes.size(), w2_routed = layer.w2_.bytes.size();
    std::vector<std::byte> w13(w13_routed + static_cast<std::size_t>(d.appended) * 2 * d.It * d.H * elem);
    std::vector<std::byte> w2(w2_routed + static_cast<std::size_t>(d.appended) * d.H * d.It * elem);
    std::memcpy(w13.data(), layer.w13_.bytes.data(), w13_routed);
    std::memcpy(w2.data(), layer.w2_.bytes.data(), w2_routed);
    // Piece s of the shared expert: gate rows [s*It, (s+1)*It) and up rows [St + s*It, ...) of
    // shared_w13 [2St, H]; columns [s*It, (s+1)*It) of shared_w2 [H, St].
    const std::size_t row13 = static_cast<std::size_t>(d.H) * elem, row2 = static_cast<std::size_t>(d.It) * elem;
    for (int s = 0; s < d.appended; ++s) {
      std::byte* dst13 = w13.data() + w13_routed + static_cast<std::size_t>(s) * 2 * d.It * row13;
      const std::byte* src = layer.shared_w13_.bytes.data();
      std::memcpy(dst13, src + static_cast<std::size_t>(s) * d.It * row13, d.It * row13);
      std::memcpy(dst13 + d.It * row13, src + static_cast<std::size_t>(d.St + s * d.It) * row13, d.It * row13);
      std::byte* dst2 = w2.data() + w2_routed + static_cast<std::size_t>(s) * d.H * row2;
      for (Index h = 0; h < d.H; ++h) {
        std::memcpy(dst2 + h * row2, layer.shared_w2_.bytes.data() + (static_cast<std::size_t>(h) * d.St + s * d.It) * elem,
                    row2);
      }
    }
    MOE_RETURN_IF_ERROR(upload(w13.data(), w13.size(), &d.w13));
    MOE_RETURN_IF_ERROR(upload(w2.data(), w2.size(), &d.w2));
  }
  if (!layer.w13_bias_.shape.empty()) MOE_RETURN_IF_ERROR(upload(layer.w13_bias_.bytes.data(), layer.w13_bias_.bytes.size(), &d.w13_bias));
  if (!layer.w2_bias_.shape.empty()) MOE_RETURN_IF_ERROR(upload(layer.w2_bias_.bytes.data(), layer.w2_bias_.bytes.size(), &d.w2_bias));
  // Expert map over the router's experts, extended by the fused shared pieces (ids E_router + s ->
  // local L + s). Without a map, global ids are local ids (E_router == L) and the pieces follow.
  if (!layer.expert_map_.empty()) {
    std::vector<std::int32_t> map = layer.expert_map_;
    for (int s = 0; s < d.appended; ++s) map.push_back(static_cast<std::int32_t>(d.L + s));
    MOE_RETURN_IF_ERROR(upload(map.data(), map.size() * 4, &d.expert_map));
  }
  if (d.shared_apart) {
    MOE_RETURN_IF_ERROR(upload(layer.shared_w13_.bytes.data(), layer.shared_w13_.bytes.size(), &d.shared_w13));
    MOE_RETURN_IF_ERROR(upload(layer.shared_w2_.bytes.data(), layer.shared_w2_.bytes.size(), &d.shared_w2));
  }
  // Router (fp32) and its vectors.
  MOE_RETURN_IF_ERROR(upload(layer.router_.data(), layer.router_.size() * 4, &d.router));
  if (!layer.router_bias_.empty()) MOE_RETURN_IF_ERROR(upload(layer.router_bias_.data(), layer.router_bias_.size() * 4, &d.router_bias));
  if (!layer.correction_bias_.empty()) {
    MOE_RETURN_IF_ERROR(upload(layer.correction_bias_.data(), layer.correction_bias_.size() * 4, &d.correction_bias));
  }
  if (!layer.shared_gate_.empty() && d.St > 0) {
    MOE_RETURN_IF_ERROR(upload(layer.shared_gate_.data(), layer.shared_gate_.size() * 4, &d.shared_gate));
  }

  MOE_RETURN_IF_ERROR(d.prepare_router_pieces());
  MOE_RETURN_IF_ERROR(d.allocate_workspace());
  MOE_CUDA_TRY(cudaDeviceSynchronize());
  out->reset(new DeviceLayer(std::move(impl)));
  return Status::ok();
}

template <class T>
Status DeviceLayer::Impl::forward_chunk(const T* x, Index M, T* out, std::byte* base, cudaStream_t stream,
                                        const RoutedPass<T>* routed_pass) const {
  using namespace cuda::detail;
  // A rank with no tokens launches nothing of its own but still takes part in the all-to-all.
  if (M == 0) return routed_pass ? (*routed_pass)(x, 0, base, out, stream) : Status::ok();
  float* logits = reinterpret_cast<float*>(base + ws.logits);
  auto* ids = reinterpret_cast<std::int32_t*>(base + ws.ids);
  auto* weights = reinterpret_cast<float*>(base + ws.weights);
  const float* bias = static_cast<const float*>(router_bias.get());
  T* shared = nullptr;
  bool forked = false;  // the side stream took the shared pass and must be joined
  // Steps 1-3, this rank's own work before the routed experts.
  const auto prepare = [&]() -> Status {
    // 1. Router logits, fp32.
    if (router_pieces.get() && M > kTensorCoreRouterTokens) {
      // logits[M, 3E] (row-major) = x [M, H] . pieces [3E, H]^T; cuBLAS is column-major: the
      // transposed product, pieces^T as op(A) and x^T as B.
      const cuda::CublasRuntime& cublas = cuda::CublasRuntime::get();
      const float one = 1.0f, zero = 0.0f;
      const int n3 = static_cast<int>(3 * E_router);
      if (cublas.set_stream(blas, stream) != CUBLAS_STATUS_SUCCESS ||
          cublas.gemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, n3, static_cast<int>(M), static_cast<int>(H), &one,
                      router_pieces.get(), CUDA_R_16BF, static_cast<int>(H), x, CUDA_R_16BF, static_cast<int>(H), &zero,
                      logits, CUDA_R_32F, n3, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
        return make_status(StatusCode::kCudaError, "cublasGemmEx (router logits) failed");
      }
    } else if (M <= kRouterRowMaxTokens) {
      const dim3 grid(static_cast<unsigned>(E_router), static_cast<unsigned>((M + kRouterTokensPerBlock - 1) / kRouterTokensPerBlock));
      MOE_RETURN_IF_ERROR(launch_kernel(&router_logits_rows_kernel<T>, grid, 256, 0, stream, true, x, M, H,
                                        static_cast<const float*>(router.get()), bias, E_router, logits));
    } else {
      const dim3 grid(static_cast<unsigned>((M + kRouterTileM - 1) / kRouterTileM),
                      static_cast<unsigned>((E_router + kRouterTileE - 1) / kRouterTileE));
      MOE_RETURN_IF_ERROR(launch_kernel(&router_logits_tiled_kernel<T>, grid, 256, 0, stream, true, x, M, H,
                                        static_cast<const float*>(router.get()), bias, E_router, logits));
    }
    const bool pieces = router_pieces.get() && M > kTensorCoreRouterTokens;
    // 2. Routing, with the fused shared slots appended.
    WarpRouteParams rp{};
    rp.logits = logits;
    rp.logit_pieces = pieces ? 3 : 1;
    rp.router_bias = pieces ? bias : nullptr;  // the SIMT kernels add it themselves
    rp.M = M;
    rp.E = static_cast<int>(E_router);
    rp.top_k = k;
    rp.correction_bias = static_cast<const float*>(correction_bias.get());
    rp.groups = routes_by_group(config.routing) ? config.routing_params.num_expert_group : 1;
    rp.topk_group = config.routing_params.topk_group;
    rp.renormalize = config.routing_params.renormalize;
    rp.routed_scaling_factor = config.routing_params.routed_scaling_factor;
    rp.appended = appended;
    rp.appended_first_id = appended_first_id();
    rp.shared_gate = static_cast<const float*>(shared_gate.get());
    rp.H = H;
    rp.ids = ids;
    rp.weights = weights;
    rp.gate_out = shared_apart ? reinterpret_cast<float*>(base + ws.gate) : nullptr;
    const unsigned route_blocks = static_cast<unsigned>((M + kWarpRouteWarps - 1) / kWarpRouteWarps);
    MOE_RETURN_IF_ERROR(visit_policy(BuiltRoutings{}, "routing", config.routing, [&]<class R>() {
      return launch_kernel(&warp_route_kernel<WarpRouteOf<R>::kScoring, T>, route_blocks, 32 * kWarpRouteWarps, 0,
                           stream, true, rp, x);
    }));
    // 2b. EPLB: the routed slots' physical replicas (the fused shared slots copied as they are).
    if (num_physical > 0 && M > 0) {
      auto* physical = reinterpret_cast<std::int32_t*>(base + ws.physical_ids);
      const Index ld = slots();
      MOE_RETURN_IF_ERROR(cuda::eplb_logical_to_physical(
          DeviceView<const std::int32_t, 2>(ids, {M, Index{k}}, {ld, 1}),
          DeviceView<const std::int32_t, 2>(static_cast<const std::int32_t*>(eplb_map.get()), {config.num_experts, max_replicas}),
          DeviceView<const std::int32_t, 1>(static_cast<const std::int32_t*>(eplb_replicas.get()), {config.num_experts}), num_physical,
          ReplicaChoice::kTokenHash, DeviceView<std::int32_t, 2>(physical, {M, Index{k}}, {ld, 1}),
          DeviceView<std::int64_t, 1>(static_cast<std::int64_t*>(expert_load.get()), {num_physical}), -1, stream));
      if (appended > 0) {
        MOE_CUDA_TRY(cudaMemcpy2DAsync(physical + k, ld * 4, ids + k, ld * 4, static_cast<std::size_t>(appended) * 4,
                                       static_cast<std::size_t>(M), cudaMemcpyDeviceToDevice, stream));
      }
    }
    // 3. A shared expert that could not be fused: its own pass (weight 1 or its gate) on the side
    // stream, concurrent with 4.
    if (shared_apart) {
      shared = reinterpret_cast<T*>(base + ws.shared_out);
      MOE_CUDA_TRY(cudaEventRecord(fork, stream));
      MOE_CUDA_TRY(cudaStreamWaitEvent(side, fork, 0));
      forked = true;
      MOE_RETURN_IF_ERROR(run_device_experts(
          shared_call(x, M, reinterpret_cast<const std::int32_t*>(base + ws.zeros), reinterpret_cast<const float*>(base + ws.gate),
                      shared),
          std::span<std::byte>(base + ws.shared_experts, ws.shared_experts_bytes), side));
      MOE_CUDA_TRY(cudaEventRecord(join, side));
    }
    return Status::ok();
  };
  Status st = prepare();
  // 4. Experts (and the fused shared experts). The all-to-all's collectives run whatever failed
  // here, with no tokens from this rank, so no peer is left waiting on it in NCCL.
  const std::span<std::byte> experts_ws(base + ws.experts, ws.experts_bytes);
  T* routed = combine() ? reinterpret_cast<T*>(base + ws.routed_out) : out;
  if (routed_pass) {
    const Status pass = (*routed_pass)(x, st.is_ok() ? M : 0, base, routed, stream);
    if (st.is_ok()) st = pass;
  } else if (st.is_ok()) {
    st = run_device_experts(routed_call(x, M, kernel_ids(base), weights, routed), experts_ws, stream);
  }
  if (forked) {
    const cudaError_t joined = cudaStreamWaitEvent(stream, join, 0);
    if (st.is_ok() && joined != cudaSuccess) st = make_status(StatusCode::kCudaError, "cudaStreamWaitEvent: ", cudaGetErrorString(joined));
  }
  MOE_RETURN_IF_ERROR(st);
  // 5. Combine.
  if (combine()) {
    const Index n = M * H;
    const int zero_first = zero_experts_here ? static_cast<int>(config.num_experts) : 0;
    const int zero_last = zero_experts_here ? static_cast<int>(E_router) : 0;
    MOE_RETURN_IF_ERROR(launch_kernel(&combine_kernel<T>, static_cast<unsigned>((n + 255) / 256), 256, 0, stream, true,
                                      static_cast<const T*>(routed), static_cast<const T*>(shared), x,
                                      static_cast<const std::int32_t*>(ids), static_cast<const float*>(weights), slots(),
                                      k, zero_first, zero_last, M, H, out));
  }
  return Status::ok();
}

namespace {

Status check_device_matrix(const AnyTensor& t, std::string_view name, DType dtype, Index cols, Index* rows) {
  if (t.dtype != dtype) return invalid_argument(name, ": expected dtype ", to_string(dtype), ", got ", to_string(t.dtype));
  if (t.extents.size() != 2 || t.extents[1] != cols) {
    return invalid_argument(name, ": expected shape [M, ", cols, "], got ", detail::format_shape(t.extents));
  }
  if (!t.strides.empty() && !(t.strides.size() == 2 && t.strides[1] == 1 && t.strides[0] == cols)) {
    return invalid_argument(name, ": expected a contiguous tensor");
  }
  if (t.extents[0] > 0 && t.data == nullptr) return invalid_argument(name, ": null data");
  *rows = t.extents[0];
  return Status::ok();
}

}  // namespace

namespace {

// The checks of a forward's device tensors: M rows of H in the layer's dtype, ids and weights of
// M rows when given, the output not overlapping the input.
Status check_forward_tensors(const DeviceLayer::Impl& d, const AnyTensor& hidden, const AnyTensor& output,
                             const std::optional<AnyTensor>& topk_ids, const std::optional<AnyTensor>& topk_weights, Index* rows);

}  // namespace

Status DeviceLayer::forward(const AnyTensor& hidden, const AnyTensor& output, cudaStream_t stream,
                            const std::optional<AnyTensor>& topk_ids, const std::optional<AnyTensor>& topk_weights) const {
  const Impl& d = *impl_;
  if (d.all_to_all()) {
    return invalid_argument("forward: this layer's layout dispatches by all-to-all; call forward_all_to_all with its EP group");
  }
  Index M = 0;
  MOE_RETURN_IF_ERROR(check_forward_tensors(d, hidden, output, topk_ids, topk_weights, &M));
  const std::size_t elem = element_bytes(d.dtype);
  const auto* in_lo = static_cast<const std::byte*>(hidden.data);
  std::byte* base = static_cast<std::byte*>(d.workspace.get());
  for (Index m0 = 0; m0 < M; m0 += d.options.max_tokens) {
    const Index Mc = std::min(d.options.max_tokens, M - m0);
    const std::size_t row_off = static_cast<std::size_t>(m0) * d.H * elem;
    const void* x = in_lo + row_off;
    void* y = static_cast<std::byte*>(output.data) + row_off;
    switch (d.dtype) {
      case DType::kBF16: MOE_RETURN_IF_ERROR(d.forward_chunk(static_cast<const bfloat16*>(x), Mc, static_cast<bfloat16*>(y), base, stream)); break;
      case DType::kF16: MOE_RETURN_IF_ERROR(d.forward_chunk(static_cast<const half*>(x), Mc, static_cast<half*>(y), base, stream)); break;
      case DType::kF32: MOE_RETURN_IF_ERROR(d.forward_chunk(static_cast<const float*>(x), Mc, static_cast<float*>(y), base, stream)); break;
      default: return invalid_argument("dtype: ", to_string(d.dtype));
    }
    MOE_RETURN_IF_ERROR(d.copy_routing(base, m0, Mc, topk_ids, topk_weights, stream));
  }
  return Status::ok();
}

Status DeviceLayer::forward_all_to_all(cuda::NcclCommunicator& comm, const AnyTensor& hidden, const AnyTensor& output,
                                       cudaStream_t stream, const std::optional<AnyTensor>& topk_ids,
                                       const std::optional<AnyTensor>& topk_weights) const {
  const Impl& d = *impl_;
  if (!d.all_to_all()) {
    return invalid_argument("forward_all_to_all: this layer's layout dispatches by partial sums (ParallelLayout::dispatch); "
                            "call forward");
  }
  if (comm.size() != d.parallel.ep_size || comm.rank() != d.parallel.ep_rank) {
    return invalid_argument("forward_all_to_all: expected the group of the ", d.parallel.ep_size, " EP ranks with this layer as rank ",
                            d.parallel.ep_rank, ", got rank ", comm.rank(), " of ", comm.size());
  }
  Index M = 0;
  Status args = check_forward_tensors(d, hidden, output, topk_ids, topk_weights, &M);
  if (args.is_ok() && M > d.options.max_tokens) {
    args = invalid_argument("hidden_states: ", M, " tokens; the all-to-all takes at most options.max_tokens = ", d.options.max_tokens,
                            " per rank and call (every rank's blocks are sized by it)");
  }
  std::byte* base = static_cast<std::byte*>(d.workspace.get());
  if (!args.is_ok()) {
    // Refused here, but the peers' rows still come to this rank's experts: it takes part with no
    // tokens of its own, so no peer is left waiting in NCCL, and writes nothing of the caller's.
    const auto join_empty = [&]<class T>() { return d.forward_all_to_all<T>(comm, nullptr, 0, nullptr, base, stream); };
    const Status joined = d.dtype == DType::kBF16  ? join_empty.template operator()<bfloat16>()
                          : d.dtype == DType::kF16 ? join_empty.template operator()<half>()
                                                   : join_empty.template operator()<float>();
    (void)joined;  // the argument error is the one to report
    return args;
  }
  switch (d.dtype) {
    case DType::kBF16:
      MOE_RETURN_IF_ERROR(d.forward_all_to_all(comm, static_cast<const bfloat16*>(hidden.data), M, static_cast<bfloat16*>(output.data), base, stream));
      break;
    case DType::kF16:
      MOE_RETURN_IF_ERROR(d.forward_all_to_all(comm, static_cast<const half*>(hidden.data), M, static_cast<half*>(output.data), base, stream));
      break;
    case DType::kF32:
      MOE_RETURN_IF_ERROR(d.forward_all_to_all(comm, static_cast<const float*>(hidden.data), M, static_cast<float*>(output.data), base, stream));
      break;
    default: return invalid_argument("dtype: ", to_string(d.dtype));
  }
  return d.copy_routing(base, 0, M, topk_ids, topk_weights, stream);
}

namespace {

Status check_forward_tensors(const DeviceLayer::Impl& d, const AnyTensor& hidden, const AnyTensor& output,
                             const std::optional<AnyTensor>& topk_ids, const std::optional<AnyTensor>& topk_weights, Index* rows) {
  Index M = 0, Mo = 0;
  MOE_RETURN_IF_ERROR(check_device_matrix(hidden, "hidden_states", d.dtype, d.H, &M));
  MOE_RETURN_IF_ERROR(check_device_matrix(output, "output", d.dtype, d.H, &Mo));
  if (Mo != M) return invalid_argument("output: expected ", M, " rows (as hidden_states), got ", Mo);
  Index Mi = M, Mw = M;
  if (topk_ids) MOE_RETURN_IF_ERROR(check_device_matrix(*topk_ids, "topk_ids", DType::kI32, d.k, &Mi));
  if (topk_weights) MOE_RETURN_IF_ERROR(check_device_matrix(*topk_weights, "topk_weights", DType::kF32, d.k, &Mw));
  if (Mi != M || Mw != M) return invalid_argument("topk_ids/topk_weights: expected ", M, " rows (as hidden_states)");
  const std::size_t bytes = static_cast<std::size_t>(M) * d.H * element_bytes(d.dtype);
  const auto* in_lo = static_cast<const std::byte*>(hidden.data);
  const auto* out_lo = static_cast<const std::byte*>(output.data);
  if (M > 0 && in_lo < out_lo + bytes && out_lo < in_lo + bytes) {
    return invalid_argument("output: overlaps hidden_states (the layer reads the input after writing the output)");
  }
  *rows = M;
  return Status::ok();
}

}  // namespace

Status DeviceLayer::time_forward(Index tokens, int iterations, Timing* out) const {
  const Impl& d = *impl_;
  if (tokens < 1 || tokens > d.options.max_tokens) {
    return invalid_argument("tokens: expected 1..max_tokens=", d.options.max_tokens, ", got ", tokens);
  }
  if (iterations < 1) return invalid_argument("iterations: expected >= 1, got ", iterations);
  const std::size_t elem = element_bytes(d.dtype), n = static_cast<std::size_t>(tokens) * d.H;
  std::vector<std::byte> x(n * elem);
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  for (std::size_t i = 0; i < n; ++i) {  // N(0, 1) by Box-Muller on a xorshift stream
    const auto uniform = [&] {
      state ^= state << 13;
      state ^= state >> 7;
      state ^= state << 17;
      return (static_cast<double>(state >> 11) + 0.5) / 9007199254740992.0;
    };
    const float v = static_cast<float>(std::sqrt(-2.0 * std::log(uniform())) * std::cos(6.283185307179586 * uniform()));
    if (d.dtype == DType::kF32) std::memcpy(x.data() + i * 4, &v, 4);
    else if (d.dtype == DType::kBF16) reinterpret_cast<bfloat16*>(x.data())[i] = bfloat16(v);
    else reinterpret_cast<half*>(x.data())[i] = half(v);
  }
  constexpr std::size_t kFlushBytes = std::size_t{256} << 20;
  DeviceMemory dx, dy, di, dw, flush;
  MOE_RETURN_IF_ERROR(upload(x.data(), x.size(), &dx));
  MOE_RETURN_IF_ERROR(allocate(n * elem, &dy));
  MOE_RETURN_IF_ERROR(allocate(static_cast<std::size_t>(tokens) * d.k * 4, &di));
  MOE_RETURN_IF_ERROR(allocate(static_cast<std::size_t>(tokens) * d.k * 4, &dw));
  MOE_RETURN_IF_ERROR(allocate(kFlushBytes, &flush));
  const AnyTensor hidden{dx.get(), d.dtype, {tokens, d.H}, {}}, output{dy.get(), d.dtype, {tokens, d.H}, {}};
  const AnyTensor ids{di.get(), DType::kI32, {tokens, d.k}, {}}, weights{dw.get(), DType::kF32, {tokens, d.k}, {}};
  cudaStream_t stream;
  MOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraphExec_t layer_graph = nullptr, experts_graph = nullptr;
  std::byte* base = static_cast<std::byte*>(d.workspace.get());
  const auto experts_only = [&]() -> Status {  // the routing of the last forward, in the workspace
    const std::span<std::byte> experts_ws(base + d.ws.experts, d.ws.experts_bytes);
    std::byte* scratch = base + (d.combine() ? d.ws.routed_out : 0);
    void* y = d.combine() ? static_cast<void*>(scratch) : dy.get();
    return run_device_experts(d.routed_call(dx.get(), tokens, d.kernel_ids(base), reinterpret_cast<const float*>(base + d.ws.weights), y),
                              experts_ws, stream);
  };
  std::vector<std::int32_t> chosen(static_cast<std::size_t>(tokens) * d.k);
  const auto measure = [&]() -> Status {
    MOE_RETURN_IF_ERROR(capture(stream, [&] { return forward(hidden, output, stream, ids, weights); }, &layer_graph));
    MOE_RETURN_IF_ERROR(time_graph(layer_graph, stream, flush.get(), kFlushBytes, iterations, &out->layer_us));
    MOE_RETURN_IF_ERROR(capture(stream, experts_only, &experts_graph));
    MOE_RETURN_IF_ERROR(time_graph(experts_graph, stream, flush.get(), kFlushBytes, iterations, &out->experts_us));
    MOE_CUDA_TRY(cudaMemcpy(chosen.data(), di.get(), chosen.size() * 4, cudaMemcpyDeviceToHost));
    return Status::ok();
  };
  // EPLB: the timed replays route tokens too; the load the caller's forwards recorded is kept.
  std::vector<std::int64_t> load;
  if (d.num_physical > 0) MOE_RETURN_IF_ERROR(expert_load(&load));
  Status s = measure();
  if (d.num_physical > 0) {
    const cudaError_t restored = cudaMemcpy(d.expert_load.get(), load.data(), load.size() * 8, cudaMemcpyHostToDevice);
    if (s.is_ok() && restored != cudaSuccess) s = make_status(StatusCode::kCudaError, "expert_load restore: ", cudaGetErrorString(restored));
  }
  if (layer_graph) cudaGraphExecDestroy(layer_graph);
  if (experts_graph) cudaGraphExecDestroy(experts_graph);
  cudaStreamDestroy(stream);
  MOE_RETURN_IF_ERROR(s);
  std::vector<bool> hit(static_cast<std::size_t>(d.config.num_experts), false);
  for (std::int32_t id : chosen) {
    if (id >= 0 && id < d.config.num_experts) hit[static_cast<std::size_t>(id)] = true;
  }
  out->experts_hit = static_cast<Index>(std::count(hit.begin(), hit.end(), true));
  return Status::ok();
}

Status DeviceLayer::forward_host(const AnyTensor& hidden, MoeLayer::Result* out) const {
  const Impl& d = *impl_;
  if (hidden.extents.size() != 2 || hidden.extents[1] != d.H) {
    return invalid_argument("hidden_states: expected shape [M, H=", d.H, "], got ", detail::format_shape(hidden.extents));
  }
  if (hidden.dtype != DType::kF32 && hidden.dtype != DType::kBF16 && hidden.dtype != DType::kF16) {
    return invalid_argument("hidden_states: expected dtype f32, bf16 or f16, got ", to_string(hidden.dtype));
  }
  if (!hidden.strides.empty()) return invalid_argument("hidden_states: expected a contiguous tensor");
  const Index M = hidden.extents[0];
  const std::size_t elem = element_bytes(d.dtype), n = static_cast<std::size_t>(M) * d.H;
  // The input in the layer's dtype (element reads through memcpy: the file may misalign it).
  std::vector<std::byte> x(n * elem);
  const std::size_t in_elem = element_bytes(hidden.dtype);
  for (std::size_t i = 0; i < n; ++i) {
    float v;
    if (hidden.dtype == DType::kF32) {
      std::memcpy(&v, static_cast<const std::byte*>(hidden.data) + i * 4, 4);
    } else {
      std::uint16_t b;
      std::memcpy(&b, static_cast<const std::byte*>(hidden.data) + i * in_elem, 2);
      v = hidden.dtype == DType::kBF16 ? bfloat16::to_float(b) : half::to_float(b);
    }
    if (d.dtype == DType::kF32) std::memcpy(x.data() + i * 4, &v, 4);
    else if (d.dtype == DType::kBF16) reinterpret_cast<bfloat16*>(x.data())[i] = bfloat16(v);
    else reinterpret_cast<half*>(x.data())[i] = half(v);
  }
  MoeLayer::Result r;
  r.output.dtype = d.dtype;
  r.output.shape = {M, d.H};
  r.output.bytes.resize(n * elem);
  r.topk_ids.resize(static_cast<std::size_t>(M) * d.k);
  r.topk_weights.resize(static_cast<std::size_t>(M) * d.k);
  DeviceMemory dx, dy, di, dw;
  MOE_RETURN_IF_ERROR(upload(x.data(), x.size(), &dx));
  MOE_RETURN_IF_ERROR(allocate(n * elem, &dy));
  MOE_RETURN_IF_ERROR(allocate(r.topk_ids.size() * 4, &di));
  MOE_RETURN_IF_ERROR(allocate(r.topk_weights.size() * 4, &dw));
  MOE_RETURN_IF_ERROR(forward(AnyTensor{dx.get(), d.dtype, {M, d.H}, {}}, AnyTensor{dy.get(), d.dtype, {M, d.H}, {}},
                              nullptr, AnyTensor{di.get(), DType::kI32, {M, d.k}, {}},
                              AnyTensor{dw.get(), DType::kF32, {M, d.k}, {}}));
  MOE_CUDA_TRY(cudaStreamSynchronize(nullptr));
  MOE_CUDA_TRY(cudaMemcpy(r.output.bytes.data(), dy.get(), r.output.bytes.size(), cudaMemcpyDeviceToHost));
  MOE_CUDA_TRY(cudaMemcpy(r.topk_ids.data(), di.get(), r.topk_ids.size() * 4, cudaMemcpyDeviceToHost));
  MOE_CUDA_TRY(cudaMemcpy(r.topk_weights.data(), dw.get(), r.topk_weights.size() * 4, cudaMemcpyDeviceToHost));
  *out = std::move(r);
  return Status::ok();
}

}  // namespace moe::layer
