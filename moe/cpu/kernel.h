// The CPU backend: moe::Kernel<Spec, moe::cpu::Eigen>, the reference every other backend is
// tested against.
//
// Forward, per chunk of at most Options::chunk_tokens tokens (same result as unchunked):
//   1. route      RouterStage: logits -> ids/weights (or the caller's precomputed ones)
//   2. prepare    each (token, slot) whose expert is local gets a row, grouped by local expert
//                 in ascending (token, slot) order; rows are gathered as float (times the router
//                 weight, rounded to ElementIO, when the weight is applied on the input)
//   3. experts    ExpertsStage on blocks of rows, in parallel over (expert, row block)
//   4. finalize   output[m] = sum over slots j (ascending) of the slot's GEMM2 row, in float,
//                 rounded once; slots whose expert is not local contribute exactly zero.
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
#include "moe/cpu/router_stage.h"
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
    Buffers b = carve(l, Carver::aligned_base(workspace.data()));
    if constexpr (kBatched) MOE_RETURN_IF_ERROR(check_capacity(a, p, b));
    for (Index m0 = 0; m0 < p.num_tokens; m0 += l.chunk) {
      const Index m1 = std::min(p.num_tokens, m0 + l.chunk);
      route(a, p, b, m0, m1);
      prepare(a, p, b, m0, m1);
      compute(a, p, l, b);
      finalize(a, p, l, b, m0, m1);
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
  struct Layout {
    Index chunk = 0, slots = 0, rows = 0, ld = 0, num_tasks = 0, thread_floats = 0;
    std::size_t ids, weights, scratch, iscratch, slot_row, count, begin, cursor, row_weight, row_token, tasks, input,
        acc, inter, thread, total;
  };
  struct Buffers {
    std::int32_t* ids;
    float* weights;
    float* scratch;
    std::int32_t* iscratch;
    Index* slot_row;
    Index* count;
    Index* begin;
    Index* cursor;
    float* row_weight;
    Index* row_token;
    Index* tasks;
    float* input;
    float* acc;
    float* inter;
    float* thread;
  };

  typename Stage::Params stage_params(const Arguments& a, const Problem& p) const {
    return {a.w13, a.w2, a.w13_bias, a.w2_bias, a.activation, p.hidden, p.intermediate, p.gemm1_width};
  }

  Layout layout(const Problem& p, const Arguments& a) const {
    Layout l;
    l.chunk = std::max<Index>(0, std::min(p.num_tokens, options_.chunk_tokens));
    l.slots = l.chunk * p.top_k;
    if constexpr (kBatched) {
      l.rows = l.chunk == 0 ? 0 : p.num_local_experts * a.prepare_finalize.max_tokens_per_expert;
    } else {
      l.rows = l.slots;
    }
    l.ld = std::max(p.gemm1_width, p.hidden);
    l.num_tasks = Stage::task_bound(l.rows, p.num_local_experts, options_.row_block);
    l.thread_floats = Stage::thread_scratch_floats(stage_params(a, p));
    Carver carver;
    const auto take = [&](std::size_t bytes) { return carver.take(bytes); };
    const auto n = [](Index v) { return static_cast<std::size_t>(std::max<Index>(0, v)); };
    l.ids = take(n(l.slots) * sizeof(std::int32_t));
    l.weights = take(n(l.slots) * sizeof(float));
    l.scratch = take(cpu::RouterStage<Routing>::scratch_floats(p.num_experts) * sizeof(float));
    l.iscratch = take(cpu::RouterStage<Routing>::scratch_ints(p.num_experts) * sizeof(std::int32_t));
    l.slot_row = take(n(l.slots) * sizeof(Index));
    l.count = take(n(p.num_local_experts) * sizeof(Index));
    l.begin = take(n(p.num_local_experts) * sizeof(Index));
    l.cursor = take(n(p.num_local_experts) * sizeof(Index));
    l.row_weight = take(n(l.rows) * sizeof(float));
    l.row_token = take(n(l.rows) * sizeof(Index));
    l.tasks = take(3 * n(l.num_tasks) * sizeof(Index));
    l.input = take(n(l.rows) * n(p.hidden) * sizeof(float));
    l.acc = take(n(l.rows) * n(l.ld) * sizeof(float));
    l.inter = take(n(l.rows) * n(p.intermediate) * sizeof(float));
    l.thread = take(n(options_.num_threads) * n(l.thread_floats) * sizeof(float));
    l.total = carver.total();
    return l;
  }

  static Buffers carve(const Layout& l, std::byte* base) {
    auto at = [&](std::size_t off) { return static_cast<void*>(base + off); };
    return {static_cast<std::int32_t*>(at(l.ids)), static_cast<float*>(at(l.weights)),
            static_cast<float*>(at(l.scratch)),    static_cast<std::int32_t*>(at(l.iscratch)),
            static_cast<Index*>(at(l.slot_row)),   static_cast<Index*>(at(l.count)),
            static_cast<Index*>(at(l.begin)),      static_cast<Index*>(at(l.cursor)),
            static_cast<float*>(at(l.row_weight)), static_cast<Index*>(at(l.row_token)),
            static_cast<Index*>(at(l.tasks)),      static_cast<float*>(at(l.input)),
            static_cast<float*>(at(l.acc)),        static_cast<float*>(at(l.inter)),
            static_cast<float*>(at(l.thread))};
  }

  // 1. Routing of tokens [m0, m1) into b.ids / b.weights (global ids).
  void route(const Arguments& a, const Problem& p, const Buffers& b, Index m0, Index m1) const {
    if constexpr (Routing::kUsesLogits) {
      cpu::RouterStage<Routing>::run(a.routing, a.router_logits, a.correction_bias ? a.correction_bias->data() : nullptr,
                                     m0, m1, p.top_k, b.scratch, b.iscratch, b.ids, b.weights);
    } else {
      for (Index m = m0; m < m1; ++m) {
        for (int j = 0; j < p.top_k; ++j) {
          b.ids[(m - m0) * p.top_k + j] = (*a.topk_ids)(m, j);
          b.weights[(m - m0) * p.top_k + j] = (*a.topk_weights)(m, j);
        }
      }
    }
  }

  std::int32_t local_id(const Arguments& a, const Problem& p, std::int32_t id) const {
    return local_expert_id(id, a.expert_map ? a.expert_map->data() : nullptr, p.num_experts);
  }

  void count_rows(const Arguments& a, const Problem& p, const Buffers& b, Index slots) const {
    std::fill(b.count, b.count + p.num_local_experts, Index{0});
    for (Index s = 0; s < slots; ++s) {
      const std::int32_t l = local_id(a, p, b.ids[s]);
      if (l >= 0) ++b.count[l];
    }
  }

  // Batched format: every chunk's per-expert count must fit max_tokens_per_expert. Checked for
  // all chunks before any output is written.
  Status check_capacity(const Arguments& a, const Problem& p, const Buffers& b) const {
    const Index chunk = std::min(p.num_tokens, options_.chunk_tokens);
    for (Index m0 = 0; m0 < p.num_tokens; m0 += chunk) {
      const Index m1 = std::min(p.num_tokens, m0 + chunk);
      route(a, p, b, m0, m1);
      count_rows(a, p, b, (m1 - m0) * p.top_k);
      for (Index e = 0; e < p.num_local_experts; ++e) {
        if (b.count[e] > a.prepare_finalize.max_tokens_per_expert) {
          return invalid_argument("prepare_finalize.max_tokens_per_expert: local expert ", e, " receives ", b.count[e],
                                  " tokens in tokens [", m0, ", ", m1, "), more than max_tokens_per_expert=",
                                  a.prepare_finalize.max_tokens_per_expert);
        }
      }
    }
    return Status::ok();
  }

  // 2. Row assignment and gather.
  void prepare(const Arguments& a, const Problem& p, const Buffers& b, Index m0, Index m1) const {
    const Index slots = (m1 - m0) * p.top_k;
    count_rows(a, p, b, slots);
    Index next = 0;
    for (Index e = 0; e < p.num_local_experts; ++e) {
      if constexpr (kBatched) {
        b.begin[e] = e * a.prepare_finalize.max_tokens_per_expert;
      } else {
        b.begin[e] = next;
        next += b.count[e];
      }
      b.cursor[e] = b.begin[e];
    }
    for (Index s = 0; s < slots; ++s) {
      const std::int32_t l = local_id(a, p, b.ids[s]);
      if (l < 0) {
        b.slot_row[s] = -1;
        continue;
      }
      const Index row = b.cursor[l]++;
      b.slot_row[s] = row;
      b.row_token[row] = m0 + s / p.top_k;
      b.row_weight[row] = b.weights[s];
    }
    const Index H = p.hidden;
    for (Index s = 0; s < slots; ++s) {
      const Index row = b.slot_row[s];
      if (row < 0) continue;
      const IO* x = &a.hidden_states(b.row_token[row], 0);
      float* dst = b.input + row * H;
      if constexpr (PF::kApplyWeightOnInput) {
        // vLLM: a1 * topk_weights.to(a1.dtype), computed in the activation dtype.
        const float w = round_to<IO>(b.row_weight[row]);
        for (Index c = 0; c < H; ++c) dst[c] = round_to<IO>(to_float(x[c]) * w);
      } else {
        for (Index c = 0; c < H; ++c) dst[c] = to_float(x[c]);
      }
    }
  }

  // 3. Experts (cpu::ExpertsStage), in parallel over (expert, block of rows).
  void compute(const Arguments& a, const Problem& p, const Layout& l, const Buffers& b) const {
    const float* row_weight = PF::kApplyWeightOnInput ? nullptr : b.row_weight;
    Stage::run_segments(stage_params(a, p), p.num_local_experts, b.begin, b.count, b.input, b.acc, b.inter, l.ld,
                        row_weight, b.tasks, b.thread, options_);
  }

  // 4. Weighted rows back to tokens, ascending slot order, then the output epilogue (the sum by
  // default), one rounding.
  void finalize(const Arguments& a, const Problem& p, const Layout& l, const Buffers& b, Index m0, Index m1) const {
    const Index H = p.hidden;
    const Index block = 64;
    const auto epilogue = a.epilogue.params();
    cpu::parallel_for((m1 - m0 + block - 1) / block, options_.num_threads, [&](std::int64_t t, int) {
      for (Index m = m0 + t * block; m < std::min(m1, m0 + (t + 1) * block); ++m) {
        IO* out = &a.output(m, 0);
        const Index* rows = b.slot_row + (m - m0) * p.top_k;
        for (Index c = 0; c < H; ++c) {
          float sum = 0.0f;
          for (int j = 0; j < p.top_k; ++j) {
            if (rows[j] >= 0) sum += b.acc[rows[j] * l.ld + c];
          }
          out[c] = epilogue::store_output<typename Spec::OutputEpilogue>(epilogue, m, c, sum);
        }
      }
    });
  }

  cpu::Options options_;
};

}  // namespace moe
