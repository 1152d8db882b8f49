// CPU backend throughput against one dense Eigen GEMM with the same FLOPs, in the same binary.
//
// FusedMoE/<dtype>/<M>: the full forward (routing from logits, permutation, both GEMMs,
// activation, reduction) for a Qwen3-30B-A3B-shaped layer (E=128, top-k 8, H=2048, I=768).
// DenseGemm/<M>: C[M*k, 3I] = A[M*k, H] * B[H, 3I] in float, 6*M*k*H*I FLOPs like the forward.
// Both use all OpenMP threads (OMP_NUM_THREADS). Counter GFLOP/s = 6*M*k*H*I / time.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <random>
#include <vector>

#include "moe/cpu/kernel.h"
#include "moe/quant/none.h"

namespace {

constexpr moe::Index kE = 128, kH = 2048, kI = 768;
constexpr int kTopK = 8;

double flops(moe::Index M) { return 6.0 * static_cast<double>(M) * kTopK * kH * kI; }

template <class T>
std::vector<T> random_vector(std::size_t n, float scale, std::uint64_t seed) {
  std::mt19937 gen(static_cast<std::uint32_t>(seed));
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = moe::from_float<T>(d(gen));
  return v;
}

template <class Quant>
void FusedMoE(benchmark::State& state) {
  using IO = typename Quant::DefaultIO;
  using Spec = moe::Spec<moe::routing::SoftmaxTopK, moe::StandardPrepareFinalize<>, moe::Experts<moe::SiluAndMul, Quant>>;
  using Kernel = moe::Kernel<Spec, moe::cpu::Eigen>;
  const moe::Index M = state.range(0);
  const auto hidden = random_vector<IO>(M * kH, 1.0f, 1);
  const auto w13 = random_vector<IO>(kE * 2 * kI * kH, 0.04f, 2);
  const auto w2 = random_vector<IO>(kE * kH * kI, 0.06f, 3);
  const auto logits = random_vector<float>(M * kE, 2.0f, 4);
  std::vector<IO> out(M * kH);
  typename Kernel::Arguments a;
  a.hidden_states = moe::HostView<const IO, 2>(hidden.data(), {M, kH});
  a.router_logits = moe::HostView<const float, 2>(logits.data(), {M, kE});
  a.top_k = kTopK;
  a.routing.renormalize = true;
  a.w13 = moe::HostView<const IO, 3>(w13.data(), {kE, 2 * kI, kH});
  a.w2 = moe::HostView<const IO, 3>(w2.data(), {kE, kH, kI});
  a.output = moe::HostView<IO, 2>(out.data(), {M, kH});
  Kernel kernel;
  std::vector<std::byte> workspace(kernel.workspace_bytes(a));
  moe::check(kernel.run(a, workspace));
  for (auto _ : state) {
    moe::check(kernel.run(a, workspace));
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(flops(M) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = kernel.options().num_threads;
}

void DenseGemm(benchmark::State& state) {
  const moe::Index M = state.range(0);
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Mat A = Mat::Random(M * kTopK, kH), B = Mat::Random(kH, 3 * kI);
  Mat C(M * kTopK, 3 * kI);
  for (auto _ : state) {
    C.noalias() = A * B;
    benchmark::DoNotOptimize(C.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(flops(M) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = Eigen::nbThreads();
}

BENCHMARK(FusedMoE<moe::quant::F32>)->Name("FusedMoE/f32")->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(FusedMoE<moe::quant::BF16>)->Name("FusedMoE/bf16")->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(DenseGemm)->Name("DenseGemm/f32")->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
