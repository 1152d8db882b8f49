// A test harness for moe::Kernel<Spec, moe::cpu::Eigen>: random inputs for a Spec, the
// kernel's Arguments, and the independent naive forward to compare against.
//
// Tolerances (relative to the largest |reference| output):
//   f32  1e-4: float vs double accumulation over H, I <= a few hundred terms (~1e-6), with margin.
//   f16  4e-3 and bf16 2e-2: the naive forward rounds at the same documented points, so the only
//        differences are values within float error of a rounding boundary, which then differ by one
//        ulp (2^-11 for f16, 2^-8 for bf16) at the intermediate or at the output.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <functional>
#include <optional>
#include <vector>

#include "moe/cpu/kernel.h"
#include "moe/quant/none.h"
#include "testing/lib/compare.h"
#include "testing/lib/naive.h"
#include "testing/lib/random.h"

namespace moe::testing {

template <class T>
constexpr Tolerance tolerance() {
  if constexpr (std::is_same_v<T, float>) return {1e-5, 1e-4};
  else if constexpr (std::is_same_v<T, moe::half>) return {1e-4, 4e-3};
  else return {1e-3, 2e-2};
}

// The naive counterpart of each activation policy.
template <class A>
void set_naive_activation(moe::naive::Layer& L) {
  if constexpr (requires { typename A::Base; }) {  // moe::InterleavedGateUp<Base>: Base's function
    set_naive_activation<typename A::Base>(L);
    L.interleaved = true;
  } else {
    L.gated = A::kGated;
    L.interleaved = A::kLayout == moe::GateUpLayout::kInterleaved;
    if constexpr (std::is_same_v<A, moe::SiluAndMul>) L.gated_act = [](double g, double u) { return moe::naive::silu(g) * u; };
    else if constexpr (std::is_same_v<A, moe::GeluAndMul>) L.gated_act = [](double g, double u) { return moe::naive::gelu(g) * u; };
    else if constexpr (std::is_same_v<A, moe::GeluTanhAndMul>) L.gated_act = [](double g, double u) { return moe::naive::gelu_tanh(g) * u; };
    else if constexpr (std::is_same_v<A, moe::SwigluOai>) L.gated_act = [](double g, double u) { return moe::naive::swigluoai(g, u); };
    else if constexpr (std::is_same_v<A, moe::Silu>) L.act = [](double x) { return moe::naive::silu(x); };
    else if constexpr (std::is_same_v<A, moe::Gelu>) L.act = [](double x) { return moe::naive::gelu(x); };
    else if constexpr (std::is_same_v<A, moe::Relu2>) L.act = [](double x) { return moe::naive::relu2(x); };
    else L.gated_act = [](double g, double u) { return A::naive(g, u); };  // test-defined activations
  }
}

struct Case {
  Index M = 16, H = 64, I = 48, E = 8;
  int top_k = 2;
  int ep_size = 1, ep_rank = 0;
  moe::ExpertPlacement placement = moe::ExpertPlacement::kLinear;
  bool bias = false;
  Index chunk_tokens = 16384;
  std::uint64_t seed = 1;
  // Routing: for precomputed specs, ids come from here (or random distinct ids when empty).
  std::vector<std::int32_t> ids;
  std::function<moe::naive::Routed(const std::vector<float>&)> naive_route;  // logits policies
  bool with_correction_bias = false;
};

template <class Spec>
struct Harness {
  using IO = typename Spec::ElementIO;
  using W = typename Spec::ElementWeight;
  using Routing = typename Spec::Routing;
  using Kernel = moe::Kernel<Spec, moe::cpu::Eigen>;
  static constexpr bool kGated = Spec::kGated;

  Case c;
  Index E_local = 0, N1 = 0;
  std::vector<IO> hidden, b13, b2;
  std::vector<float> logits, weights, correction_bias;
  std::vector<std::int32_t> ids, map;
  std::vector<W> w13, w2;
  std::vector<IO> output;
  typename Spec::Routing::Arguments routing_args{};
  typename Spec::Activation::Arguments activation_args{};
  typename Spec::PrepareFinalize::Arguments pf_args{};
  // The leaves a user output epilogue reads (moe/output_epilogue.h), random, one per index used.
  using EpilogueUse = moe::epilogue::LeafUse<typename Spec::OutputEpilogue>;
  std::array<float, moe::kMaxEpilogueLeaves> epilogue_scalars{};
  std::vector<std::vector<float>> channel_vectors;  // [H] each
  std::vector<std::vector<IO>> token_tensors;       // [M, H] each

