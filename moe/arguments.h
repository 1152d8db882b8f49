// The arguments of one fused-MoE forward, shared by every backend, and the checks that need
// only shapes (no tensor data), so every backend runs them before touching anything.
#pragma once

#include <cstdint>
#include <optional>

#include "moe/detail/validate.h"
#include "moe/intermediate_epilogue.h"
#include "moe/output_epilogue.h"
#include "moe/spec.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe {

template <class Spec, class Space>
struct Arguments {
  using IO = typename Spec::ElementIO;
  using W = typename Spec::ElementWeight;
  template <class T, int R>
  using View = TensorView<T, R, Space>;

  View<const IO, 2> hidden_states;  // [M, H]

  // Routing input. Policies with kUsesLogits read router_logits; routing::Precomputed reads
  // topk_ids / topk_weights instead (global expert ids).
  View<const float, 2> router_logits;                   // [M, E_global]
  std::optional<View<const float, 1>> correction_bias;  // [E_global] e_score_correction_bias
  std::optional<View<const std::int32_t, 2>> topk_ids;  // [M, top_k]
  std::optional<View<const float, 2>> topk_weights;     // [M, top_k]
  int top_k = 0;

  // Expert weights of the experts on this rank, PyTorch Linear layout ([out, in], K contiguous).
  // A packing scheme (quant::weight_pack_v > 1, e.g. W4A16) stores K / pack elements per row.
  View<const W, 3> w13;  // [E_local, 2*I, H] gated ([gate; up] or interleaved), [E_local, I, H] otherwise
  View<const W, 3> w2;   // [E_local, H, I]
  std::optional<View<const IO, 2>> w13_bias;  // [E_local, 2*I or I]
  std::optional<View<const IO, 2>> w2_bias;   // [E_local, H]

  // Expert parallelism: global expert id -> local index, or -1 for experts on other ranks
  // (they contribute exactly zero). Absent: all experts are local (E_global = E_local).
  std::optional<View<const std::int32_t, 1>> expert_map;  // [E_global]

  typename Spec::Routing::Arguments routing{};
  typename Spec::Activation::Arguments activation{};
  typename Spec::Quant::template Arguments<Space> quant{};  // the scheme's scale tensors
  typename Spec::PrepareFinalize::Arguments prepare_finalize{};
  // The run-time leaves of Spec::OutputEpilogue (moe/output_epilogue.h); unused by the default.
  OutputEpilogueArguments<IO, Space> epilogue{};

  View<IO, 2> output;  // [M, H]
};

// The sizes of one forward, read off the arguments.
struct Problem {
  Index num_tokens = 0;         // M
  Index hidden = 0;             // H
  Index intermediate = 0;       // I (per expert, per tensor-parallel rank)
  Index gemm1_width = 0;        // 2*I gated, I otherwise
  Index num_experts = 0;        // E_global
  Index num_local_experts = 0;  // E_local
  int top_k = 0;

  template <class Spec, class Space>
  static Problem from(const Arguments<Spec, Space>& a) {
    Problem p;
    p.num_tokens = a.hidden_states.extent(0);
    p.hidden = a.hidden_states.extent(1);
    p.intermediate = a.w2.extent(2) * quant::weight_pack_v<typename Spec::Quant>;  // codes packed along K
    p.gemm1_width = Spec::kGated ? 2 * p.intermediate : p.intermediate;
    p.num_local_experts = a.w13.extent(0);
    p.num_experts = a.expert_map ? a.expert_map->extent(0) : p.num_local_experts;
    p.top_k = a.top_k;
    return p;
  }
};

