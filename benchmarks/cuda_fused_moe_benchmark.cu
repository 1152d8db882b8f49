// bf16 forward of the CUDA backend for the four model shapes of reference/perf-anchors.md.
//
// Workload as in the anchors: bf16 hidden [M, H]; w13 [E, 2I, H]; w2 [E, H, I]; top-k ids drawn
// uniformly without replacement per token; positive normalized weights (routing::Precomputed, so
// routing itself is not timed); everything after it is. Median of CUDA-event timings over
// repetitions after a warm-up, with a 256 MiB L2 flush before each repetition. Two variants:
// bf16_forward (eager launches on a stream) and bf16_forward_graph (the forward captured once in a
// CUDA graph and replayed, as the anchors in reference/perf-anchors.md were timed).
// Counters: us (median), TFLOP/s (6*M*k*H*I), weight GB/s (distinct experts hit * 3*H*I*2 bytes).
#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "moe/cuda/kernel.cuh"
#include "moe/quant/none.h"

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

template <class T>
T* device_alloc(std::size_t n) {
  void* p = nullptr;
  cuda_ok(cudaMalloc(&p, std::max<std::size_t>(1, n) * sizeof(T)));
  return static_cast<T*>(p);
}

using Spec = moe::Spec<moe::routing::Precomputed, moe::StandardPrepareFinalize<>,
                       moe::Experts<moe::SiluAndMul, moe::quant::BF16>>;
using Kernel = moe::Kernel<Spec, moe::cuda::Sm90>;

void Forward(benchmark::State& state, Shape s, bool graph) {
  const moe::Index M = state.range(0);
  const std::size_t n13 = s.E * 2 * s.I * s.H, n2 = s.E * s.H * s.I;
  auto* w13 = device_alloc<moe::bfloat16>(n13);
  auto* w2 = device_alloc<moe::bfloat16>(n2);
  auto* hidden = device_alloc<moe::bfloat16>(M * s.H);
  auto* out = device_alloc<moe::bfloat16>(M * s.H);
  fill_random<<<1024, 256>>>(w13, n13, 0.02f, 1);
  fill_random<<<1024, 256>>>(w2, n2, 0.02f, 2);
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

  Kernel::Arguments a;
  a.hidden_states = moe::DeviceView<const moe::bfloat16, 2>(hidden, {M, s.H});
  a.topk_ids = moe::DeviceView<const std::int32_t, 2>(d_ids, {M, s.top_k});
  a.topk_weights = moe::DeviceView<const float, 2>(d_w, {M, s.top_k});
  a.top_k = s.top_k;
  a.w13 = moe::DeviceView<const moe::bfloat16, 3>(w13, {s.E, 2 * s.I, s.H});
  a.w2 = moe::DeviceView<const moe::bfloat16, 3>(w2, {s.E, s.H, s.I});
  a.output = moe::DeviceView<moe::bfloat16, 2>(out, {M, s.H});
  Kernel kernel;
  const std::size_t ws_bytes = kernel.workspace_bytes(a);
  auto* ws = device_alloc<std::byte>(ws_bytes);
  const std::size_t flush_bytes = 256u << 20;
  auto* flush = device_alloc<std::byte>(flush_bytes);
  cudaEvent_t start, stop;
  cuda_ok(cudaEventCreate(&start));
  cuda_ok(cudaEventCreate(&stop));
  cudaStream_t stream;
  cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    cudaGraph_t g;
    cuda_ok(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    moe::check(kernel.run(a, std::span<std::byte>(ws, ws_bytes), stream));
    cuda_ok(cudaStreamEndCapture(stream, &g));
    cuda_ok(cudaGraphInstantiate(&exec, g, 0));
    cuda_ok(cudaGraphDestroy(g));
  }
  const auto launch = [&] {
    if (graph) cuda_ok(cudaGraphLaunch(exec, stream));
    else moe::check(kernel.run(a, std::span<std::byte>(ws, ws_bytes), stream));
  };
  launch();  // warm-up
  cuda_ok(cudaStreamSynchronize(stream));
  std::vector<float> times;
  for (auto _ : state) {
    cuda_ok(cudaMemsetAsync(flush, 0, flush_bytes, stream));
    cuda_ok(cudaEventRecord(start, stream));
    launch();
    cuda_ok(cudaEventRecord(stop, stream));
    cuda_ok(cudaEventSynchronize(stop));
    float ms = 0;
    cuda_ok(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(ms * 1e-3);
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  const double median_s = times[times.size() / 2] * 1e-3;
  const double flops = 6.0 * M * s.top_k * s.H * s.I;
  state.counters["us"] = median_s * 1e6;
  state.counters["TFLOP/s"] = flops / median_s * 1e-12;
  state.counters["weight_GB/s"] = static_cast<double>(hit.size()) * 3 * s.H * s.I * 2 / median_s * 1e-9;
  for (void* p : {static_cast<void*>(w13), static_cast<void*>(w2), static_cast<void*>(hidden), static_cast<void*>(out),
                  static_cast<void*>(d_ids), static_cast<void*>(d_w), static_cast<void*>(ws), static_cast<void*>(flush)}) {
    cudaFree(p);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (exec) cudaGraphExecDestroy(exec);
  cudaStreamDestroy(stream);
}

int register_all() {
  for (const bool graph : {false, true}) {
    for (const Shape& s : kShapes) {
      const std::string name = std::string(graph ? "bf16_forward_graph/" : "bf16_forward/") + s.name;
      benchmark::RegisterBenchmark(name.c_str(), Forward, s, graph)
          ->Arg(1)->Arg(64)->Arg(1024)->Arg(4096)
          ->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
    }
  }
  return 0;
}
const int registered = register_all();

}  // namespace

BENCHMARK_MAIN();
