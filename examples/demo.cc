// The README's main job (until the `moe` command-line tool replaces it): builds a random
// Qwen3-30B-A3B-shaped MoE layer (E=128, top-k 8, H=2048, I=768, bf16 weights), routes M=64
// tokens with softmax top-k (renormalized), runs the CPU backend, and prints the time, GFLOP/s
// and the largest difference from the naive double-precision definition.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "moe/cpu/kernel.h"
#include "moe/quant/none.h"
#include "testing/lib/naive.h"

namespace {

// A fast, seeded generator: random weights for 600M parameters in a couple of seconds.
struct SplitMix {
  std::uint64_t s;
  float uniform() {  // in [-1, 1)
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
  }
};

}  // namespace

int main(int argc, char** argv) {
  const moe::Index E = 128, H = 2048, I = 768, M = argc > 1 ? std::atol(argv[1]) : 64;
  const int K = 8;
  using Spec = moe::Spec<moe::routing::SoftmaxTopK, moe::StandardPrepareFinalize<>,
                         moe::Experts<moe::SiluAndMul, moe::quant::BF16>>;
  using Kernel = moe::Kernel<Spec, moe::cpu::Eigen>;
  std::printf("moe demo: Qwen3-30B-A3B-shaped layer, E=%ld top_k=%d H=%ld I=%ld M=%ld, bf16, CPU backend (%d threads)\n",
              static_cast<long>(E), K, static_cast<long>(H), static_cast<long>(I), static_cast<long>(M),
              moe::cpu::default_num_threads());

  SplitMix rng{42};
  auto fill = [&](std::vector<moe::bfloat16>& v, float scale) {
    for (auto& x : v) x = moe::bfloat16(rng.uniform() * scale);
  };
  std::vector<moe::bfloat16> hidden(M * H), w13(E * 2 * I * H), w2(E * H * I), out(M * H);
  fill(hidden, 1.0f);
  fill(w13, 1.7f / std::sqrt(static_cast<float>(H)));  // uniform with unit-ish output variance
  fill(w2, 1.7f / std::sqrt(static_cast<float>(I)));
  std::vector<float> logits(M * E);
  for (auto& x : logits) x = 2.0f * rng.uniform();

  Kernel::Arguments a;
  a.hidden_states = moe::HostView<const moe::bfloat16, 2>(hidden.data(), {M, H});
  a.router_logits = moe::HostView<const float, 2>(logits.data(), {M, E});
  a.top_k = K;
  a.routing.renormalize = true;
  a.w13 = moe::HostView<const moe::bfloat16, 3>(w13.data(), {E, 2 * I, H});
  a.w2 = moe::HostView<const moe::bfloat16, 3>(w2.data(), {E, H, I});
  a.output = moe::HostView<moe::bfloat16, 2>(out.data(), {M, H});

  Kernel kernel;
  std::vector<std::byte> workspace(kernel.workspace_bytes(a));
  moe::check(kernel.run(a, workspace));  // warm-up: page in the weights
  const int reps = 3;
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) moe::check(kernel.run(a, workspace));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
  const double flops = 6.0 * static_cast<double>(M) * K * H * I;
  std::printf("forward: %.2f ms, %.1f GFLOP/s (FLOPs = 6*M*top_k*H*I = %.2f G), workspace %.1f MiB\n", seconds * 1e3,
              flops / seconds * 1e-9, flops * 1e-9, static_cast<double>(workspace.size()) / (1 << 20));

  // The naive definition: double precision, plain loops, rounding at the documented points.
  moe::naive::Layer L;
  L.hidden = static_cast<int>(H);
  L.intermediate = static_cast<int>(I);
  L.num_local_experts = L.num_experts = static_cast<int>(E);
  L.gated_act = [](double g, double u) { return moe::naive::silu(g) * u; };
  L.w13.resize(w13.size());
  for (std::size_t i = 0; i < w13.size(); ++i) L.w13[i] = moe::to_float(w13[i]);
  L.w2.resize(w2.size());
  for (std::size_t i = 0; i < w2.size(); ++i) L.w2[i] = moe::to_float(w2[i]);
  std::vector<double> x(hidden.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = moe::to_float(hidden[i]);
  std::vector<moe::naive::Routed> routed(M);
  moe::naive::RoutingConfig rc;
  rc.top_k = K;
  rc.renormalize = true;
  for (moe::Index m = 0; m < M; ++m) routed[m] = moe::naive::route({logits.begin() + m * E, logits.begin() + (m + 1) * E}, rc);
  const auto round_bf16 = [](double v) { return static_cast<double>(moe::round_to<moe::bfloat16>(static_cast<float>(v))); };
  const std::vector<double> ref = moe::naive::fused_moe(L, x, static_cast<int>(M), routed, round_bf16);
  double max_diff = 0, max_ref = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(moe::to_float(out[i]) - ref[i]));
    max_ref = std::max(max_ref, std::abs(ref[i]));
  }
  std::printf("max |output - naive| = %.3g (max |naive| = %.3g, relative %.2e)\n", max_diff, max_ref, max_diff / max_ref);
  const bool ok = max_diff <= 2e-2 * max_ref;
  std::printf("%s\n", ok ? "OK: within the bf16 tolerance (2e-2 of max |naive|)" : "MISMATCH");
  return ok ? 0 : 1;
}