  explicit Harness(Case cs) : c(std::move(cs)) {
    Random rng(c.seed);
    moe::ExpertMap em;
    moe::check(moe::determine_expert_map(c.ep_size, c.ep_rank, c.E, c.placement, &em));
    E_local = em.num_local_experts;
    map = em.map;
    N1 = kGated ? 2 * c.I : c.I;
    hidden = rng.normal_vector<IO>(c.M * c.H);
    const float ws1 = 1.0f / std::sqrt(static_cast<float>(c.H)), ws2 = 1.0f / std::sqrt(static_cast<float>(c.I));
    w13 = rng.normal_vector<W>(E_local * N1 * c.H, ws1);
    w2 = rng.normal_vector<W>(E_local * c.H * c.I, ws2);
    if (c.bias) {
      b13 = rng.normal_vector<IO>(E_local * N1, 0.5f);
      b2 = rng.normal_vector<IO>(E_local * c.H, 0.5f);
    }
    logits = rng.gapped_logits(c.M, c.E);
    if (c.with_correction_bias) correction_bias = rng.uniform_vector<float>(c.E, -0.3f, 0.3f);
    ids = c.ids.empty() ? rng.distinct_ids(c.M, static_cast<int>(c.E), c.top_k) : c.ids;
    weights = rng.uniform_vector<float>(c.M * c.top_k, 0.1f, 1.0f);
    output.assign(c.M * c.H, moe::from_float<IO>(12345.0f));
    if constexpr (Spec::PrepareFinalize::kFormat == moe::ActivationFormat::kBatchedExperts) {
      pf_args.max_tokens_per_expert = std::max<Index>(1, c.M * c.top_k);
    }
    for (int i = 0; i < EpilogueUse::kScalars; ++i) epilogue_scalars[i] = rng.uniform_vector<float>(1, -1.5f, 1.5f)[0];
    for (int i = 0; i < EpilogueUse::kChannelVectors; ++i) channel_vectors.push_back(rng.uniform_vector<float>(c.H, -2.0f, 2.0f));
    for (int i = 0; i < EpilogueUse::kTokenTensors; ++i) token_tensors.push_back(rng.normal_vector<IO>(c.M * c.H));
  }

  typename Kernel::Arguments arguments() {
    typename Kernel::Arguments a;
    a.hidden_states = moe::HostView<const IO, 2>(hidden.data(), {c.M, c.H});
    if constexpr (Routing::kUsesLogits) {
      a.router_logits = moe::HostView<const float, 2>(logits.data(), {c.M, c.E});
      if (c.with_correction_bias) a.correction_bias = moe::HostView<const float, 1>(correction_bias.data(), {c.E});
    } else {
      a.topk_ids = moe::HostView<const std::int32_t, 2>(ids.data(), {c.M, c.top_k});
      a.topk_weights = moe::HostView<const float, 2>(weights.data(), {c.M, c.top_k});
    }
    a.top_k = c.top_k;
    a.w13 = moe::HostView<const W, 3>(w13.data(), {E_local, N1, c.H});
    a.w2 = moe::HostView<const W, 3>(w2.data(), {E_local, c.H, c.I});
    if (c.bias) {
      a.w13_bias = moe::HostView<const IO, 2>(b13.data(), {E_local, N1});
      a.w2_bias = moe::HostView<const IO, 2>(b2.data(), {E_local, c.H});
    }
    if (!map.empty()) a.expert_map = moe::HostView<const std::int32_t, 1>(map.data(), {c.E});
    a.routing = routing_args;
    a.activation = activation_args;
    a.prepare_finalize = pf_args;
    a.epilogue.scalars = epilogue_scalars;
    for (std::size_t i = 0; i < channel_vectors.size(); ++i) {
      a.epilogue.channel_vectors[i] = moe::HostView<const float, 1>(channel_vectors[i].data(), {c.H});
    }
    for (std::size_t i = 0; i < token_tensors.size(); ++i) {
      a.epilogue.token_tensors[i] = moe::HostView<const IO, 2>(token_tensors[i].data(), {c.M, c.H});
    }
    a.output = moe::HostView<IO, 2>(output.data(), {c.M, c.H});
    return a;
  }

  moe::Status run(moe::cpu::Options options = {}) {
    options.chunk_tokens = c.chunk_tokens;
    Kernel kernel(options);
    return kernel.run(arguments());
  }

  std::vector<float> output_float() const {
    std::vector<float> v(output.size());
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = moe::to_float(output[i]);
    return v;
  }

  std::vector<double> naive() const {
    moe::naive::Layer L;
    L.hidden = static_cast<int>(c.H);
    L.intermediate = static_cast<int>(c.I);
    L.num_local_experts = static_cast<int>(E_local);
    L.num_experts = static_cast<int>(c.E);
    set_naive_activation<typename Spec::Activation>(L);
    auto to_d = [](const auto& v) {
      std::vector<double> d(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) d[i] = moe::to_float(v[i]);
      return d;
    };
    auto to_f = [](const auto& v) {
      std::vector<float> f(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) f[i] = moe::to_float(v[i]);
      return f;
    };
    L.w13 = to_f(w13);
    L.w2 = to_f(w2);
    L.b13 = to_d(b13);
    L.b2 = to_d(b2);
    L.expert_map.assign(map.begin(), map.end());
    L.weight_on_input = Spec::PrepareFinalize::kApplyWeightOnInput;
    std::vector<moe::naive::Routed> routed(c.M);
    for (Index m = 0; m < c.M; ++m) {
      if constexpr (Routing::kUsesLogits) {
        routed[m] = c.naive_route(std::vector<float>(logits.begin() + m * c.E, logits.begin() + (m + 1) * c.E));
      } else {
        for (int j = 0; j < c.top_k; ++j) {
          routed[m].ids.push_back(ids[m * c.top_k + j]);
          routed[m].weights.push_back(weights[m * c.top_k + j]);
        }
      }
    }
    const moe::naive::Rounder round_io = [](double x) { return static_cast<double>(moe::round_to<IO>(static_cast<float>(x))); };
    return moe::naive::fused_moe(L, to_d(hidden), static_cast<int>(c.M), routed, round_io);
  }

  ::testing::AssertionResult matches_naive() {
    const moe::Status s = run();
    if (!s.is_ok()) return ::testing::AssertionFailure() << s.to_string();
    const std::vector<double> ref = naive();
    if (c.M > 0 && moe::testing::max_abs(ref) == 0.0 && E_local == c.E) {
      return ::testing::AssertionFailure() << "degenerate case: the reference output is all zero";
    }
    return moe::testing::all_close(output_float(), ref, tolerance<IO>());
  }
};

}  // namespace moe::testing
