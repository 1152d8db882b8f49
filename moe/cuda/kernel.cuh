// The CUDA backend: moe::Kernel<Spec, moe::cuda::Sm80 | Sm90>. Include only from .cu files.
//
// Forward, per chunk of at most Options::chunk_tokens tokens, all stream-ordered, with no host
// synchronization and no allocation (the caller gives the workspace), so it can be captured in a
// CUDA graph:
//   route (generic: the policy's route_token per token) -> slot keys + per-expert counts ->
//   stable CUB radix sort of (local expert, slot) -> offsets and m-tile prefix -> rows ->
//   gather, then the experts on the schedule of the Arch tag (moe/cuda/gemm/schedule.h):
//     Sm80CpAsync: GEMM1 + fused epilogue 1 (bias, activation, rounding) -> GEMM2 + fused
//       epilogue 2 (bias, router weight, rounding) -> finalize (ascending slots, float, one rounding);
//     Sm90TmaWarpSpecialized: GEMM1 (stored) -> activation pass (epilogue 1) -> GEMM2 (stored) ->
//       finalize applying epilogue 2 (router weight) and the sum. Same function: the epilogue trees'
//       rounding points (moe/epilogue.h) make "store, then apply" exact.
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
#include "moe/cuda/gemm/schedule.h"
#include "moe/cuda/gemm/sm90_grouped_gemm.h"
#include "moe/cuda/gemm/sm90_swap_mainloop.cuh"
#include "moe/cuda/gemm/sm80_mainloops.cuh"
#include "moe/cuda/radix_bits.h"
#include "moe/detail/workspace.h"
#include "moe/cuda/stages.cuh"
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
  static_assert(std::is_same_v<IO, typename Spec::ElementWeight>,
                "moe::Kernel<Spec, cuda::*>: this release runs the unquantized schemes (weights stored like activations)");
  static constexpr bool kBatched = PF::kFormat == ActivationFormat::kBatchedExperts;
  static constexpr cuda::detail::ColumnMode kMode1 =
      !Activation::kGated ? cuda::detail::ColumnMode::kPlain
      : Activation::kLayout == GateUpLayout::kInterleaved ? cuda::detail::ColumnMode::kGatedInterleaved
                                                          : cuda::detail::ColumnMode::kGatedSplit;

  // The expert GEMMs' schedule (moe/cuda/gemm/schedule.h). The Hopper schedule stores raw 16-bit
  // GEMM outputs and applies the epilogue trees in the activation and finalize passes, which the
  // trees' rounding points make exact (moe/epilogue.h).
  using Schedule = typename Arch::Schedule;
  static constexpr bool kArchHasSm90 = Arch::kMinComputeCapability >= 90;
  static constexpr bool kForcedSm90 = std::is_base_of_v<cuda::gemm::Sm90TmaWarpSpecialized, Schedule> ||
                                      std::is_same_v<cuda::gemm::Sm90TmaWarpSpecialized, Schedule>;
  static_assert(!kForcedSm90 || sizeof(IO) == 2,
                "moe::Kernel: the Sm90TmaWarpSpecialized schedule takes 16-bit operands (bf16, f16); use ScheduleAuto "
                "or Sm80CpAsync for f32");
  static constexpr bool kMaySm90 = kArchHasSm90 && sizeof(IO) == 2 &&
                                   (kForcedSm90 || std::is_same_v<Schedule, cuda::gemm::ScheduleAuto>);

  explicit Kernel(cuda::Options options = {}) : options_(options) {}
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
      if (const char* why = sm90_refusal(p, a)) return unsupported("schedule Sm90TmaWarpSpecialized: ", why);
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
    bool sm90 = false;  // the Hopper schedule runs the expert GEMMs
    cuda::gemm::Sm90Tile tile = cuda::gemm::Sm90Tile::kNormal128x256;  // its tile (fused swap resolved)
    int splits1 = 1, splits2 = 1;  // K splits of the fused swap GEMMs
    std::size_t cub_bytes = 0, gemm_ws_bytes = 0;
    std::size_t gemm1_out, gemm_ws, partial, ids, weights, scratch, iscratch, keys, slots_in, keys_sorted, slots_sorted, counts, sorted_start,
        seg_begin, seg_count, tiles, slot_row, row_weight, rows_buf, inter, cub, total;
  };
  // Programmatic dependent launch (moe/cuda/launch.h) for the stage kernels that keep its
  // contract: on sm_90 tags (the device was checked), unless the options turn it off.
  bool programmatic_launch(const Layout& l) const {
    if (!kArchHasSm90) return false;
    switch (options_.programmatic_launch) {
      case cuda::ProgrammaticLaunch::kOff: return false;
      case cuda::ProgrammaticLaunch::kFusedSwapOnly: return l.sm90 && cuda::gemm::is_fused(l.tile);
      case cuda::ProgrammaticLaunch::kEverySchedule: return true;
    }
    return false;
  }
  struct Buffers {
    std::int32_t* ids;
    float* weights;
    float* scratch;
    std::int32_t* iscratch;
    std::int32_t *keys, *slots, *keys_sorted, *slots_sorted, *counts;
    Index *sorted_start, *seg_begin, *seg_count, *tiles, *slot_row;
    float* row_weight;
    IO* rows;   // gathered inputs, then GEMM2 outputs (same region: the input is dead after GEMM1)
    IO* inter;  // GEMM1 outputs (activated)
    IO* gemm1_out;  // Hopper schedule: GEMM1's stored output [rows, gemm1_width]
    std::byte* gemm_ws;
    float* partial;  // fused swap split-K partial sums
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
    l.inter = take(R * n(p.intermediate) * sizeof(IO));
    l.cub = take(l.cub_bytes);
    l.sm90 = sm90_refusal(p, a) == nullptr;
    std::size_t partial_floats = 0;
    if (l.sm90 && L > 0 && l.slots > 0) partial_floats = plan_sm90(p, a, l);
    l.partial = take(partial_floats * sizeof(float));
    // CUTLASS tiles store GEMM1's raw output and need their descriptor workspace; fused swap
    // tiles write the activated intermediate directly.
    const bool cutlass_tile = l.sm90 && !cuda::gemm::is_fused(l.tile);
    l.gemm1_out = take(cutlass_tile ? R * n(p.gemm1_width) * sizeof(IO) : 0);
    l.gemm_ws_bytes = cutlass_tile && L > 0 ? cuda::gemm::sm90_grouped_gemm_workspace_bytes(static_cast<int>(L)) : 0;
    l.gemm_ws = take(l.gemm_ws_bytes);
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
    b.inter = static_cast<IO*>(at(l.inter));
    b.cub = at(l.cub);
    b.gemm1_out = static_cast<IO*>(at(l.gemm1_out));
    b.gemm_ws = static_cast<std::byte*>(at(l.gemm_ws));
    b.partial = static_cast<float*>(at(l.partial));
    return b;
  }

  // Why the Hopper schedule cannot run this forward, or nullptr when it can (decided from shapes,
  // strides and alignment alone, so workspace_bytes and run agree).
  const char* sm90_refusal(const Problem& p, const Arguments& a) const {
    if constexpr (!kMaySm90) {
      return "not selected for this architecture tag, schedule or element type";
    } else {
      const auto aligned = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; };
      if (a.w13_bias || a.w2_bias) return "expert biases are fused by the Sm80CpAsync epilogue only";
      if (p.hidden % 8 != 0 || p.intermediate % 8 != 0) return "hidden and intermediate sizes must be multiples of 8";
      if (a.w13.stride(1) % 8 != 0 || a.w13.stride(0) % 8 != 0 || a.w2.stride(1) % 8 != 0 || a.w2.stride(0) % 8 != 0 ||
          !aligned(a.w13.data()) || !aligned(a.w2.data())) {
        return "w13 and w2 need 16-byte aligned rows";
      }
      if (a.output.stride(0) % 8 != 0 || !aligned(a.output.data())) return "output needs 16-byte aligned rows";
      if (p.gemm1_width > INT32_MAX || p.hidden > INT32_MAX) return "GEMM extents must fit int32";
      return nullptr;
    }
  }

  // The Hopper tile of this forward (the pinned one, else the table's; a fused swap tile falls back
  // to CUTLASS's where our mainloop does not apply) and, for fused swap tiles, the K splits that
  // fill the last wave of CTAs. Returns the floats of split-K partial sums the workspace needs.
  std::size_t plan_sm90(const Problem& p, const Arguments& a, Layout& l) const {
    using namespace cuda::gemm;
    const Index S = l.slots, E = p.num_local_experts;
    Sm90Tile tile = options_.sm90_tile ? *options_.sm90_tile
                                       : sm90_tile_for(static_cast<double>(S) / static_cast<double>(E));
    if (is_fused(tile)) {
      const bool applies = kMode1 != cuda::detail::ColumnMode::kGatedInterleaved &&
                           swap_detail::applies(a.w13, l.rows) && swap_detail::applies(a.w2, l.rows);
      if (!applies) tile = unfused(tile);
    }
    l.tile = tile;
    if (!is_fused(tile)) return 0;
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return 0;  // splits stay 1; run reports the device error
    }
    const int tokens = tile == Sm90Tile::kFusedSwap128x16 ? 16 : tile == Sm90Tile::kFusedSwap128x32 ? 32 : 64;
    const Index experts_hit = std::min(E, S);  // an upper bound: the counts stay on the device
    const Index token_tiles = std::max<Index>(1, (S / std::max<Index>(1, experts_hit) + tokens - 1) / tokens);
    constexpr bool kGated = kMode1 == cuda::detail::ColumnMode::kGatedSplit;
    const Index n_tiles1 = (p.intermediate + (kGated ? 63 : 127)) / (kGated ? 64 : 128);
    const Index n_tiles2 = (p.hidden + 127) / 128;
    l.splits1 = swap_detail::choose_splits(n_tiles1 * experts_hit * token_tiles,
                                           static_cast<int>((p.hidden + 63) / 64), sms,
                                           options_.max_k_splits);
    l.splits2 = swap_detail::choose_splits(n_tiles2 * experts_hit * token_tiles,
                                           static_cast<int>((p.intermediate + 63) / 64), sms,
                                           options_.max_k_splits);
    const auto floats = [&](int splits, Index width) {
      return splits > 1 ? static_cast<std::size_t>(splits) * static_cast<std::size_t>(l.rows) * static_cast<std::size_t>(width) : 0;
    };
    constexpr std::size_t kMaxPartialFloats = std::size_t{64} << 20;  // 256 MiB: split-K is for decode
    if (floats(l.splits1, (kGated ? 2 : 1) * p.intermediate) > kMaxPartialFloats) l.splits1 = 1;
    if (floats(l.splits2, p.hidden) > kMaxPartialFloats) l.splits2 = 1;
    return std::max(floats(l.splits1, (kGated ? 2 : 1) * p.intermediate), floats(l.splits2, p.hidden));
  }

  // Experts on the Hopper schedule: GEMM1 (raw, stored) -> activation pass (Gemm1 tree) ->
  // GEMM2 (raw, stored) -> finalize with the Gemm2 tree (router weight) and the top-k sum.
  Status run_sm90_experts(const Arguments& a, const Problem& p, const Layout& l, const Buffers& b, Index m0, Index C,
                          cudaStream_t stream) const {
    using namespace cuda::gemm;
    using namespace cuda::detail;
    const Index S = C * p.top_k;
    const int E_local = static_cast<int>(p.num_local_experts);
    const Sm90Tile tile = l.tile;
    switch (tile) {
      case Sm90Tile::kFusedSwap128x16: return run_fused_swap<16, 1>(a, p, l, b, m0, C, stream);
      case Sm90Tile::kFusedSwap128x32: return run_fused_swap<32, 1>(a, p, l, b, m0, C, stream);
      case Sm90Tile::kFusedSwap128x64: return run_fused_swap<64, 1>(a, p, l, b, m0, C, stream);
      default: break;
    }
    const std::span<std::byte> ws(b.gemm_ws, l.gemm_ws_bytes);
    // out[rows, n] = in[rows, k] x w[e]^T over the expert segments.
    const auto grouped_gemm = [&](const IO* in, Index k, DeviceView<const IO, 3> w, IO* out, Index n) {
      Sm90GroupedGemmArgs g;
      g.element = std::is_same_v<IO, bfloat16> ? Element16::kBF16 : Element16::kF16;
      g.num_groups = E_local;
      g.seg_begin = b.seg_begin;
      g.seg_count = b.seg_count;
      g.n = n;
      g.k = k;
      g.a = in;
      g.lda = k;
      g.w = w.data();
      g.w_group_stride = w.stride(0);
      g.ldw = w.stride(1);
      g.d = out;
      g.ldd = n;
      return sm90_grouped_gemm(g, tile, ws, stream);
    };
    MOE_RETURN_IF_ERROR(grouped_gemm(b.rows, p.hidden, a.w13, b.gemm1_out, p.gemm1_width));
    {
      constexpr int kLayout = kMode1 == ColumnMode::kPlain ? 0 : kMode1 == ColumnMode::kGatedSplit ? 1 : 2;
      using Expr = epilogue::Gemm1Epilogue<Activation, IO, false>;
      MOE_RETURN_IF_ERROR(launch_kernel(&activation_kernel<IO, Expr, Activation, kLayout>, static_cast<unsigned>(S),
                                        128, 0, stream, programmatic_launch(l), b.gemm1_out, p.gemm1_width,
                                        p.intermediate, b.slot_row, a.activation, b.inter));
    }
    // GEMM2 into the gathered rows' buffer (the inputs are dead).
    MOE_RETURN_IF_ERROR(grouped_gemm(b.inter, p.intermediate, a.w2, b.rows, p.hidden));
    return finalize_stored(a, p, l, b, m0, C, stream);
  }

  // The experts on our own swap mainloop: GEMM1 with the activation fused (stored straight into
  // the intermediate rows), GEMM2 stored raw, then the finalize pass.
  template <int kTokens, int kAtoms>
  Status run_fused_swap(const Arguments& a, const Problem& p, const Layout& l, const Buffers& b, Index m0, Index C,
                        cudaStream_t stream) const {
    using namespace cuda::gemm;
    constexpr bool kGated = kMode1 == cuda::detail::ColumnMode::kGatedSplit;
    using Expr1 = epilogue::Gemm1Epilogue<Activation, IO, false>;
    using Expr2 = epilogue::detail::Stored<IO, false, epilogue::Part::kAll>;
    const Index S = C * p.top_k;
    MOE_RETURN_IF_ERROR((swap_detail::launch<IO, kTokens, kAtoms, kGated, Expr1, Activation>(
        a.w13, b.rows, l.rows, b.seg_begin, b.seg_count, p.intermediate, b.inter, p.intermediate, a.activation,
        l.splits1, b.partial, b.slot_row, S, programmatic_launch(l), stream)));
    MOE_RETURN_IF_ERROR((swap_detail::launch<IO, kTokens, kAtoms, false, Expr2, Activation>(
        a.w2, b.inter, l.rows, b.seg_begin, b.seg_count, p.hidden, b.rows, p.hidden, a.activation, l.splits2,
        b.partial, b.slot_row, S, programmatic_launch(l), stream)));
    return finalize_stored(a, p, l, b, m0, C, stream);
  }

  // out = sum over each token's slots of the GEMM2 epilogue tree on the stored GEMM2 outputs.
  Status finalize_stored(const Arguments& a, const Problem& p, const Layout& l, const Buffers& b, Index m0, Index C,
                         cudaStream_t stream) const {
    using Expr = epilogue::Gemm2Epilogue<IO, false, !PF::kApplyWeightOnInput>;
    const std::size_t smem = static_cast<std::size_t>(p.top_k) * (sizeof(Index) + sizeof(float));
    constexpr int kFinalizeThreads = 128;
    const dim3 grid(static_cast<unsigned>(C), cuda::detail::token_column_blocks(C, p.hidden / 8, kFinalizeThreads));
    return cuda::detail::launch_kernel(&cuda::detail::finalize_epilogue_kernel<IO, Expr, Activation>, grid,
                                       kFinalizeThreads, smem, stream, programmatic_launch(l), b.rows,
                                       p.hidden, p.top_k, b.slot_row, b.weights, m0, a.output.data(),
                                       a.output.stride(0));
  }

  // One grouped GEMM over the chunk's expert segments: out = a x w[e]^T, K = a's width.
  static cuda::detail::GroupedGemmParams<IO, Activation> gemm_params(
      const Buffers& b, const IO* in, Index k, DeviceView<const IO, 3> w, const std::optional<DeviceView<const IO, 2>>& bias,
      const float* row_weight, IO* out, Index n_out, Index n_total, const Arguments& a) {
    cuda::detail::GroupedGemmParams<IO, Activation> g{};
    g.a = in;
    g.lda = k;
    g.w = w.data();
    g.w_expert_stride = w.stride(0);
    g.ldw = w.stride(1);
    g.bias = bias ? bias->data() : nullptr;
    g.bias_expert_stride = bias ? bias->stride(0) : 0;
    g.row_weight = row_weight;
    g.out = out;
    g.ldo = n_out;
    g.K = k;
    g.n_out = n_out;
    g.n_total = n_total;
    g.seg_begin = b.seg_begin;
    g.seg_count = b.seg_count;
    g.tile_offsets = b.tiles;
    g.num_experts = static_cast<int>(w.extent(0));
    g.activation = a.activation;
    return g;
  }

  // Launches one grouped GEMM: the pipelined mainloop when the operands allow it (16-bit, rows
  // 16-byte aligned), else the generic one. Both use 64-row m-tiles (the tile prefix's unit).
  template <cuda::detail::ColumnMode Mode, class Expr>
  static Status launch_gemm(const cuda::detail::GroupedGemmParams<IO, Activation>& g, unsigned m_tiles, bool thin,
                            cudaStream_t stream) {
    using namespace cuda::detail;
    static_assert(kFastBM == kBM, "both mainloops tile M by the tile prefix's unit");
    if (pipelined_gemm_applies(g)) {
      if constexpr (sizeof(IO) == 2) {
        constexpr int kOut = Mode == ColumnMode::kPlain ? kFastBN : kFastBN / 2;
        const dim3 grid(m_tiles, static_cast<unsigned>(blocks(g.n_out, kOut)));
        // Thin expert tiles (decode: few rows per expert) stream weights: deeper K per stage.
        if (thin) {
          auto* kernel = &grouped_gemm_pipelined_kernel<IO, Mode, Expr, Activation, 64>;
          constexpr int kBytes = PipelinedTile<64>::kSmemBytes;
          MOE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
          kernel<<<grid, kFastThreads, kBytes, stream>>>(g);
        } else {
          auto* kernel = &grouped_gemm_pipelined_kernel<IO, Mode, Expr, Activation, 32>;
          constexpr int kBytes = PipelinedTile<32>::kSmemBytes;
          kernel<<<grid, kFastThreads, kBytes, stream>>>(g);
        }
        MOE_CUDA_CHECK_LAUNCH();
        return Status::ok();
      }
    }
    constexpr int kOut = Mode == ColumnMode::kPlain ? kBN : kBN / 2;
    const dim3 grid(m_tiles, static_cast<unsigned>(blocks(g.n_out, kOut)));
    grouped_gemm_kernel<IO, Mode, Expr, Activation><<<grid, kGemmThreads, 0, stream>>>(g);
    MOE_CUDA_CHECK_LAUNCH();
    return Status::ok();
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
    if constexpr (kMaySm90) {
      if (l.sm90) return run_sm90_experts(a, p, l, b, m0, C, stream);
    }
    // 6. GEMM1 + epilogue 1 -> inter; 7. GEMM2 + epilogue 2 -> rows (the gathered input is dead).
    const unsigned m_tiles = static_cast<unsigned>((l.rows + kBM - 1) / kBM + p.num_local_experts);
    // Expected rows per local expert, known on the host without a sync: below one m-tile, the
    // GEMMs stream weights (decode) rather than reuse them.
    const bool thin = S < kBM * p.num_local_experts;
    {
      const auto g = gemm_params(b, b.rows, p.hidden, a.w13, a.w13_bias, nullptr, b.inter, p.intermediate, p.gemm1_width, a);
      if (g.bias) {
        MOE_RETURN_IF_ERROR((launch_gemm<kMode1, epilogue::Gemm1Epilogue<Activation, IO, true>>(g, m_tiles, thin, stream)));
      } else {
        MOE_RETURN_IF_ERROR((launch_gemm<kMode1, epilogue::Gemm1Epilogue<Activation, IO, false>>(g, m_tiles, thin, stream)));
      }
    }
    {
      constexpr bool kWeighted = !PF::kApplyWeightOnInput;
      const auto g = gemm_params(b, b.inter, p.intermediate, a.w2, a.w2_bias, kWeighted ? b.row_weight : nullptr, b.rows,
                                 p.hidden, p.hidden, a);
      if (g.bias) {
        MOE_RETURN_IF_ERROR((launch_gemm<ColumnMode::kPlain, epilogue::Gemm2Epilogue<IO, true, kWeighted>>(g, m_tiles, thin, stream)));
      } else {
        MOE_RETURN_IF_ERROR((launch_gemm<ColumnMode::kPlain, epilogue::Gemm2Epilogue<IO, false, kWeighted>>(g, m_tiles, thin, stream)));
      }
    }
    // 8. Finalize.
    const dim3 finalize_grid(static_cast<unsigned>(C), token_column_blocks(C, p.hidden, 256));
    return launch_kernel(&finalize_kernel<IO>, finalize_grid, 256, 0, stream, pdl, b.rows, p.hidden, p.top_k,
                         b.slot_row, m0, a.output.data(), a.output.stride(0));
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
};

}  // namespace moe
