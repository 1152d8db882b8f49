// The CPU backend: moe::Kernel<Spec, moe::cpu::Eigen>, the reference every other backend is
// tested against.
//
// Forward, per chunk of at most Options::chunk_tokens tokens (same result as unchunked), through
// the stage types of moe/stages.h, each with its own workspace region:
//   1. cpu::RoutingStage<Routing>       logits -> ids/weights (or the caller's precomputed ones)
//   2. cpu::PrepareFinalizeStage<Spec>  prepare: rows grouped by local expert, gathered as float
//   3. cpu::ExpertsStage                on blocks of rows, in parallel over (expert, row block)
//   4. cpu::PrepareFinalizeStage<Spec>  finalize: ascending slots, float sums, the output
//                                       epilogue, one rounding
// Slots are never used to form an address unless their id is in [0, E_global) and maps to a
// local expert.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "moe/arguments.h"
#include "moe/cpu/experts_stage.h"
#include "moe/cpu/options.h"
#include "moe/cpu/parallel.h"
#include "moe/cpu/prepare_finalize_stage.h"
#include "moe/cpu/routing_stage.h"
#include "moe/detail/workspace.h"
#include "moe/expert_map.h"
#include "moe/kernel.h"

namespace moe {

template <class Spec>
class Kernel<Spec, cpu::Eigen> {
 public:
  using Arguments = moe::Arguments<Spec, HostSpace>;
  using Routing = typename Spec::Routing;
  using PF = typename Spec::PrepareFinalize;
  using IO = typename Spec::ElementIO;
  using RoutingStage = cpu::RoutingStage<Routing>;
  using PrepareFinalize = cpu::PrepareFinalizeStage<Spec>;
  using Stage = cpu::ExpertsStage<typename Spec::Experts, IO>;
  static constexpr bool kBatched = PF::kFormat == ActivationFormat::kBatchedExperts;

  using Carver = detail::WorkspaceCarver<64>;  // the workspace: cache-line aligned regions
  explicit Kernel(cpu::Options options = {}) : options_(options) {}
  const cpu::Options& options() const { return options_; }

  // Every check, shape- and data-dependent, that run() makes before writing anything.
  Status can_implement(const Arguments& a) const {
    if (options_.chunk_tokens < 1) return invalid_argument("options.chunk_tokens: expected >= 1, got ", options_.chunk_tokens);
    if (options_.num_threads < 1) return invalid_argument("options.num_threads: expected >= 1, got ", options_.num_threads);
    if (options_.row_block < 1) return invalid_argument("options.row_block: expected >= 1, got ", options_.row_block);
    MOE_RETURN_IF_ERROR(validate_shapes(a));
    const Problem p = Problem::from(a);
    if (a.expert_map) MOE_RETURN_IF_ERROR(validate_expert_map(*a.expert_map, p.num_local_experts));
    if constexpr (!Routing::kUsesLogits) {
      if (options_.invalid_ids == cpu::InvalidIds::kReject) {
        for (Index m = 0; m < p.num_tokens; ++m) {
          for (int j = 0; j < p.top_k; ++j) {
            const std::int32_t id = (*a.topk_ids)(m, j);
            if (id < 0 || id >= p.num_experts) {
              return invalid_argument("topk_ids: entry [", m, ", ", j, "] is ", id, "; expected an expert id in [0, ",
                                      p.num_experts, ")");
            }
          }
        }
      }
    }
    return Status::ok();
  }

  std::size_t workspace_bytes(const Arguments& a) const { return layout(Problem::from(a), a).total; }

  Status run(const Arguments& a, std::span<std::byte> workspace) const {
    MOE_RETURN_IF_ERROR(can_implement(a));
    const Problem p = Problem::from(a);
    const Layout l = layout(p, a);
    MOE_RETURN_IF_ERROR(check_workspace(workspace.size(), l.total));
    if (p.num_tokens == 0) {
      if constexpr (kBatched) {
        if (a.prepare_finalize.dropped_slots) *a.prepare_finalize.dropped_slots = 0;
      }
      return Status::ok();
    }
    std::byte* base = Carver::aligned_base(workspace.data());
    const typename PrepareFinalize::Handle h = PrepareFinalize::carve(l.pf, base + l.pf_ws);
    if constexpr (kBatched) {  // every chunk's counts fit, or nothing is written
      for (Index m0 = 0; m0 < p.num_tokens; m0 += l.chunk) {
        const Index m1 = std::min(p.num_tokens, m0 + l.chunk);
        const RoutedSlots slots = RoutingStage::run(l.routing, a, m0, m1, base + l.routing_ws);
        MOE_RETURN_IF_ERROR(PrepareFinalize::check_capacity(h, a, slots, m0, m1));
      }
    }
    for (Index m0 = 0; m0 < p.num_tokens; m0 += l.chunk) {
      const Index m1 = std::min(p.num_tokens, m0 + l.chunk);
      const RoutedSlots slots = RoutingStage::run(l.routing, a, m0, m1, base + l.routing_ws);
      PrepareFinalize::prepare(h, a, slots, m0, m1);
      const float* y = Stage::run_planned(l.experts, stage_params(a, p), p.num_local_experts, h.begin, h.count, h.input,
                                          PrepareFinalize::row_weight(h), base + l.experts_ws, options_);
      PrepareFinalize::finalize(h, a, y, l.experts.ld, m0, m1, options_);
    }
    if constexpr (kBatched) {  // overflow was refused above: nothing dropped
      if (a.prepare_finalize.dropped_slots) *a.prepare_finalize.dropped_slots = 0;
    }
    return Status::ok();
  }

  // Convenience: allocates the workspace itself.
  Status run(const Arguments& a) const {
    MOE_RETURN_IF_ERROR(can_implement(a));
    std::vector<std::byte> ws(workspace_bytes(a));
    return run(a, ws);
  }

 private:
  // Each stage's plan and the offset of its region in the workspace.
  struct Layout {
    Index chunk = 0;
    typename RoutingStage::Plan routing;
    typename PrepareFinalize::Plan pf;
    typename Stage::Plan experts;
    std::size_t routing_ws = 0, pf_ws = 0, experts_ws = 0, total = 0;
  };

  typename Stage::Params stage_params(const Arguments& a, const Problem& p) const {
    return {a.w13, a.w2, a.w13_bias, a.w2_bias, a.activation, a.quant, p.hidden, p.intermediate, p.gemm1_width};
  }

  Layout layout(const Problem& p, const Arguments& a) const {
    Layout l;
    l.chunk = std::max<Index>(0, std::min(p.num_tokens, options_.chunk_tokens));
    l.routing = RoutingStage::template plan<Carver>(l.chunk, p.top_k, p.num_experts);
    l.pf = PrepareFinalize::template plan<Carver>(p, l.chunk, a.prepare_finalize);
    l.experts = Stage::plan(stage_params(a, p), l.pf.rows, options_);
    Carver carver;
    l.routing_ws = carver.take(l.routing.total);
    l.pf_ws = carver.take(l.pf.total);
    l.experts_ws = carver.take(l.experts.total);
    l.total = carver.total();
    return l;
  }

  cpu::Options options_;
};

}  // namespace moe
