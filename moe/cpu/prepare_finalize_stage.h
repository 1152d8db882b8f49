// The built-in prepare/finalize stage on the CPU (moe/stages.h) for StandardPrepareFinalize and
// BatchedPrepareFinalize.
//
//   prepare   each (token, slot) whose expert is local gets a row, grouped by local expert in
//             ascending (token, slot) order (expert e at e * capacity in the batched format); the
//             rows are gathered as float (times the router weight, rounded to ElementIO, when the
//             weight is applied on the input)
//   finalize  output[m] = OutputEpilogue(sum over slots j ascending of the slot's row, in float),
//             rounded once; slots whose expert is not local contribute exactly zero.
// Slots never form an address unless their id is in [0, E_global) and maps to a local expert.
#pragma once

#include <algorithm>
#include <cstdint>

#include "moe/arguments.h"
#include "moe/cpu/options.h"
#include "moe/cpu/parallel.h"
#include "moe/expert_map.h"
#include "moe/output_epilogue.h"
#include "moe/stages.h"

namespace moe::cpu {

template <class Spec>
class PrepareFinalizeStage {
 public:
  using PF = typename Spec::PrepareFinalize;
  using IO = typename Spec::ElementIO;
  using Arguments = moe::Arguments<Spec, HostSpace>;
  static constexpr bool kBatched = PF::kFormat == ActivationFormat::kBatchedExperts;
  static_assert(BuiltinPrepareFinalize<PF>, "moe::cpu::PrepareFinalizeStage implements the built-in prepare/finalize policies");

  // Workspace regions (offsets from an aligned base) for chunks of at most `chunk` tokens.
  struct Plan {
    Index chunk = 0, slots = 0, rows = 0;
    std::size_t slot_row, count, begin, cursor, row_weight, row_token, input, total;
  };
  // What prepare leaves for the experts stage and for finalize.
  struct Handle {
    Index* slot_row;     // [slots] row of each slot, -1 when its expert is not local
    Index* count;        // [E_local] rows of each local expert
    Index* begin;        // [E_local] first row of each local expert
    Index* cursor;       // [E_local] scratch
    float* row_weight;   // [rows] router weight of each row
    Index* row_token;    // [rows] token of each row
    float* input;        // [rows, H] gathered rows, float
  };

  template <class Carver>
  static Plan plan(const Problem& p, Index chunk, const typename PF::Arguments& pf) {
    Plan l;
    l.chunk = chunk;
    l.slots = chunk * p.top_k;
    l.rows = prepared_rows<PF>(chunk, p.top_k, p.num_local_experts, pf);
    Carver carver;
    const auto n = [](Index v) { return static_cast<std::size_t>(std::max<Index>(0, v)); };
    l.slot_row = carver.take(n(l.slots) * sizeof(Index));
    l.count = carver.take(n(p.num_local_experts) * sizeof(Index));
    l.begin = carver.take(n(p.num_local_experts) * sizeof(Index));
    l.cursor = carver.take(n(p.num_local_experts) * sizeof(Index));
    l.row_weight = carver.take(n(l.rows) * sizeof(float));
    l.row_token = carver.take(n(l.rows) * sizeof(Index));
    l.input = carver.take(n(l.rows) * n(p.hidden) * sizeof(float));
    l.total = carver.total();
    return l;
  }

  static Handle carve(const Plan& l, std::byte* base) {
    const auto at = [&](std::size_t off) { return static_cast<void*>(base + off); };
    return {static_cast<Index*>(at(l.slot_row)), static_cast<Index*>(at(l.count)),  static_cast<Index*>(at(l.begin)),
            static_cast<Index*>(at(l.cursor)),   static_cast<float*>(at(l.row_weight)), static_cast<Index*>(at(l.row_token)),
            static_cast<float*>(at(l.input))};
  }

  // Batched format: the chunk's per-expert counts must fit max_tokens_per_expert. The kernel runs
  // this for every chunk before any output is written.
  static Status check_capacity(const Handle& h, const Arguments& a, const RoutedSlots& slots, Index m0, Index m1) {
    if constexpr (kBatched) {
      const Problem p = Problem::from(a);
      count_rows(h, a, slots, (m1 - m0) * p.top_k);
      for (Index e = 0; e < p.num_local_experts; ++e) {
        if (h.count[e] > a.prepare_finalize.max_tokens_per_expert) {
          return invalid_argument("prepare_finalize.max_tokens_per_expert: local expert ", e, " receives ", h.count[e],
                                  " tokens in tokens [", m0, ", ", m1, "), more than max_tokens_per_expert=",
                                  a.prepare_finalize.max_tokens_per_expert);
        }
      }
    }
    return Status::ok();
  }

