// bf16 forward of the CUDA backend on the anchors' workload (../shared/reference/perf-anchors.md):
// four model shapes x M in {1, 8, 64, 256, 1024, 4096, 16384}, and the two ceilings the roofline
// uses, measured in the same binary.
//
// Workload: bf16 hidden [M, H]; w13 [E, 2I, H]; w2 [E, H, I]; top-k ids drawn uniformly without
// replacement per token; positive normalized weights (routing::Precomputed: routing itself is not
// timed, everything after it is). Median of CUDA-event timings with a 256 MiB L2 flush before each
// repetition. bf16_forward_graph captures the forward once in a CUDA graph and replays it (as the
// anchors were timed); bf16_forward launches eagerly.
//
// Counters per row, as perf-anchors.md defines them:
//   FLOPs = 6*M*k*H*I; bytes = distinct experts hit*3*H*I*2 + 2*M*H*2;
//   floor = max(FLOPs / gemm ceiling, bytes / copy ceiling); SOL% = floor / time.
// Ceilings: ceiling/copy (device-to-device copy of 2 GiB, bytes read + written) and ceiling/gemm
// (dense bf16 8192^3 through cuBLAS, loaded at run time: libcublas.so.13 from the toolkit or
// PyTorch's wheel). Run the ceilings first (they are registered first); rows use the values measured
// in the same process, else the anchors' (4245 GB/s, 673 TFLOP/s).
//
// Flags (before Google Benchmark's): --tune_tiles also registers every Hopper tile for every row
// (bf16_tile/<tile>/<shape>/<M>), the run that regenerates the table in moe/cuda/gemm/schedule.h;
// --ab_launch runs only bf16_ab_launch/<shape>/<M>: the programmatic launch modes of
// cuda::Options, interleaved on the same allocations (counters us_every, us_fused_swap_only, us_off);
// --ab_prefill_tiles runs only bf16_ab_prefill_tiles/<shape>/<M> for M >= 1024: the Hopper
// prefill tiles (schedule.h), interleaved on the same allocations (counters us_<tile name>); with
// --quantized also fp8_per_tensor_ab_prefill_tiles/<shape>/<M> for M >= 256, the FP8 per-tensor
// GEMM's two tiles (gemm/sm90_fp8_gemm.h: us_normal_128x256x64 runs its cooperative tile,
// us_pingpong_64x256x64 its ping-pong tile);
// --ab_decode_tiles runs only bf16_ab_decode_tiles/<shape>/<M> for M <= 256: the table's choice
// (counter us_table) and the swap tiles pinned, on the same allocations (us_<tile name>).
// --ab_splits runs only bf16_ab_splits/<shape>/<M> for M <= 256: the fused swap GEMMs' split-K
// chosen on the device against none (counters us_device_choice, us_nosplit).
// --interleaved adds bf16_interleaved_forward_graph: the same SiluAndMul layer with w13's gate and
// up rows interleaved (moe::InterleavedGateUp).
// --fresh_weights allocates the expert weights per row instead of once per shape (see weights_of).
// --quantized adds the W8A8 rows beside bf16 (issue: FP8/INT8): fp8_block_forward_graph (DeepSeek's
// 128x128 block scales, 1x128 dynamic activation groups) and fp8_per_tensor_forward_graph (static
// scales), same workload with random codes; their bytes count one byte per weight.
// --weight_only adds w4a16_g128_forward_graph (issue: weight-only INT4): 4-bit codes packed two per
// byte, two's complement, with a float scale per 128 K (no zero points); bytes count half a byte per
// weight plus the scales; counters us_registers, us_wgmma and us_swap time the weight-only GEMMs forced,
// interleaved with the default choice (moe::cuda::WeightOnlyGemm), us_wgmma_offset the wgmma GEMM
// on the same bytes read as offset codes; and for the gpt-oss shape mxfp4_forward_graph (E2M1 codes, an
// E8M0 byte per 32 K; SiluAndMul as every other row) and mxfp4_swigluoai_forward_graph (gpt-oss's own
// layer: interleaved gate/up rows, swigluoai, expert biases), each with us_registers.
// --weight_only_default: the same rows with the default GEMM choice alone (no forced variants
// timed beside it: a much slower variant in the same row lets the clocks recover and flatters it).
#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "moe/cuda/cublas_runtime.h"
#include "moe/cuda/kernel.cuh"
#include "moe/quant/none.h"
#include "moe/quant/w8a8.h"
#include "moe/quant/mxfp4.h"
#include "moe/quant/weight_only.h"

