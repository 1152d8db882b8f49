// The built-in prepare/finalize stage on the GPU (moe/stages.h) for StandardPrepareFinalize and
// BatchedPrepareFinalize. All stream-ordered, no host synchronization, no allocation.
//
//   prepare   slot keys + per-expert counts -> stable CUB radix sort of (local expert, slot) ->
//             offsets and the m-tile prefix -> rows (one block for all of it at decode) -> gather
//             of each slot's hidden state into its row (times the router weight when it is applied
//             on the input). The batched format puts expert e's rows at e * capacity and drops
//             (and counts) the slots beyond the capacity.
//   finalize  out[m] = OutputEpilogue(sum over slots j ascending of the slot's row, weighted here
//             unless the experts stage folded the weight into GEMM2), float sums, one rounding.
// The row order within an expert is ascending slot, as on the CPU backend.
#pragma once

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdint>

#include "moe/arguments.h"
#include "moe/cuda/check.h"
#include "moe/cuda/launch.h"
#include "moe/cuda/radix_bits.h"
#include "moe/cuda/stages.cuh"
#include "moe/epilogue.h"
#include "moe/stages.h"

namespace moe::cuda {

template <class Spec>
class PrepareFinalizeStage {
 public:
  using PF = typename Spec::PrepareFinalize;
  using IO = typename Spec::ElementIO;
  using Activation = typename Spec::Activation;
  using Arguments = moe::Arguments<Spec, DeviceSpace>;
  static constexpr bool kBatched = PF::kFormat == ActivationFormat::kBatchedExperts;
  static_assert(BuiltinPrepareFinalize<PF>, "moe::cuda::PrepareFinalizeStage implements the built-in prepare/finalize policies");

  // Workspace regions (offsets from an aligned base) for chunks of at most `chunk` tokens.
  struct Plan {
    Index chunk = 0, slots = 0, rows = 0;
    std::size_t cub_bytes = 0;
    std::size_t ids, weights, keys, slots_in, keys_sorted, slots_sorted, counts, sorted_start, seg_begin, seg_count,
        tiles, slot_row, row_weight, rows_buf, cub, total;
  };
  // What prepare leaves for the experts stage and for finalize: slot ids and weights (copied from
  // the routing stage), the rows grouped by local expert and their segments, each slot's row (-1:
  // not local or dropped) and each row's router weight.
  struct Handle {
    std::int32_t* ids;
    float* weights;
    std::int32_t *keys, *slots, *keys_sorted, *slots_sorted, *counts;
    Index *sorted_start, *seg_begin, *seg_count, *tiles, *slot_row;
    float* row_weight;
    IO* rows;  // gathered inputs; the experts stage may write its outputs over them
    void* cub;
  };

  template <class Carver>
  static Plan plan(const Problem& p, Index chunk, const typename PF::Arguments& pf) {
    Plan l;
    l.chunk = chunk;
    l.slots = chunk * p.top_k;
    l.rows = prepared_rows<PF>(chunk, p.top_k, p.num_local_experts, pf);
    if (l.slots > 0) {  // size query only: no device work
      cub::DeviceRadixSort::SortPairs(nullptr, l.cub_bytes, static_cast<const std::int32_t*>(nullptr),
                                      static_cast<std::int32_t*>(nullptr), static_cast<const std::int32_t*>(nullptr),
                                      static_cast<std::int32_t*>(nullptr), static_cast<int>(l.slots), 0,
                                      detail::radix_sort_bits(p.num_local_experts));  // keys in [0, E_local]
    }
    Carver carver;
    const auto take = [&](std::size_t bytes) { return carver.take(bytes); };
    const auto n = [](Index v) { return static_cast<std::size_t>(std::max<Index>(0, v)); };
    const std::size_t S = n(l.slots), L = n(p.num_local_experts), R = n(l.rows);
    l.ids = take(S * 4);
    l.weights = take(S * 4);
    l.keys = take(S * 4);
    l.slots_in = take(S * 4);
    l.keys_sorted = take(S * 4);
    l.slots_sorted = take(S * 4);
    l.counts = take((L + 1) * 4);
    l.sorted_start = take((L + 1) * 8);
    l.seg_begin = take(L * 8);
    l.seg_count = take(L * 8);
    l.tiles = take((L + 1) * 8);
    l.slot_row = take(S * 8);
    l.row_weight = take(R * 4);
    l.rows_buf = take(R * n(p.hidden) * sizeof(IO));
    l.cub = take(l.cub_bytes);
    l.total = carver.total();
    return l;
  }