  // Rows for tokens [m0, m1) from their routed slots.
  static void prepare(const Handle& h, const Arguments& a, const RoutedSlots& slots, Index m0, Index m1) {
    const Problem p = Problem::from(a);
    const Index n_slots = (m1 - m0) * p.top_k;
    count_rows(h, a, slots, n_slots);
    Index next = 0;
    for (Index e = 0; e < p.num_local_experts; ++e) {
      if constexpr (kBatched) {
        h.begin[e] = e * a.prepare_finalize.max_tokens_per_expert;
      } else {
        h.begin[e] = next;
        next += h.count[e];
      }
      h.cursor[e] = h.begin[e];
    }
    for (Index s = 0; s < n_slots; ++s) {
      const std::int32_t l = local_id(a, slot_id(slots, p.top_k, s));
      if (l < 0) {
        h.slot_row[s] = -1;
        continue;
      }
      const Index row = h.cursor[l]++;
      h.slot_row[s] = row;
      h.row_token[row] = m0 + s / p.top_k;
      h.row_weight[row] = slots.weights[(s / p.top_k) * slots.ld_weights + s % p.top_k];
    }
    const Index H = p.hidden;
    for (Index s = 0; s < n_slots; ++s) {
      const Index row = h.slot_row[s];
      if (row < 0) continue;
      const IO* x = &a.hidden_states(h.row_token[row], 0);
      float* dst = h.input + row * H;
      if constexpr (PF::kApplyWeightOnInput) {
        // vLLM: a1 * topk_weights.to(a1.dtype), computed in the activation dtype.
        const float w = round_to<IO>(h.row_weight[row]);
        for (Index c = 0; c < H; ++c) dst[c] = round_to<IO>(to_float(x[c]) * w);
      } else {
        for (Index c = 0; c < H; ++c) dst[c] = to_float(x[c]);
      }
    }
  }

  // The router weight per row for the experts stage to apply in GEMM2, or nullptr when it was
  // applied on the input.
  static const float* row_weight(const Handle& h) { return PF::kApplyWeightOnInput ? nullptr : h.row_weight; }

  // output[m0, m1) from the experts' rows `y` (row r at y[r * ld], already weighted).
  static void finalize(const Handle& h, const Arguments& a, const float* y, Index ld, Index m0, Index m1,
                       const Options& options) {
    const Problem p = Problem::from(a);
    const Index H = p.hidden;
    const Index block = 64;
    const auto epilogue = a.epilogue.params();
    parallel_for((m1 - m0 + block - 1) / block, options.num_threads, [&](std::int64_t t, int) {
      for (Index m = m0 + t * block; m < std::min(m1, m0 + (t + 1) * block); ++m) {
        IO* out = &a.output(m, 0);
        const Index* rows = h.slot_row + (m - m0) * p.top_k;
        for (Index c = 0; c < H; ++c) {
          float sum = 0.0f;
          for (int j = 0; j < p.top_k; ++j) {
            if (rows[j] >= 0) sum += y[rows[j] * ld + c];
          }
          out[c] = epilogue::store_output<typename Spec::OutputEpilogue>(epilogue, m, c, sum);
        }
      }
    });
  }

 private:
  static std::int32_t slot_id(const RoutedSlots& slots, int top_k, Index s) {
    return slots.ids[(s / top_k) * slots.ld_ids + s % top_k];
  }
  static std::int32_t local_id(const Arguments& a, std::int32_t id) {
    const Index num_experts = a.expert_map ? a.expert_map->extent(0) : a.w13.extent(0);
    return local_expert_id(id, a.expert_map ? a.expert_map->data() : nullptr, num_experts);
  }
  static void count_rows(const Handle& h, const Arguments& a, const RoutedSlots& slots, Index n_slots) {
    const int top_k = a.top_k;
    std::fill(h.count, h.count + a.w13.extent(0), Index{0});
    for (Index s = 0; s < n_slots; ++s) {
      const std::int32_t l = local_id(a, slot_id(slots, top_k, s));
      if (l >= 0) ++h.count[l];
    }
  }
};

}  // namespace moe::cpu
