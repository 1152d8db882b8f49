// The CUDA backend: moe::Kernel<Spec, moe::cuda::Sm80 | Sm90>. Include only from .cu files.
//
// Forward, per chunk of at most Options::chunk_tokens tokens, all stream-ordered, with no host
// synchronization and no allocation (the caller gives the workspace), so it can be captured in a
// CUDA graph. The stages of moe/stages.h:
//   route    (generic: the policy's route_token per token; or the caller's precomputed ids)
//   prepare  slot keys + per-expert counts -> stable CUB radix sort of (local expert, slot) ->
//            offsets and m-tile prefix -> rows (one block for all of it at decode) -> gather
//   experts  cuda::ExpertsStage (moe/cuda/experts_stage.cuh) on the Arch tag's schedule, GEMM2's
//            output over the gathered rows
//   finalize ascending slots, float sums, one rounding; the router weight here unless the
//            experts stage folded it into GEMM2 (the Sm80 schedule does)
// The row order within an expert is ascending slot, as on the CPU backend, so both compute the
// same sums up to floating-point association inside the GEMMs.
#pragma once

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <span>
#include <vector>

#include "moe/arguments.h"
#include "moe/cuda/arch.h"
#include "moe/cuda/check.h"
#include "moe/cuda/experts_stage.cuh"  // also the stage kernels (stages.cuh) and the m-tile unit kBM
#include "moe/cuda/radix_bits.h"
#include "moe/detail/workspace.h"
#include "moe/expert_map.h"
#include "moe/kernel.h"

namespace moe {

template <class Spec, cuda::ArchTag Arch>
class Kernel<Spec, Arch> {
 public:
  using Arguments = moe::Arguments<Spec, DeviceSpace>;
  using Routing = typename Spec::Routing;
  using PF = typename Spec::PrepareFinalize;
  using Activation = typename Spec::Activation;
  using IO = typename Spec::ElementIO;
  // The experts stage (moe/cuda/experts_stage.cuh) on the Arch tag's schedule.
  using Stage = cuda::ExpertsStage<typename Spec::Experts, IO, Arch>;
  static constexpr bool kForcedSm90 = Stage::kForcedSm90;
  static constexpr bool kBatched = PF::kFormat == ActivationFormat::kBatchedExperts;

  explicit Kernel(cuda::Options options = {}) : options_(options), stage_(options) {}
  const cuda::Options& options() const { return options_; }