  static Handle carve(const Plan& l, std::byte* base) {
    const auto at = [&](std::size_t off) { return static_cast<void*>(base + off); };
    Handle h;
    h.ids = static_cast<std::int32_t*>(at(l.ids));
    h.weights = static_cast<float*>(at(l.weights));
    h.keys = static_cast<std::int32_t*>(at(l.keys));
    h.slots = static_cast<std::int32_t*>(at(l.slots_in));
    h.keys_sorted = static_cast<std::int32_t*>(at(l.keys_sorted));
    h.slots_sorted = static_cast<std::int32_t*>(at(l.slots_sorted));
    h.counts = static_cast<std::int32_t*>(at(l.counts));
    h.sorted_start = static_cast<Index*>(at(l.sorted_start));
    h.seg_begin = static_cast<Index*>(at(l.seg_begin));
    h.seg_count = static_cast<Index*>(at(l.seg_count));
    h.tiles = static_cast<Index*>(at(l.tiles));
    h.slot_row = static_cast<Index*>(at(l.slot_row));
    h.row_weight = static_cast<float*>(at(l.row_weight));
    h.rows = static_cast<IO*>(at(l.rows_buf));
    h.cub = at(l.cub);
    return h;
  }

  // The finalize after the Hopper schedule stores GEMM2's raw output writes 16-byte vectors.
  static bool finalize_allows_sm90(const Arguments& a) {
    return a.output.stride(0) % 8 == 0 && reinterpret_cast<std::uintptr_t>(a.output.data()) % 16 == 0;
  }