namespace {

struct Shape {
  const char* name;
  moe::Index E, H, I;
  int top_k;
};
constexpr Shape kShapes[] = {{"qwen3_30b_a3b", 128, 2048, 768, 8},
                             {"gpt_oss_120b", 128, 2880, 2880, 4},
                             {"mixtral_8x7b", 8, 4096, 14336, 2},
                             {"deepseek_v3", 256, 7168, 2048, 8}};
constexpr moe::Index kTokens[] = {1, 8, 64, 256, 1024, 4096, 16384};

double g_copy_gbps = 4245.0;   // replaced by ceiling/copy when it runs first
double g_gemm_tflops = 673.0;  // replaced by ceiling/gemm

void cuda_ok(cudaError_t e) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(e));
    std::exit(1);
  }
}

__global__ void fill_random(moe::bfloat16* p, std::size_t n, float scale, std::uint64_t seed) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    std::uint64_t z = (i + 1) * 0x9e3779b97f4a7c15ull + seed;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    p[i] = moe::bfloat16((static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f) * scale);
  }
}

// Random 8-bit codes: FP8 E4M3 of magnitude below 2 (no NaN code), or INT8 in [-64, 64].
template <class W>
__global__ void fill_codes(W* p, std::size_t n, std::uint64_t seed) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    std::uint64_t z = (i + 1) * 0x9e3779b97f4a7c15ull + seed;
    z = (z ^ (z >> 31)) * 0xbf58476d1ce4e5b9ull;
    z ^= z >> 29;
    const auto byte = static_cast<std::uint8_t>(z >> 32);
    if constexpr (std::is_same_v<W, moe::float8_e4m3>) p[i] = moe::float8_e4m3::from_bits((byte & 0x80) | (byte % 0x40));
    else if constexpr (std::is_same_v<W, std::uint8_t>) p[i] = byte;  // any byte: two 4-bit codes
    else p[i] = static_cast<std::int8_t>(static_cast<int>(byte % 129) - 64);
  }
}

template <class T>
T* device_alloc(std::size_t n) {
  void* p = nullptr;
  cuda_ok(cudaMalloc(&p, std::max<std::size_t>(1, n) * sizeof(T)));
  return static_cast<T*>(p);
}