  // With Options::check_device_inputs the data checks read device memory ordered on `stream`.
  Status can_implement(const Arguments& a, cudaStream_t stream = nullptr) const {
    if (options_.chunk_tokens < 1) return invalid_argument("options.chunk_tokens: expected >= 1, got ", options_.chunk_tokens);
    MOE_RETURN_IF_ERROR(validate_shapes(a));
    int device = 0, major = 0, minor = 0;
    MOE_CUDA_TRY(cudaGetDevice(&device));
    MOE_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    MOE_CUDA_TRY(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    if (10 * major + minor < Arch::kMinComputeCapability) {
      return unsupported("device: ", Arch::kName, " needs compute capability >= ", Arch::kMinComputeCapability,
                         ", device ", device, " has ", major, ".", minor);
    }
    const Problem p = Problem::from(a);
    if (p.num_tokens * p.top_k > INT32_MAX) {
      return invalid_argument("hidden_states: M*top_k = ", p.num_tokens * p.top_k, " exceeds the int32 slot range");
    }
    if constexpr (kForcedSm90) {
      if (const char* why = sm90_refusal(a)) return unsupported("schedule Sm90TmaWarpSpecialized: ", why);
    }
    if (options_.check_device_inputs) MOE_RETURN_IF_ERROR(check_device_inputs(a, p, stream));
    return Status::ok();
  }

  std::size_t workspace_bytes(const Arguments& a) const { return layout(Problem::from(a), a).total; }

  Status run(const Arguments& a, std::span<std::byte> workspace, cudaStream_t stream = nullptr) const {
    MOE_RETURN_IF_ERROR(can_implement(a, stream));
    const Problem p = Problem::from(a);
    const Layout l = layout(p, a);
    MOE_RETURN_IF_ERROR(check_workspace(workspace.size(), l.total));
    if (p.num_tokens == 0) {
      if constexpr (kBatched) {
        if (a.prepare_finalize.dropped_slots) {
          MOE_CUDA_TRY(cudaMemsetAsync(a.prepare_finalize.dropped_slots, 0, sizeof(std::int64_t), stream));
        }
      }
      return Status::ok();
    }
    const Buffers b = carve(l, Carver::aligned_base(workspace.data()));
    for (Index m0 = 0; m0 < p.num_tokens; m0 += l.chunk) {
      const Index m1 = std::min(p.num_tokens, m0 + l.chunk);
      MOE_RETURN_IF_ERROR(run_chunk(a, p, l, b, m0, m1, stream));
    }
    return Status::ok();
  }

 private:
  static constexpr int kThreads = 256;
  using Carver = detail::WorkspaceCarver<256>;  // the workspace: 256-byte aligned regions
  static Index blocks(Index n, Index per) { return std::max<Index>(1, (n + per - 1) / per); }

  struct Layout {
    Index chunk = 0, slots = 0, rows = 0;
    typename Stage::Plan experts;  // the experts stage's plan and workspace (region experts_ws)
    std::size_t cub_bytes = 0;
    std::size_t ids, weights, scratch, iscratch, keys, slots_in, keys_sorted, slots_sorted, counts, sorted_start,
        seg_begin, seg_count, tiles, slot_row, row_weight, rows_buf, experts_ws, cub, total;
  };
  // Programmatic dependent launch (moe/cuda/launch.h) for the stage kernels that keep its
  // contract, as the experts stage decides it for this forward's plan.
  bool programmatic_launch(const Layout& l) const { return stage_.programmatic_launch(l.experts); }
  struct Buffers {
    std::int32_t* ids;
    float* weights;
    float* scratch;
    std::int32_t* iscratch;
    std::int32_t *keys, *slots, *keys_sorted, *slots_sorted, *counts;
    Index *sorted_start, *seg_begin, *seg_count, *tiles, *slot_row;
    float* row_weight;
    IO* rows;  // gathered inputs, then GEMM2 outputs (same region: the input is dead after GEMM1)
    std::byte* experts_ws;  // the experts stage's workspace
    void* cub;
  };

  Layout layout(const Problem& p, const Arguments& a) const {
    Layout l;
    l.chunk = std::max<Index>(0, std::min(p.num_tokens, options_.chunk_tokens));
    l.slots = l.chunk * p.top_k;
    if constexpr (kBatched) {
      l.rows = l.chunk == 0 ? 0 : p.num_local_experts * a.prepare_finalize.max_tokens_per_expert;
    } else {
      l.rows = l.slots;
    }
    if (l.slots > 0) {
      // Size query only: no device work.
      cub::DeviceRadixSort::SortPairs(nullptr, l.cub_bytes, static_cast<const std::int32_t*>(nullptr),
                                      static_cast<std::int32_t*>(nullptr), static_cast<const std::int32_t*>(nullptr),
                                      static_cast<std::int32_t*>(nullptr), static_cast<int>(l.slots), 0,
                                      cuda::detail::radix_sort_bits(p.num_local_experts));  // keys in [0, E_local]
    }
    Carver carver;
    const auto take = [&](std::size_t bytes) { return carver.take(bytes); };
    const auto n = [](Index v) { return static_cast<std::size_t>(std::max<Index>(0, v)); };
    const std::size_t S = n(l.slots), E = n(p.num_experts), L = n(p.num_local_experts), R = n(l.rows);
    l.ids = take(S * 4);
    l.weights = take(S * 4);
    l.scratch = take(Routing::kUsesLogits ? n(l.chunk) * routing::kScratchPerExpert * E * 4 : 0);
    l.iscratch = take(Routing::kUsesLogits ? n(l.chunk) * E * 4 : 0);
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
    l.experts = stage_.plan(weights_of(a), l.rows, l.slots, finalize_allows_sm90(a));
    l.experts_ws = take(l.experts.total);
    l.total = carver.total();
    return l;
  }

  static Buffers carve(const Layout& l, std::byte* base) {
    auto at = [&](std::size_t off) { return static_cast<void*>(base + off); };
    Buffers b;
    b.ids = static_cast<std::int32_t*>(at(l.ids));
    b.weights = static_cast<float*>(at(l.weights));
    b.scratch = static_cast<float*>(at(l.scratch));
    b.iscratch = static_cast<std::int32_t*>(at(l.iscratch));
    b.keys = static_cast<std::int32_t*>(at(l.keys));
    b.slots = static_cast<std::int32_t*>(at(l.slots_in));
    b.keys_sorted = static_cast<std::int32_t*>(at(l.keys_sorted));
    b.slots_sorted = static_cast<std::int32_t*>(at(l.slots_sorted));
    b.counts = static_cast<std::int32_t*>(at(l.counts));
    b.sorted_start = static_cast<Index*>(at(l.sorted_start));
    b.seg_begin = static_cast<Index*>(at(l.seg_begin));
    b.seg_count = static_cast<Index*>(at(l.seg_count));
    b.tiles = static_cast<Index*>(at(l.tiles));
    b.slot_row = static_cast<Index*>(at(l.slot_row));
    b.row_weight = static_cast<float*>(at(l.row_weight));
    b.rows = static_cast<IO*>(at(l.rows_buf));
    b.cub = at(l.cub);
    b.experts_ws = static_cast<std::byte*>(at(l.experts_ws));
    return b;
  }

  typename Stage::Weights weights_of(const Arguments& a) const {
    return {a.w13, a.w2, a.w13_bias, a.w2_bias, a.activation};
  }
  // The built-in finalize of the Hopper schedule writes the output with 16-byte stores.
  static bool finalize_allows_sm90(const Arguments& a) {
    return a.output.stride(0) % 8 == 0 && reinterpret_cast<std::uintptr_t>(a.output.data()) % 16 == 0;
  }
  // Why the Hopper schedule cannot run this forward, or nullptr when it can (decided from shapes,
  // strides and alignment alone, so workspace_bytes and run agree).
  const char* sm90_refusal(const Arguments& a) const {
    if (const char* why = stage_.sm90_refusal(weights_of(a))) return why;
    if (!finalize_allows_sm90(a)) return "output needs 16-byte aligned rows";
    return nullptr;
  }

  // out = the output epilogue over the sum of each token's slots of the GEMM2 epilogue tree on the
  // stored GEMM2 outputs.
  Status finalize_stored(const Arguments& a, const Problem& p, const Layout& l, const Buffers& b, Index m0, Index C,
                         cudaStream_t stream) const {
    using Expr = epilogue::Gemm2Epilogue<IO, false, !PF::kApplyWeightOnInput>;
    const std::size_t smem = static_cast<std::size_t>(p.top_k) * (sizeof(Index) + sizeof(float));
    constexpr int kFinalizeThreads = 128;
    const dim3 grid(static_cast<unsigned>(C), cuda::detail::token_column_blocks(C, p.hidden / 8, kFinalizeThreads));
    return cuda::detail::launch_kernel(
        &cuda::detail::finalize_epilogue_kernel<IO, Expr, Activation, typename Spec::OutputEpilogue>, grid,
        kFinalizeThreads, smem, stream, programmatic_launch(l), b.rows, p.hidden, p.top_k, b.slot_row, b.weights, m0,
        a.output.data(), a.output.stride(0), a.epilogue.params());
  }

  Status run_chunk(const Arguments& a, const Problem& p, const Layout& l, const Buffers& b, Index m0, Index m1,
                   cudaStream_t stream) const {
    using namespace cuda::detail;
    const Index C = m1 - m0, S = C * p.top_k;
    const int E_local = static_cast<int>(p.num_local_experts);
    // 1. Routing (precomputed ids are copied by the keys kernel).
    const std::int32_t* ids_in = nullptr;
    const float* weights_in = nullptr;
    Index ld_ids = 0, ld_weights = 0;
    if constexpr (Routing::kUsesLogits) {
      route_kernel<Routing><<<blocks(C, 128), 128, 0, stream>>>(
          a.router_logits.data() + m0 * a.router_logits.stride(0), a.router_logits.stride(0), C,
          static_cast<int>(p.num_experts), p.top_k, a.correction_bias ? a.correction_bias->data() : nullptr, a.routing,
          b.scratch, b.iscratch, b.ids, b.weights);
      MOE_CUDA_CHECK_LAUNCH();
    } else {
      ids_in = a.topk_ids->data() + m0 * a.topk_ids->stride(0);
      ld_ids = a.topk_ids->stride(0);
      weights_in = a.topk_weights->data() + m0 * a.topk_weights->stride(0);
      ld_weights = a.topk_weights->stride(0);
    }
    Index capacity = 0;  // standard format: packed segments
    std::int64_t* dropped = nullptr;  // batched: slots beyond capacity, summed over the chunks
    if constexpr (kBatched) {
      capacity = a.prepare_finalize.max_tokens_per_expert;
      dropped = a.prepare_finalize.dropped_slots;
    }
    const bool later_chunk = m0 > 0;
    const bool pdl = programmatic_launch(l);
    if (S <= kSmallPrepSlots && E_local <= kSmallPrepExperts) {
      // 2-4 in one block (decode).
      MOE_RETURN_IF_ERROR(launch_kernel(&small_routing_prep_kernel, 1, kSmallPrepThreads,
                                        static_cast<std::size_t>(E_local + 1) * 4, stream, pdl, ids_in, ld_ids,
                                        weights_in, ld_weights, p.top_k, b.ids, b.weights, static_cast<int>(S),
                                        a.expert_map ? a.expert_map->data() : nullptr, p.num_experts, E_local,
                                        capacity, kBM, b.seg_begin, b.seg_count, b.tiles, b.slot_row, b.row_weight,
                                        dropped, later_chunk));
    } else {
      // 2. Keys and counts; 3. stable sort by local expert.
      MOE_CUDA_TRY(cudaMemsetAsync(b.counts, 0, (E_local + 1) * sizeof(std::int32_t), stream));
      const bool shared_histogram = E_local < kMaxSharedHistogramExperts;
      slot_keys_kernel<<<blocks(S, kThreads), kThreads, shared_histogram ? (E_local + 1) * 4 : 0, stream>>>(
          ids_in, ld_ids, weights_in, ld_weights, p.top_k, b.ids, b.weights, S,
          a.expert_map ? a.expert_map->data() : nullptr, p.num_experts, E_local, shared_histogram, b.keys, b.slots,
          b.counts);
      MOE_CUDA_CHECK_LAUNCH();
      std::size_t cub_bytes = l.cub_bytes;
      MOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(b.cub, cub_bytes, b.keys, b.keys_sorted, b.slots, b.slots_sorted,
                                                   static_cast<int>(S), 0, radix_sort_bits(E_local), stream));
      // 4. Offsets and rows.
      offsets_kernel<<<1, kOffsetsThreads, 0, stream>>>(b.counts, E_local, capacity, kBM, b.sorted_start, b.seg_begin,
                                                        b.seg_count, b.tiles, dropped, later_chunk);
      MOE_CUDA_CHECK_LAUNCH();
      assign_rows_kernel<<<blocks(S, kThreads), kThreads, 0, stream>>>(b.keys_sorted, b.slots_sorted, S, E_local,
                                                                       b.sorted_start, b.seg_begin, b.seg_count,
                                                                       b.weights, b.slot_row, b.row_weight);
      MOE_CUDA_CHECK_LAUNCH();
    }
    // 5. Gather.
    const dim3 gather_grid(static_cast<unsigned>(C), token_column_blocks(C, (p.hidden + 7) / 8, 256));
    MOE_RETURN_IF_ERROR(launch_kernel(&gather_kernel<IO, PF::kApplyWeightOnInput>, gather_grid, 256, 0, stream, pdl, a.hidden_states.data() + m0 * a.hidden_states.stride(0),
                                      a.hidden_states.stride(0), p.hidden, p.top_k, b.slot_row, b.weights, b.rows));
    // 6. Experts (GEMM2's outputs overwrite the gathered rows: the input is dead after GEMM1).
    const typename Stage::Segments segments{b.seg_begin, b.seg_count, b.tiles, b.slot_row, S};
    const float* row_weight = PF::kApplyWeightOnInput ? nullptr : b.row_weight;
    bool weighted = false;
    MOE_RETURN_IF_ERROR(stage_.run_planned(l.experts, weights_of(a), b.rows, b.rows, segments, row_weight,
                                           std::span<std::byte>(b.experts_ws, l.experts.total), stream, &weighted));
    // 7. Finalize: the weights the experts stage did not apply, and the top-k sum.
    if (!weighted && l.experts.sm90) return finalize_stored(a, p, l, b, m0, C, stream);
    const dim3 finalize_grid(static_cast<unsigned>(C), token_column_blocks(C, p.hidden, 256));
    return launch_kernel(&finalize_kernel<IO, typename Spec::OutputEpilogue>, finalize_grid, 256, 0, stream, pdl,
                         b.rows, p.hidden, p.top_k, b.slot_row, m0, a.output.data(), a.output.stride(0),
                         a.epilogue.params());
  }