  // Rows for tokens [m0, m0 + C) from their routed slots. `pdl`: launch the kernels that keep the
  // programmatic-launch contract programmatically (moe/cuda/launch.h). Without `gather` only the
  // segments and the slot -> row map are made (an experts stage that reads the token rows itself).
  static Status prepare(const Plan& l, const Handle& h, const Arguments& a, const RoutedSlots& slots, Index m0, Index C,
                        bool pdl, cudaStream_t stream, bool gather = true) {
    using namespace detail;
    const Problem p = Problem::from(a);
    const Index S = C * p.top_k;
    const int E_local = static_cast<int>(p.num_local_experts);
    Index capacity = 0;               // standard format: packed segments
    std::int64_t* dropped = nullptr;  // batched: slots beyond capacity, summed over the chunks
    if constexpr (kBatched) {
      capacity = a.prepare_finalize.max_tokens_per_expert;
      dropped = a.prepare_finalize.dropped_slots;
    }
    const bool later_chunk = m0 > 0;
    const std::int32_t* map = a.expert_map ? a.expert_map->data() : nullptr;
    if (S <= kSmallPrepSlots && E_local <= kSmallPrepExperts) {
      // Keys, counts, sort, offsets and rows in one block (decode).
      MOE_RETURN_IF_ERROR(launch_kernel(&small_routing_prep_kernel, 1, kSmallPrepThreads,
                                        static_cast<std::size_t>(E_local + 1) * 4, stream, pdl, slots.ids, slots.ld_ids,
                                        slots.weights, slots.ld_weights, p.top_k, h.ids, h.weights, static_cast<int>(S),
                                        map, p.num_experts, E_local, capacity, kBM, h.seg_begin, h.seg_count, h.tiles,
                                        h.slot_row, h.row_weight, dropped, later_chunk));
    } else {
      // Keys and counts; stable sort by local expert; offsets; rows.
      constexpr int kThreads = 256;
      const auto blocks = [](Index n) { return static_cast<unsigned>(std::max<Index>(1, (n + kThreads - 1) / kThreads)); };
      MOE_CUDA_TRY(cudaMemsetAsync(h.counts, 0, (E_local + 1) * sizeof(std::int32_t), stream));
      const bool shared_histogram = E_local < kMaxSharedHistogramExperts;
      slot_keys_kernel<<<blocks(S), kThreads, shared_histogram ? (E_local + 1) * 4 : 0, stream>>>(
          slots.ids, slots.ld_ids, slots.weights, slots.ld_weights, p.top_k, h.ids, h.weights, S, map, p.num_experts,
          E_local, shared_histogram, h.keys, h.slots, h.counts);
      MOE_CUDA_CHECK_LAUNCH();
      std::size_t cub_bytes = l.cub_bytes;
      MOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(h.cub, cub_bytes, h.keys, h.keys_sorted, h.slots, h.slots_sorted,
                                                   static_cast<int>(S), 0, radix_sort_bits(E_local), stream));
      offsets_kernel<<<1, kOffsetsThreads, 0, stream>>>(h.counts, E_local, capacity, kBM, h.sorted_start, h.seg_begin,
                                                        h.seg_count, h.tiles, dropped, later_chunk);
      MOE_CUDA_CHECK_LAUNCH();
      assign_rows_kernel<<<blocks(S), kThreads, 0, stream>>>(h.keys_sorted, h.slots_sorted, S, E_local, h.sorted_start,
                                                             h.seg_begin, h.seg_count, h.weights, h.slot_row,
                                                             h.row_weight);
      MOE_CUDA_CHECK_LAUNCH();
    }
    if (!gather) return Status::ok();
    const dim3 gather_grid(static_cast<unsigned>(C), token_column_blocks(C, (p.hidden + 7) / 8, 256));
    return launch_kernel(&gather_kernel<IO, PF::kApplyWeightOnInput>, gather_grid, 256, 0, stream, pdl,
                         a.hidden_states.data() + m0 * a.hidden_states.stride(0), a.hidden_states.stride(0), p.hidden,
                         p.top_k, h.slot_row, h.weights, h.rows);
  }

  // The router weight per row for an experts stage that applies it in GEMM2, or nullptr when it
  // was applied on the input.
  static const float* row_weight(const Handle& h) { return PF::kApplyWeightOnInput ? nullptr : h.row_weight; }

  // output[m0, m0 + C) from the experts' rows `y` (the handle's rows or another buffer of the
  // same shape). `weighted`: the experts stage applied the router weight; `stored_sm90`: the
  // Hopper schedule stored GEMM2's raw output, so the GEMM2 epilogue tree runs here.
  static Status finalize(const Handle& h, const Arguments& a, const IO* y, Index m0, Index C, bool weighted,
                         bool stored_sm90, bool pdl, cudaStream_t stream) {
    using namespace detail;
    const Problem p = Problem::from(a);
    using OutExpr = typename Spec::OutputEpilogue;
    if (!weighted && stored_sm90) {
      using Expr = epilogue::Gemm2EpilogueOfStored<IO, !PF::kApplyWeightOnInput>;
      const std::size_t smem = finalize_smem_bytes(p.top_k);
      constexpr int kFinalizeThreads = 128;
      const dim3 grid(static_cast<unsigned>(C), token_column_blocks(C, p.hidden / 8, kFinalizeThreads));
      return launch_kernel(&finalize_epilogue_kernel<IO, Expr, Activation, OutExpr>, grid, kFinalizeThreads, smem,
                           stream, pdl, y, p.hidden, p.top_k, h.slot_row, h.weights, m0, a.output.data(),
                           a.output.stride(0), a.epilogue.params());
    }
    const dim3 grid(static_cast<unsigned>(C), token_column_blocks(C, p.hidden, 256));
    return launch_kernel(&finalize_kernel<IO, OutExpr>, grid, 256, 0, stream, pdl, y, p.hidden, p.top_k, h.slot_row,
                         m0, a.output.data(), a.output.stride(0), a.epilogue.params());
  }
};

}  // namespace moe::cuda