// Checks everything that shapes alone decide. Data-dependent checks (id ranges, expert_map
// contents) are the backend's.
template <class Spec, class Space>
Status validate_shapes(const Arguments<Spec, Space>& a) {
  using detail::Dim;
  using Routing = typename Spec::Routing;
  using PF = typename Spec::PrepareFinalize;
  const Problem p = Problem::from(a);

  if (p.num_local_experts < 1) {
    return invalid_argument("w13: expected at least one local expert in dimension 0, got shape ",
                            detail::format_shape(a.w13.extents()));
  }
  if (p.hidden < 1) return invalid_argument("hidden_states: expected hidden size H >= 1, got shape ", detail::format_shape(a.hidden_states.extents()));
  if (p.intermediate < 1) return invalid_argument("w2: expected intermediate size I >= 1 in dimension 2, got shape ", detail::format_shape(a.w2.extents()));
  MOE_RETURN_IF_ERROR(detail::expect_shape(a.hidden_states, "hidden_states", std::array<Dim, 2>{{{"M", p.num_tokens}, {"H", p.hidden}}}));
  constexpr Index kPack = quant::weight_pack_v<typename Spec::Quant>;
  if (p.hidden % kPack != 0) {
    return invalid_argument("hidden_states: expected a hidden size H divisible by ", kPack, " (", Spec::Quant::kName,
                            " packs ", kPack, " codes per byte along K), got shape ", detail::format_shape(a.hidden_states.extents()));
  }
  const char* const kPerRow = kPack == 1 ? "I" : "I/pack";
  MOE_RETURN_IF_ERROR(detail::expect_shape(a.w2, "w2", std::array<Dim, 3>{{{"E_local", p.num_local_experts}, {"H", p.hidden}, {kPerRow, p.intermediate / kPack}}}));
  MOE_RETURN_IF_ERROR(detail::expect_shape(
      a.w13, Spec::kGated ? "w13 (gated activation: 2*I rows)" : "w13 (ungated activation: I rows)",
      std::array<Dim, 3>{{{"E_local", p.num_local_experts}, {Spec::kGated ? "2*I" : "I", p.gemm1_width},
                          {kPack == 1 ? "H" : "H/pack", p.hidden / kPack}}}));
  MOE_RETURN_IF_ERROR(detail::expect_shape(a.w13_bias, "w13_bias", std::array<Dim, 2>{{{"E_local", p.num_local_experts}, {Spec::kGated ? "2*I" : "I", p.gemm1_width}}}));
  MOE_RETURN_IF_ERROR(detail::expect_shape(a.w2_bias, "w2_bias", std::array<Dim, 2>{{{"E_local", p.num_local_experts}, {"H", p.hidden}}}));
  MOE_RETURN_IF_ERROR(detail::expect_shape(a.output, "output", std::array<Dim, 2>{{{"M", p.num_tokens}, {"H", p.hidden}}}));

  if (a.expert_map) {
    MOE_RETURN_IF_ERROR(detail::expect_shape(*a.expert_map, "expert_map", std::array<Dim, 1>{{{"E_global", a.expert_map->extent(0)}}}));
    if (p.num_experts < p.num_local_experts) {
      return invalid_argument("expert_map: expected length E_global >= E_local=", p.num_local_experts,
                              " (one entry per global expert), got length ", p.num_experts);
    }
  }
  if (a.top_k < 1 || a.top_k > p.num_experts) {
    return invalid_argument("top_k: expected 1 <= top_k <= num_experts=", p.num_experts, ", got ", a.top_k);
  }
  if constexpr (Routing::kUsesLogits) {
    MOE_RETURN_IF_ERROR(detail::expect_shape(a.router_logits, "router_logits", std::array<Dim, 2>{{{"M", p.num_tokens}, {"E_global", p.num_experts}}}));
    if (a.topk_ids || a.topk_weights) {
      return invalid_argument("topk_ids/topk_weights: given, but routing policy ", Routing::kName,
                              " computes them from router_logits (use moe::routing::Precomputed)");
    }
  } else {
    if (!a.topk_ids || !a.topk_weights) {
      return invalid_argument("topk_ids/topk_weights: required by routing policy ", Routing::kName, ", not given");
    }
    MOE_RETURN_IF_ERROR(detail::expect_shape(*a.topk_ids, "topk_ids", std::array<Dim, 2>{{{"M", p.num_tokens}, {"top_k", a.top_k}}}));
    MOE_RETURN_IF_ERROR(detail::expect_shape(*a.topk_weights, "topk_weights", std::array<Dim, 2>{{{"M", p.num_tokens}, {"top_k", a.top_k}}}));
  }
  if (a.correction_bias) {
    if constexpr (!Routing::kAcceptsCorrectionBias) {
      return invalid_argument("correction_bias: routing policy ", Routing::kName, " does not use an e_score_correction_bias");
    } else {
      MOE_RETURN_IF_ERROR(detail::expect_shape(*a.correction_bias, "correction_bias", std::array<Dim, 1>{{{"E_global", p.num_experts}}}));
    }
  }
  MOE_RETURN_IF_ERROR(Routing::can_implement(a.routing, static_cast<int>(p.num_experts), a.top_k));

  if constexpr (PF::kApplyWeightOnInput) {
    if (a.top_k != 1) {
      return invalid_argument("top_k: apply_router_weight_on_input (", PF::kName,
                              ") is defined only for top_k == 1, got top_k=", a.top_k);
    }
  }
  if constexpr (PF::kFormat == ActivationFormat::kBatchedExperts) {
    if (a.prepare_finalize.max_tokens_per_expert < 1) {
      return invalid_argument("prepare_finalize.max_tokens_per_expert: expected >= 1, got ",
                              a.prepare_finalize.max_tokens_per_expert);
    }
  }
  MOE_RETURN_IF_ERROR(a.quant.validate(p.num_local_experts, p.gemm1_width, p.hidden, p.intermediate));
  MOE_RETURN_IF_ERROR(detail::validate_intermediate_epilogue<typename Spec::Activation>(a.activation, p.intermediate));
  MOE_RETURN_IF_ERROR(
      detail::validate_output_epilogue<typename Spec::OutputEpilogue>(a.epilogue, p.num_tokens, p.hidden));
  return Status::ok();
}

}  // namespace moe