  // Checked mode: copies the expert map and precomputed ids to the host on `stream` (then
  // synchronizes it) and validates them as the CPU backend does.
  Status check_device_inputs(const Arguments& a, const Problem& p, cudaStream_t stream) const {
    if (a.expert_map) {
      std::vector<std::int32_t> map(static_cast<std::size_t>(p.num_experts));
      MOE_CUDA_TRY(cudaMemcpyAsync(map.data(), a.expert_map->data(), map.size() * 4, cudaMemcpyDeviceToHost, stream));
      MOE_CUDA_TRY(cudaStreamSynchronize(stream));
      MOE_RETURN_IF_ERROR(validate_expert_map(HostView<const std::int32_t, 1>(map.data(), {p.num_experts}), p.num_local_experts));
    }
    if constexpr (!Routing::kUsesLogits) {
      std::vector<std::int32_t> ids(static_cast<std::size_t>(p.num_tokens * p.top_k));
      const Index ld = a.topk_ids->stride(0);
      if (!ids.empty() && ld >= p.top_k) {
        MOE_CUDA_TRY(cudaMemcpy2DAsync(ids.data(), p.top_k * 4, a.topk_ids->data(), ld * 4, p.top_k * 4, p.num_tokens,
                                       cudaMemcpyDeviceToHost, stream));
      } else {  // rows closer than top_k apart (a valid view, e.g. M == 1 with any stride)
        for (Index m = 0; m < p.num_tokens; ++m) {
          MOE_CUDA_TRY(cudaMemcpyAsync(ids.data() + m * p.top_k, a.topk_ids->data() + m * ld, p.top_k * 4,
                                       cudaMemcpyDeviceToHost, stream));
        }
      }
      MOE_CUDA_TRY(cudaStreamSynchronize(stream));
      for (std::size_t s = 0; s < ids.size(); ++s) {
        if (ids[s] < 0 || ids[s] >= p.num_experts) {
          return invalid_argument("topk_ids: entry [", s / p.top_k, ", ", s % p.top_k, "] is ", ids[s],
                                  "; expected an expert id in [0, ", p.num_experts, ")");
        }
      }
    }
    return Status::ok();
  }

  cuda::Options options_;
  Stage stage_;
};

}  // namespace moe