// Median event timing of each of `bodies`, in seconds. Each repetition runs every body in turn,
// each after an L2 flush, so variants compared in one row see the same allocations and the same
// machine state; the benchmark's iteration time is the first body's.
template <class F>
std::vector<double> median_seconds(benchmark::State& state, cudaStream_t stream, const std::vector<F>& bodies) {
  const std::size_t flush_bytes = 256u << 20;
  auto* flush = device_alloc<std::byte>(flush_bytes);
  cudaEvent_t start, stop;
  cuda_ok(cudaEventCreate(&start));
  cuda_ok(cudaEventCreate(&stop));
  for (const F& body : bodies) body();  // warm-up
  cuda_ok(cudaStreamSynchronize(stream));
  std::vector<std::vector<float>> times(bodies.size());
  for (auto _ : state) {
    for (std::size_t v = 0; v < bodies.size(); ++v) {
      cuda_ok(cudaMemsetAsync(flush, 0, flush_bytes, stream));
      cuda_ok(cudaEventRecord(start, stream));
      bodies[v]();
      cuda_ok(cudaEventRecord(stop, stream));
      cuda_ok(cudaEventSynchronize(stop));
      float ms = 0;
      cuda_ok(cudaEventElapsedTime(&ms, start, stop));
      if (v == 0) state.SetIterationTime(ms * 1e-3);
      times[v].push_back(ms);
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(flush);
  std::vector<double> medians;
  for (std::vector<float>& t : times) {
    std::sort(t.begin(), t.end());
    medians.push_back(t[t.size() / 2] * 1e-3);
  }
  return medians;
}

template <class F>
double median_seconds(benchmark::State& state, cudaStream_t stream, F body) {
  return median_seconds(state, stream, std::vector<F>{std::move(body)})[0];
}

// ---- ceilings ------------------------------------------------------------------------------------

void CeilingCopy(benchmark::State& state) {
  const std::size_t bytes = std::size_t{2} << 30;
  auto* src = device_alloc<std::byte>(bytes);
  auto* dst = device_alloc<std::byte>(bytes);
  cuda_ok(cudaMemset(src, 1, bytes));
  cudaStream_t stream;
  cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const double s = median_seconds(state, stream, [&] { cuda_ok(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream)); });
  g_copy_gbps = 2.0 * bytes / s * 1e-9;
  state.counters["us"] = s * 1e6;
  state.counters["GB/s"] = g_copy_gbps;
  cudaFree(src);
  cudaFree(dst);
  cudaStreamDestroy(stream);
}

void CeilingGemm(benchmark::State& state) {
  const moe::cuda::CublasRuntime& blas = moe::cuda::CublasRuntime::get();
  if (!blas.available()) {
    state.SkipWithError("libcublas.so.13 not found (add its folder to LD_LIBRARY_PATH)");
    return;
  }
  const int n = 8192;
  const std::size_t elems = std::size_t{n} * n;
  auto* a = device_alloc<moe::bfloat16>(elems);
  auto* b = device_alloc<moe::bfloat16>(elems);
  auto* c = device_alloc<moe::bfloat16>(elems);
  fill_random<<<1024, 256>>>(a, elems, 1.0f, 11);
  fill_random<<<1024, 256>>>(b, elems, 1.0f, 12);
  cuda_ok(cudaGetLastError());
  cudaStream_t stream;
  cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasHandle_t handle;
  if (blas.create(&handle) != CUBLAS_STATUS_SUCCESS || blas.set_stream(handle, stream) != CUBLAS_STATUS_SUCCESS) {
    state.SkipWithError("cublasCreate failed");
    return;
  }
  const float one = 1.0f, zero = 0.0f;
  const double s = median_seconds(state, stream, [&] {
    if (blas.gemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, a, CUDA_R_16BF, n, b, CUDA_R_16BF, n, &zero, c,
                  CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
      std::fprintf(stderr, "cublasGemmEx failed\n");
      std::exit(1);
    }
  });
  g_gemm_tflops = 2.0 * n * double(n) * n / s * 1e-12;
  state.counters["us"] = s * 1e6;
  state.counters["TFLOP/s"] = g_gemm_tflops;
  blas.destroy(handle);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  cudaStreamDestroy(stream);
}

// ---- the forward ---------------------------------------------------------------------------------

// The expert weights of one shape, allocated and filled when a row of another shape asks for them
// and kept for every row of the same shape, as a serving process loads them once. Allocating
// 3-22 GB per row instead (--fresh_weights, the tables before 2026-12-02 afternoon) puts rows in a
// fast or a slow state by where the allocator placed them (benchmarks/NOTES.md).
bool g_fresh_weights = false;
bool g_weight_only_default = false;  // --weight_only_default
struct ShapeWeights {
  const char* shape = nullptr;
  std::size_t element_bytes = 0;
  void* w13 = nullptr;
  void* w2 = nullptr;
  void release() {
    cudaFree(w13);
    cudaFree(w2);
    *this = ShapeWeights{};
  }
};
ShapeWeights g_weights;

// The weights of shape `s` stored as W (bf16, or the 8-bit codes of a W8A8 scheme).
template <class W>
const ShapeWeights& weights_of(const Shape& s) {
  if (g_weights.shape == s.name && g_weights.element_bytes == sizeof(W) && !g_fresh_weights) return g_weights;
  g_weights.release();
  const std::size_t n13 = s.E * 2 * s.I * s.H, n2 = s.E * s.H * s.I;
  g_weights.shape = s.name;
  g_weights.element_bytes = sizeof(W);
  W* w13 = device_alloc<W>(n13);
  W* w2 = device_alloc<W>(n2);
  if constexpr (std::is_same_v<W, moe::bfloat16>) {
    fill_random<<<1024, 256>>>(w13, n13, 0.02f, 1);
    fill_random<<<1024, 256>>>(w2, n2, 0.02f, 2);
  } else {
    fill_codes<<<1024, 256>>>(w13, n13, 1);
    fill_codes<<<1024, 256>>>(w2, n2, 2);
  }
  cuda_ok(cudaGetLastError());
  g_weights.w13 = w13;
  g_weights.w2 = w2;
  return g_weights;
}

template <class Q, class Activation = moe::SiluAndMul>
using SpecOf = moe::Spec<moe::routing::Precomputed, moe::StandardPrepareFinalize<>,
                         moe::Experts<Activation, Q, moe::bfloat16>>;

// A W8A8 scheme's scale tensors for shape `s` (constant values: the time does not depend on them).
template <class Q>
struct Scales {
  std::vector<void*> owned;
  typename Q::template Arguments<moe::DeviceSpace> args;
  explicit Scales(const Shape& s) {
    if constexpr (std::is_same_v<Q, moe::quant::Mxfp4>) {  // E8M0 2^-7
      for (auto [view, n, k] : {std::tuple{&args.w13_scale, 2 * s.I, s.H}, std::tuple{&args.w2_scale, s.H, s.I}}) {
        const std::size_t count = static_cast<std::size_t>(s.E * n * (k / 32));
        std::uint8_t* d = device_alloc<std::uint8_t>(count);
        cuda_ok(cudaMemset(d, 120, count));
        owned.push_back(d);
        *view = moe::DeviceView<const std::uint8_t, 3>(d, {s.E, n, k / 32});
      }
      return;
    } else {
    const auto tensor = [&](std::array<moe::Index, 3> shape, float value) {
      std::vector<float> host(static_cast<std::size_t>(shape[0] * shape[1] * shape[2]), value);
      float* d = device_alloc<float>(host.size());
      cuda_ok(cudaMemcpy(d, host.data(), host.size() * 4, cudaMemcpyHostToDevice));
      owned.push_back(d);
      return moe::DeviceView<const float, 3>(d, shape);
    };
    if constexpr (moe::quant::weight_only_v<Q>) {
      args.group_size = 128;
      args.signed_codes = true;  // two's complement, as the layer stores a checkpoint without zero points
      args.w13_scale = tensor({s.E, 2 * s.I, Q::groups(s.H, 128)}, 1e-3f);
      args.w2_scale = tensor({s.E, s.H, Q::groups(s.I, 128)}, 1e-3f);
    } else if constexpr (Q::kQuantized) {
      args.w13_scale = tensor(Q::weight_scale_shape(s.E, 2 * s.I, s.H, s.I), 1e-3f);
      args.w2_scale = tensor(Q::weight_scale_shape(s.E, s.H, s.I), 1e-3f);
      if constexpr (Q::kStaticActivations) {
        args.a13_scale = moe::DeviceView<const float, 1>(tensor({1, 1, 1}, 0.01f).data(), {1});
        args.a2_scale = moe::DeviceView<const float, 1>(tensor({1, 1, 1}, 0.01f).data(), {1});
      }
    }
    }
  }
  ~Scales() {
    for (void* p : owned) cudaFree(p);
  }
};

// A forward configuration compared in one row (see Forward).
struct Variant {
  std::string label;
  moe::cuda::Options options;
  bool offset_codes = false;  // weight-only integer rows: the codes read as offset codes (quant.signed_codes off)
};

// The forward of one shape at M tokens. With several variants (the --ab rows), each is captured in
// its own graph over the same weights, inputs and workspace and timed interleaved with the others:
// counter "us" is the first variant, "us_<label>" every variant.
// Activation: SiluAndMul ([gate; up] rows, no biases) for every row but gpt-oss's own, SwigluOai
// (interleaved gate and up rows, expert biases on both GEMMs).
template <class Q, class Activation = moe::SiluAndMul>
void Forward(benchmark::State& state, Shape s, moe::Index M, bool graph, std::vector<Variant> variants) {
  using W = typename Q::WeightElement;
  using Kernel = moe::Kernel<SpecOf<Q, Activation>, moe::cuda::Sm90>;
  constexpr bool kBiased = std::is_same_v<Activation, moe::SwigluOai>;
  const ShapeWeights& weights = weights_of<W>(s);
  const Scales<Q> scales(s);
  auto* hidden = device_alloc<moe::bfloat16>(M * s.H);
  auto* out = device_alloc<moe::bfloat16>(M * s.H);
  fill_random<<<1024, 256>>>(hidden, M * s.H, 1.0f, 3);
  cuda_ok(cudaGetLastError());
  std::mt19937 gen(4);
  std::vector<std::int32_t> ids(M * s.top_k);
  std::vector<float> w(M * s.top_k);
  std::vector<int> perm(s.E);
  std::set<int> hit;
  for (moe::Index m = 0; m < M; ++m) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), gen);
    float sum = 0;
    for (int j = 0; j < s.top_k; ++j) {
      ids[m * s.top_k + j] = perm[j];
      hit.insert(perm[j]);
      sum += (w[m * s.top_k + j] = std::uniform_real_distribution<float>(0.1f, 1.0f)(gen));
    }
    for (int j = 0; j < s.top_k; ++j) w[m * s.top_k + j] /= sum;
  }
  auto* d_ids = device_alloc<std::int32_t>(ids.size());
  auto* d_w = device_alloc<float>(w.size());
  cuda_ok(cudaMemcpy(d_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
  cuda_ok(cudaMemcpy(d_w, w.data(), w.size() * 4, cudaMemcpyHostToDevice));

  typename Kernel::Arguments a;
  a.hidden_states = moe::DeviceView<const moe::bfloat16, 2>(hidden, {M, s.H});
  a.topk_ids = moe::DeviceView<const std::int32_t, 2>(d_ids, {M, s.top_k});
  a.topk_weights = moe::DeviceView<const float, 2>(d_w, {M, s.top_k});
  a.top_k = s.top_k;
  constexpr moe::Index kPack = moe::quant::weight_pack_v<Q>;  // codes per stored element
  a.w13 = moe::DeviceView<const W, 3>(static_cast<const W*>(weights.w13), {s.E, 2 * s.I, s.H / kPack});
  a.w2 = moe::DeviceView<const W, 3>(static_cast<const W*>(weights.w2), {s.E, s.H, s.I / kPack});
  a.quant = scales.args;
  a.output = moe::DeviceView<moe::bfloat16, 2>(out, {M, s.H});
  moe::bfloat16* biases = nullptr;
  if constexpr (kBiased) {
    biases = device_alloc<moe::bfloat16>(s.E * (2 * s.I + s.H));
    fill_random<<<1024, 256>>>(biases, s.E * (2 * s.I + s.H), 0.1f, 5);
    cuda_ok(cudaGetLastError());
    a.w13_bias = moe::DeviceView<const moe::bfloat16, 2>(biases, {s.E, 2 * s.I});
    a.w2_bias = moe::DeviceView<const moe::bfloat16, 2>(biases + s.E * 2 * s.I, {s.E, s.H});
  }
  std::vector<Kernel> kernels;
  std::vector<typename Kernel::Arguments> args(variants.size(), a);
  std::size_t ws_bytes = 0;
  for (std::size_t v = 0; v < variants.size(); ++v) {
    if constexpr (requires { args[v].quant.signed_codes; }) {
      if (variants[v].offset_codes) args[v].quant.signed_codes = false;
    }
    kernels.emplace_back(variants[v].options);
    ws_bytes = std::max(ws_bytes, kernels.back().workspace_bytes(args[v]));
  }
  auto* ws = device_alloc<std::byte>(ws_bytes);
  const std::span<std::byte> workspace(ws, ws_bytes);
  cudaStream_t stream;
  cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::vector<cudaGraphExec_t> execs;
  if (graph) {
    for (std::size_t v = 0; v < kernels.size(); ++v) {
      cudaGraph_t g;
      cudaGraphExec_t exec;
      cuda_ok(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
      moe::check(kernels[v].run(args[v], workspace, stream));
      cuda_ok(cudaStreamEndCapture(stream, &g));
      cuda_ok(cudaGraphInstantiate(&exec, g, 0));
      cuda_ok(cudaGraphDestroy(g));
      execs.push_back(exec);
    }
  }
  std::vector<std::function<void()>> bodies;
  for (std::size_t v = 0; v < kernels.size(); ++v) {
    bodies.push_back([&, v] {
      if (graph) cuda_ok(cudaGraphLaunch(execs[v], stream));
      else moe::check(kernels[v].run(args[v], workspace, stream));
    });
  }
  const std::vector<double> medians = median_seconds(state, stream, bodies);
  const double median_s = medians[0];
  if (variants.size() > 1) {
    for (std::size_t v = 0; v < variants.size(); ++v) state.counters["us_" + variants[v].label] = medians[v] * 1e6;
  }
  const double flops = 6.0 * M * s.top_k * s.H * s.I;
  double weight_bytes = 3.0 * s.H * s.I * sizeof(W) / kPack;  // per expert hit
  if constexpr (std::is_same_v<Q, moe::quant::Mxfp4>) weight_bytes += 3.0 * s.H * s.I / 32;
  else if constexpr (moe::quant::weight_only_v<Q>) weight_bytes += 3.0 * s.H * Q::groups(s.I, 128) * sizeof(float);
  const double bytes = static_cast<double>(hit.size()) * weight_bytes + 2.0 * M * s.H * 2;
  const double floor_s = std::max(flops / (g_gemm_tflops * 1e12), bytes / (g_copy_gbps * 1e9));
  state.counters["us"] = median_s * 1e6;
  state.counters["TFLOP/s"] = flops / median_s * 1e-12;
  state.counters["GB/s"] = bytes / median_s * 1e-9;
  state.counters["floor_us"] = floor_s * 1e6;
  state.counters["SOL%"] = 100.0 * floor_s / median_s;
  for (void* p : {static_cast<void*>(hidden), static_cast<void*>(out), static_cast<void*>(d_ids), static_cast<void*>(d_w),
                  static_cast<void*>(ws), static_cast<void*>(biases)}) {
    cudaFree(p);
  }
  for (cudaGraphExec_t exec : execs) cudaGraphExecDestroy(exec);
  cudaStreamDestroy(stream);
}

template <class Q = moe::quant::BF16, class Activation = moe::SiluAndMul>
void register_row(const std::string& name, Shape s, moe::Index M, bool graph, std::vector<Variant> variants,
                  int iterations) {
  benchmark::RegisterBenchmark(name.c_str(), Forward<Q, Activation>, s, M, graph, std::move(variants))
      ->UseManualTime()->Iterations(iterations)->Unit(benchmark::kMicrosecond);
}

void register_all(bool tune, bool ab_launch, bool ab_splits, bool ab_prefill_tiles, bool ab_decode_tiles, bool quantized,
                  bool weight_only, bool interleaved) {
  benchmark::RegisterBenchmark("ceiling/copy_2GiB", CeilingCopy)->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("ceiling/gemm_bf16_8192", CeilingGemm)->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
  const auto row_name = [](const char* family, const Shape& s, moe::Index M) {
    return std::string(family) + "/" + s.name + "/" + std::to_string(M);
  };
  if (ab_splits) {  // only the A/B of split-K, same allocations per row
    std::vector<Variant> modes(2);
    modes[0].label = "device_choice";
    modes[1].label = "nosplit";
    modes[1].options.max_k_splits = 1;
    for (const Shape& s : kShapes) {
      for (const moe::Index M : kTokens) {
        if (M <= 256) register_row(row_name("bf16_ab_splits", s, M), s, M, true, modes, 21);
      }
    }
    return;
  }
  // Rows of `family` for the M that `keep` selects, each timing `tiles` pinned (counters
  // us_<tile name>) after `first` variants, interleaved on the same allocations.
  using moe::cuda::gemm::Sm90Tile;
  const auto with_pinned_tiles = [](std::vector<Variant> modes, std::initializer_list<Sm90Tile> tiles) {
    for (const Sm90Tile t : tiles) {
      Variant v;
      v.label = moe::cuda::gemm::name(t);
      v.options.sm90_tile = t;
      modes.push_back(v);
    }
    return modes;
  };
  const auto register_tile_ab = [&](const char* family, const std::vector<Variant>& first,
                                    std::initializer_list<Sm90Tile> tiles, auto keep, int iterations) {
    const std::vector<Variant> modes = with_pinned_tiles(first, tiles);
    for (const Shape& s : kShapes) {
      for (const moe::Index M : kTokens) {
        if (keep(M)) register_row(row_name(family, s, M), s, M, true, modes, iterations);
      }
    }
  };
  if (ab_prefill_tiles) {  // only the prefill tiles (M >= 1024)
    register_tile_ab("bf16_ab_prefill_tiles", {},
                     {Sm90Tile::kNormal128x256, Sm90Tile::kPingpong128x128, Sm90Tile::kPingpong64x256},
                     [](moe::Index M) { return M >= 1024; }, 11);
    if (quantized) {  // the FP8 per-tensor GEMM's two tiles (a pinned prefill tile picks the nearest)
      const std::vector<Variant> fp8_tiles = with_pinned_tiles({}, {Sm90Tile::kNormal128x256, Sm90Tile::kPingpong64x256});
      for (const Shape& s : kShapes) {
        for (const moe::Index M : kTokens) {
          if (M >= 256) {
            register_row<moe::quant::Fp8PerTensor>(row_name("fp8_per_tensor_ab_prefill_tiles", s, M), s, M, true,
                                                   fp8_tiles, 11);
          }
        }
      }
    }
    return;
  }
  if (ab_decode_tiles) {  // only the swap tiles (M <= 256), after the table's choice (us_table)
    std::vector<Variant> table(1);
    table[0].label = "table";
    register_tile_ab("bf16_ab_decode_tiles", table,
                     {Sm90Tile::kFusedSwap128x16, Sm90Tile::kSwap128x32, Sm90Tile::kFusedSwap128x32,
                      Sm90Tile::kFusedSwap128x64},
                     [](moe::Index M) { return M <= 256; }, 15);
    return;
  }
  if (ab_launch) {  // only the A/B of the programmatic launch modes, same allocations per row
    using moe::cuda::ProgrammaticLaunch;
    std::vector<Variant> modes(3);
    modes[0].label = "every";
    modes[1].label = "fused_swap_only";
    modes[1].options.programmatic_launch = ProgrammaticLaunch::kFusedSwapOnly;
    modes[2].label = "off";
    modes[2].options.programmatic_launch = ProgrammaticLaunch::kOff;
    for (const Shape& s : kShapes) {
      for (const moe::Index M : kTokens) register_row(row_name("bf16_ab_launch", s, M), s, M, true, modes, 15);
    }
    return;
  }
  for (const bool graph : {true, false}) {
    for (const Shape& s : kShapes) {
      for (const moe::Index M : kTokens) {
        register_row(row_name(graph ? "bf16_forward_graph" : "bf16_forward", s, M), s, M, graph, {Variant{}}, 20);
      }
    }
  }
  if (interleaved) {
    // w13 rows interleaved (moe::InterleavedGateUp: the same SiluAndMul layer, its rows permuted at
    // load), beside bf16_forward_graph's [gate; up] rows.
    for (const Shape& s : kShapes) {
      for (const moe::Index M : kTokens) {
        register_row<moe::quant::BF16, moe::InterleavedGateUp<moe::SiluAndMul>>(
            row_name("bf16_interleaved_forward_graph", s, M), s, M, true, {Variant{}}, 20);
      }
    }
  }
  if (quantized) {  // after bf16: each shape's codes are allocated once for both schemes
    for (const Shape& s : kShapes) {
      for (const moe::Index M : kTokens) {
        register_row<moe::quant::Fp8Block<128, 128>>(row_name("fp8_block_forward_graph", s, M), s, M, true, {Variant{}}, 20);
        register_row<moe::quant::Fp8PerTensor>(row_name("fp8_per_tensor_forward_graph", s, M), s, M, true, {Variant{}}, 20);
      }
    }
  }
  if (weight_only) {
    // W4A16: the default GEMM choice, then each GEMM forced (counters us_registers, us_wgmma,
    // us_swap), and the wgmma GEMM on offset codes (us_wgmma_offset: its fp32 scale-and-zero
    // conversion).
    using moe::cuda::WeightOnlyGemm;
    std::vector<Variant> gemms(5);
    gemms[0].label = "auto";
    gemms[1].label = "registers";
    gemms[1].options.weight_only_gemm = WeightOnlyGemm::kRegisters;
    gemms[2].label = "wgmma";
    gemms[2].options.weight_only_gemm = WeightOnlyGemm::kMixedInputWgmma;
    gemms[3] = gemms[2];
    gemms[3].label = "wgmma_offset";
    gemms[3].offset_codes = true;
    gemms[4].label = "swap";
    gemms[4].options.weight_only_gemm = WeightOnlyGemm::kSwapWgmma;
    if (g_weight_only_default) gemms.resize(1);
    const std::vector<Variant> mxfp4_gemms(gemms.begin(), gemms.begin() + std::min<std::size_t>(2, gemms.size()));
    for (const Shape& s : kShapes) {
      for (const moe::Index M : kTokens) {
        register_row<moe::quant::W4A16>(row_name("w4a16_g128_forward_graph", s, M), s, M, true, gemms, 20);
        if (std::string(s.name) == "gpt_oss_120b") {
          register_row<moe::quant::Mxfp4>(row_name("mxfp4_forward_graph", s, M), s, M, true, mxfp4_gemms, 20);
          // gpt-oss's own layer: interleaved gate/up rows, swigluoai, expert biases.
          register_row<moe::quant::Mxfp4, moe::SwigluOai>(row_name("mxfp4_swigluoai_forward_graph", s, M), s, M, true,
                                                          mxfp4_gemms, 20);
        }
      }
    }
  }
  if (!tune) return;
  Variant no_split{"nosplit", {}};
  no_split.options.max_k_splits = 1;
  for (const Shape& s : kShapes) {  // table tiles, one option changed
    for (const moe::Index M : kTokens) register_row(row_name("bf16_nosplit", s, M), s, M, true, {no_split}, 10);
  }
  for (const Sm90Tile t : {Sm90Tile::kNormal128x256, Sm90Tile::kPingpong128x128, Sm90Tile::kPingpong64x256,
                           Sm90Tile::kSwap128x64,
                           Sm90Tile::kSwap128x32, Sm90Tile::kSwap128x16, Sm90Tile::kFusedSwap128x64,
                           Sm90Tile::kFusedSwap128x32, Sm90Tile::kFusedSwap128x16}) {
    Variant pinned;
    pinned.options.sm90_tile = t;
    for (const Shape& s : kShapes) {
      for (const moe::Index M : kTokens) {
        register_row(std::string("bf16_tile/") + moe::cuda::gemm::name(t) + "/" + s.name + "/" + std::to_string(M), s, M,
                     true, {pinned}, 10);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool tune = false, ab_launch = false, ab_splits = false, ab_prefill_tiles = false, ab_decode_tiles = false,
       quantized = false, weight_only = false, interleaved = false;
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--tune_tiles") == 0) tune = true;
    else if (std::strcmp(argv[i], "--ab_launch") == 0) ab_launch = true;
    else if (std::strcmp(argv[i], "--ab_splits") == 0) ab_splits = true;
    else if (std::strcmp(argv[i], "--ab_prefill_tiles") == 0) ab_prefill_tiles = true;
    else if (std::strcmp(argv[i], "--ab_decode_tiles") == 0) ab_decode_tiles = true;
    else if (std::strcmp(argv[i], "--fresh_weights") == 0) g_fresh_weights = true;
    else if (std::strcmp(argv[i], "--quantized") == 0) quantized = true;
    else if (std::strcmp(argv[i], "--weight_only") == 0) weight_only = true;
    else if (std::strcmp(argv[i], "--weight_only_default") == 0) weight_only = g_weight_only_default = true;
    else if (std::strcmp(argv[i], "--interleaved") == 0) interleaved = true;
    else rest.push_back(argv[i]);
  }
  int n = static_cast<int>(rest.size());
  register_all(tune, ab_launch, ab_splits, ab_prefill_tiles, ab_decode_tiles, quantized, weight_only, interleaved);
  benchmark::Initialize(&n, rest.data());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
