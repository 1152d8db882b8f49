// The CUDA experts stage: GEMM1 -> activation -> GEMM2 over rows grouped by local expert, on the
// schedule of the Arch tag (moe/cuda/gemm/schedule.h):
//   Sm80CpAsync: GEMM1 + fused epilogue 1 (bias, activation, rounding) -> GEMM2 + fused epilogue 2
//     (bias, optional router weight, rounding);
//   Sm90TmaWarpSpecialized, CUTLASS tiles: GEMM1 (stored raw) -> activation pass -> GEMM2 (stored);
//   Sm90TmaWarpSpecialized, fused swap tiles (decode): our mainloop with the activation fused into
//     GEMM1, then GEMM2 stored.
//   Weight-only schemes (moe/quant/weight_only.h; sm_80+): packed codes dequantized in registers
//     inside our mma.sync GEMM (moe/cuda/gemm/weight_only_gemm.cuh), the activation fused into GEMM1
//     (decode); for prefill on sm_90a (4-bit codes, bf16 rows), CUTLASS's mixed-input wgmma GEMM
//     (moe/cuda/gemm/sm90_weight_only_gemm.h): GEMM1 stored raw -> activation pass -> GEMM2.
//   W8A8 schemes (moe/quant/w8a8.h; Sm90 only): rows quantized (moe/cuda/quant/quantize_rows.cuh)
//     -> our swap mainloop on 8-bit operands with the activation fused -> intermediate quantized
//     -> GEMM2 stored (decode tiles); for prefill, the FP8 block-scaled and per-tensor schemes with
//     bf16 rows run CUTLASS's FP8 grouped GEMMs instead (GEMM1 stored raw ->
//     activation fused into the quantizer of GEMM2's input -> GEMM2), the others the 64-token swap tile.
// Same function on every schedule: the epilogue trees' rounding points (moe/epilogue.h) make
// "store, then apply" exact.
//
// Two entries:
//  * run(weights, rows, workspace, stream): moe/stages.h's interface. Derives everything from the
//    segment arrays on the device (clamped to the rows) and leaves unweighted rows.
//  * plan() + run_planned(): the built-in kernel's, which already has the m-tile prefix and the
//    slot -> row map from its prepare, and may ask the Sm80 schedule to fold the router weight
//    into GEMM2 (run_planned says whether it did).
#pragma once

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <span>

#include "moe/cuda/arch.h"
#include "moe/cuda/check.h"
#include "moe/cuda/gemm/schedule.h"
#include "moe/cuda/gemm/sm80_mainloops.cuh"
#include "moe/cuda/gemm/sm90_fp8_gemm.h"
#include "moe/cuda/gemm/sm90_grouped_gemm.h"
#include "moe/cuda/gemm/sm90_swap_mainloop.cuh"
#include "moe/cuda/gemm/sm90_weight_only_gemm.h"
#include "moe/cuda/gemm/sm90_weight_only_swap.cuh"
#include "moe/cuda/gemm/weight_only_gemm.cuh"
#include "moe/cuda/launch.h"
#include "moe/cuda/quant/quantize_rows.cuh"
#include "moe/cuda/stages.cuh"
#include "moe/detail/workspace.h"
#include "moe/quant/mxfp4.h"
#include "moe/stages.h"

namespace moe::cuda {

namespace detail {

// One block: segments clamped to [0, rows) and the prefix of their tile_m-row tiles.
constexpr int kSegmentThreads = 512;
static __global__ void __launch_bounds__(kSegmentThreads) clamp_segments_kernel(const Index* begin_in, const Index* count_in,
                                                                         int num_local, Index rows, int tile_m,
                                                                         Index* begin, Index* count,
                                                                         Index* tile_offsets) {
  using Scan = cub::BlockScan<Index, kSegmentThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ Index carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < num_local; base += kSegmentThreads) {
    const int e = base + static_cast<int>(threadIdx.x);
    Index b = 0, c = 0;
    if (e < num_local) {
      b = begin_in[e] < 0 ? 0 : begin_in[e] > rows ? rows : begin_in[e];
      c = count_in[e] < 0 ? 0 : count_in[e] > rows - b ? rows - b : count_in[e];
    }
    Index before = 0, total = 0;
    Scan(temp).ExclusiveSum((c + tile_m - 1) / tile_m, before, total);
    if (e < num_local) {
      begin[e] = b;
      count[e] = c;
      tile_offsets[e] = carry + before;
    }
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) tile_offsets[num_local] = carry;
}

// row_list[r] = r for every row of every segment (the rest was set to -1 before).
static __global__ void mark_segment_rows_kernel(const Index* begin, const Index* count, Index* row_list) {
  const int e = static_cast<int>(blockIdx.x);
  for (Index i = static_cast<Index>(blockIdx.y) * blockDim.x + threadIdx.x; i < count[e];
       i += static_cast<Index>(gridDim.y) * blockDim.x) {
    row_list[begin[e] + i] = begin[e] + i;
  }
}

}  // namespace detail

template <class Experts, class IO, ArchTag Arch>
class ExpertsStage {
 public:
  using Activation = typename Experts::Activation;
  using Weights = ExpertWeights<Experts, IO, DeviceSpace>;
  using Rows = ExpertRows<IO, DeviceSpace>;
  using Quant = typename Experts::Quant;
  using W = typename Quant::WeightElement;
  static constexpr bool kQuantized = Quant::kQuantized;
  // Packed weights (integer codes, MXFP4) dequantized inside our mma.sync GEMM
  // (moe/cuda/gemm/weight_only_gemm.cuh); either w13 layout, expert biases fused.
  static constexpr bool kWeightOnly = quant::weight_only_v<Quant>;
  static_assert(kQuantized || kWeightOnly || std::is_same_v<IO, W>,
                "moe::cuda::ExpertsStage: unquantized weights are stored like the activations");
  static constexpr detail::ColumnMode kMode1 =
      !Activation::kGated ? detail::ColumnMode::kPlain
      : Activation::kLayout == GateUpLayout::kInterleaved ? detail::ColumnMode::kGatedInterleaved
                                                          : detail::ColumnMode::kGatedSplit;
  using Schedule = typename Arch::Schedule;
  static constexpr bool kArchHasSm90 = Arch::kMinComputeCapability >= 90;
  static constexpr bool kForcedSm90 = std::is_base_of_v<gemm::Sm90TmaWarpSpecialized, Schedule> ||
                                      std::is_same_v<gemm::Sm90TmaWarpSpecialized, Schedule>;
  static_assert(!kForcedSm90 || sizeof(IO) == 2,
                "moe::cuda: the Sm90TmaWarpSpecialized schedule takes 16-bit operands (bf16, f16); use ScheduleAuto "
                "or Sm80CpAsync for f32");
  static constexpr bool kMaySm90 =
      kArchHasSm90 && sizeof(IO) == 2 && (kForcedSm90 || std::is_same_v<Schedule, gemm::ScheduleAuto>);
  // The 8-bit GEMMs are wgmma with 8-bit operands: Hopper's.
  static_assert(!kQuantized || kMaySm90,
                "moe::cuda::ExpertsStage: the W8A8 schemes run on the Sm90 tag (wgmma on FP8/INT8 operands) with "
                "bf16 or f16 hidden states; sm_80 has no FP8 tensor cores. Run them on the CPU backend there");
  static constexpr bool block_shape_runs() {
    if constexpr (kQuantized && Quant::kWeightScale == quant::ScaleGranularity::kBlock) {
      return Quant::kBlockN == 128 && Quant::kBlockK == 128;
    } else {
      return true;
    }
  }
  static_assert(block_shape_runs(),
                "moe::cuda::ExpertsStage: block-scaled FP8 runs with 128x128 blocks (one 128-wide K block per "
                "stage of the swap mainloop)");
  static_assert(!kQuantized || Activation::kLayout != GateUpLayout::kInterleaved || !Activation::kGated,
                "moe::cuda::ExpertsStage: the W8A8 schemes take w13 as [gate; up] halves (vLLM's layout)");
  static constexpr gemm::swap_detail::ScaleMode kScaleMode =
      !kQuantized ? gemm::swap_detail::ScaleMode::kNone
      : Quant::kWeightScale == quant::ScaleGranularity::kBlock ? gemm::swap_detail::ScaleMode::kBlockPerStage
      : Quant::kWeightScale == quant::ScaleGranularity::kPerTensor && std::is_same_v<W, float8_e4m3>
          ? gemm::swap_detail::ScaleMode::kFastAtEnd
          : gemm::swap_detail::ScaleMode::kPerRowAtEnd;
  static constexpr int kTileM = detail::kBM;  // rows per m-tile of the tile prefix
  // W8A8 decode with a static scale for GEMM2's input (FP8 per-tensor): GEMM1's epilogue stores
  // GEMM2's input codes itself, and no intermediate is stored or quantized in between (one launch
  // less: 1-4 µs off the M = 1 rows on the H200, benchmarks/NOTES.md).
  static constexpr bool kGemm1WritesCodes = [] {
    if constexpr (kQuantized) return Quant::kStaticActivations && std::is_same_v<W, float8_e4m3>;
    else return false;
  }();
  // Prefill tiles of the FP8 schemes that CUTLASS's FP8 grouped GEMMs take (gemm/sm90_fp8_gemm.h):
  // 128x128 weight blocks with 1x128 activation groups (blockwise-scaled), and per-tensor scales
  // (the scales in the epilogue). bf16 rows only (their one output instantiation); f16 and the
  // per-channel / INT8 schemes run the 64-token swap tile there.
  static constexpr bool kFp8PrefillGemm = [] {
    if constexpr (kQuantized) {
      return std::is_same_v<W, float8_e4m3> && std::is_same_v<IO, bfloat16> &&
             (Quant::kWeightScale == quant::ScaleGranularity::kBlock ||
              (Quant::kWeightScale == quant::ScaleGranularity::kPerTensor && Quant::kStaticActivations));
    } else {
      return false;
    }
  }();
  static constexpr bool kPerTensorScales = kFp8PrefillGemm && Quant::kWeightScale == quant::ScaleGranularity::kPerTensor;
  // Weight row halves of GEMM1 blocked separately (a gated w13's gate and up halves).
  static constexpr int kHalves = kMode1 == detail::ColumnMode::kGatedSplit ? 2 : 1;
  // The FP8 prefill GEMM's scaling, and its groups per expert in GEMM1: per-tensor w13 has one
  // scale for both halves (vLLM merges them at load), so its GEMM1 is one group of 2I columns.
  static constexpr gemm::Fp8GemmScales kFp8Scales =
      kPerTensorScales ? gemm::Fp8GemmScales::kPerTensor : gemm::Fp8GemmScales::kBlock128;
  static constexpr int kFp8Halves = kPerTensorScales ? 1 : kHalves;

  explicit ExpertsStage(Options options = {}) : options_(options) {}

  // Where the rows are for the GEMMs (device memory).
  struct Segments {
    const Index* seg_begin = nullptr;     // [E_local]
    const Index* seg_count = nullptr;     // [E_local]
    const Index* tile_offsets = nullptr;  // [E_local + 1] prefix of kTileM-row tiles
    const Index* row_list = nullptr;      // rows the row-wise passes visit, -1 skipped
    Index row_list_size = 0;
  };

  // The token rows the gathered input rows are copies of (the built-in kernel's prepare): row
  // slot_row[m * top_k + j] holds hidden[m] for the `tokens` tokens. The W8A8 schemes quantize
  // each token once into its slots' rows, so the prepare need not gather (takes_tokens()).
  struct TokenRows {
    const IO* hidden = nullptr;
    Index ld = 0, tokens = 0;
    int top_k = 0;
    const Index* slot_row = nullptr;
  };

  // What one call does, decided on the host from shapes alone, and its workspace regions.
  struct Plan {
    Index rows = 0;       // R
    Index live_rows = 0;  // a bound on the rows in segments (picks tiles and splits)
    bool sm90 = false;    // the Hopper schedule runs the GEMMs
    gemm::Sm90Tile tile = gemm::Sm90Tile::kNormal128x256;  // its tile (fused swap resolved)
    gemm::Fp8Tile fp8_tile = gemm::Fp8Tile::kCooperative128x256;  // the FP8 per-tensor prefill GEMM's tile
    int max_splits1 = 1, max_splits2 = 1;  // most K splits of the fused swap GEMMs (chosen on the device)
    std::size_t gemm_ws_bytes = 0;
    std::size_t inter = 0, gemm1_out = 0, gemm_ws = 0, partial = 0, splits_used = 0, total = 0;  // offsets, bytes
    std::size_t codes1 = 0, codes2 = 0, scales1 = 0, scales2 = 0;  // W8A8: GEMM inputs as codes + scales
    std::size_t k_ordered = 0;  // weight-only act-order: GEMM1's input with K in the codes' order
    bool weight_only_wgmma = false;  // weight-only: the mixed-input wgmma GEMMs run (prefill)
    bool weight_only_swap = false;   // weight-only: the TMA + wgmma swap GEMMs run (decode)
    bool swap_takes_tokens = false;  // ... gathering GEMM1's input from the token rows (no act-order)
    // GEMM2's output is stored raw (the finalize runs epilogue 2) rather than through the Sm80
    // schedule's or the register GEMM's fused epilogue.
    bool stores_raw_gemm2() const { return sm90 || weight_only_wgmma || weight_only_swap; }
  };

  // Why the Hopper schedule cannot run these experts, or nullptr (shapes, strides and alignment).
  const char* sm90_refusal(const Weights& w) const {
    if constexpr (kWeightOnly) {
      return "the weight-only schemes run their own GEMM (moe/cuda/gemm/weight_only_gemm.cuh)";
    } else if constexpr (!kMaySm90) {
      return "not selected for this architecture tag, schedule or element type";
    } else {
      const auto aligned = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; };
      if (w.w13_bias || w.w2_bias) return "expert biases are fused by the Sm80CpAsync epilogue only";
      if constexpr (kQuantized) {
        if (w.hidden() % 16 != 0 || w.intermediate() % 16 != 0) {
          return "8-bit GEMMs need hidden and intermediate sizes that are multiples of 16 (16-byte rows of codes)";
        }
        if constexpr (kScaleMode == gemm::swap_detail::ScaleMode::kBlockPerStage) {
          using namespace gemm::swap_detail;  // the widest tile's ring and one tile's scales must fit
          const auto fits = [](Index k) {
            return TileShape<64, 1>::kSmemBytes + block_scale_smem_bytes(static_cast<int>(std::min<Index>(k, 1 << 20) / 128 + 1), 64) <=
                   kMaxSmemBytes;
          };
          if (!fits(w.hidden()) || !fits(w.intermediate())) {
            return "block-scaled FP8 GEMMs keep one tile's scales in shared memory: hidden and intermediate sizes up to "
                   "about 16000";
          }
        }
        if (!gemm::swap_detail::applies(w.w13, 1) || !gemm::swap_detail::applies(w.w2, 1)) {
          return "8-bit GEMMs need packed expert weights (contiguous [E, N, K]), 16-byte aligned, at most 1024 local "
                 "experts and E * N below 2^31";
        }
      }
      if (w.hidden() % 8 != 0 || w.intermediate() % 8 != 0) return "hidden and intermediate sizes must be multiples of 8";
      if (w.w13.stride(1) % 8 != 0 || w.w13.stride(0) % 8 != 0 || w.w2.stride(1) % 8 != 0 || w.w2.stride(0) % 8 != 0 ||
          !aligned(w.w13.data()) || !aligned(w.w2.data())) {
        return "w13 and w2 need 16-byte aligned rows";
      }
      if (w.w13.extent(1) > INT32_MAX || w.hidden() > INT32_MAX) return "GEMM extents must fit int32";
      return nullptr;
    }
  }

  // `allow_sm90`: the caller's own conditions for the Hopper schedule (the built-in finalize
  // writes the output with 16-byte stores).
  Plan plan(const Weights& w, Index rows, Index live_rows, bool allow_sm90 = true) const {
    Plan l;
    l.rows = rows;
    l.live_rows = live_rows;
    const auto n = [](Index v) { return static_cast<std::size_t>(std::max<Index>(0, v)); };
    const Index E = w.num_local_experts();
    moe::detail::WorkspaceCarver<256> carver;
    l.sm90 = allow_sm90 && sm90_refusal(w) == nullptr;
    if constexpr (kQuantized) {  // codes and activation scales of both GEMMs' inputs
      const Index H = w.hidden(), I = w.intermediate();
      l.codes1 = carver.take(n(rows) * n(H) * sizeof(W));
      l.codes2 = carver.take(n(rows) * n(I) * sizeof(W));
      // The blockwise FP8 GEMM reads a scale per row and K block, whatever the scheme's groups.
      const auto groups = [](Index k) { return kFp8PrefillGemm && !kPerTensorScales ? blocks128(k) : act_scale_groups(k); };
      l.scales1 = carver.take(n(rows) * n(groups(H)) * sizeof(float));
      l.scales2 = carver.take(n(rows) * n(groups(I)) * sizeof(float));
    }
    std::size_t partial_floats = 0;
    if constexpr (!kWeightOnly) {
      if (l.sm90 && E > 0 && live_rows > 0) partial_floats = plan_sm90(w, l);
    } else {
      l.weight_only_wgmma = allow_sm90 && E > 0 && live_rows > 0 && picks_weight_only_wgmma(w, live_rows);
      l.weight_only_swap = allow_sm90 && E > 0 && live_rows > 0 && !l.weight_only_wgmma && picks_weight_only_swap(w);
      if (l.weight_only_swap) partial_floats = plan_swap_splits(w, l, weight_only_swap_tokens(l, w));
      l.swap_takes_tokens = l.weight_only_swap && !has_k_order(w);
    }
    // The stored intermediate, except where the W8A8 prefill quantizes it straight from GEMM1's
    // output (run_fp8_prefill_gemms) and where GEMM1 stores GEMM2's input codes (kGemm1WritesCodes).
    const bool fp8_block_prefill = kQuantized && l.sm90 && l.tile == gemm::Sm90Tile::kNormal128x256;
    const bool no_intermediate = fp8_block_prefill || (kGemm1WritesCodes && l.sm90 && gemm::is_fused(l.tile));
    l.inter = carver.take(no_intermediate ? 0 : n(rows) * n(w.intermediate()) * sizeof(IO));
    l.partial = carver.take(partial_floats * sizeof(float));
    l.splits_used = carver.take(partial_floats > 0 ? 2 * sizeof(int) : 0);  // GEMM1's, GEMM2's
    // CUTLASS tiles store GEMM1's raw output and need their descriptor workspace; fused swap
    // tiles write the activated intermediate directly.
    const bool cutlass_tile = l.sm90 && !gemm::is_fused(l.tile);
    l.gemm1_out = carver.take(cutlass_tile || l.weight_only_wgmma ? n(rows) * n(w.w13.extent(1)) * sizeof(IO) : 0);
    if (l.weight_only_wgmma) l.gemm_ws_bytes = weight_only_wgmma_workspace(w, rows_per_expert(l, w));
    if (cutlass_tile && E > 0) {
      l.gemm_ws_bytes = kQuantized ? gemm::sm90_fp8_gemm_workspace_bytes(kFp8Scales, static_cast<int>(E) * kFp8Halves)
                                   : gemm::sm90_grouped_gemm_workspace_bytes(static_cast<int>(E));
    }
    l.gemm_ws = carver.take(l.gemm_ws_bytes);
    if constexpr (kWeightOnly) {
      // Act-order, and the swap GEMM's K pair order (gemm::weight_only_swap::K32PairOrder).
      const bool reordered = has_k_order(w) || l.weight_only_swap;
      l.k_ordered = carver.take(reordered ? n(rows) * n(w.hidden()) * sizeof(IO) : 0);
    }
    l.total = carver.total();
    return l;
  }

  // GPTQ act-order: the codes' K is a permutation of the input's.
  static bool has_k_order(const Weights& w) {
    if constexpr (requires { w.quant.w13_k_order; }) {
      return static_cast<bool>(w.quant.w13_k_order);
    } else {
      return false;
    }
  }
  // Whether run_planned on this plan can take GEMM1's input from the token rows (TokenRows) instead
  // of gathered rows: the W8A8 schemes, whose first pass quantizes the input anyway, and the
  // weight-only swap GEMMs, whose first pass reorders it.
  static bool takes_tokens(const Plan& l) { return (kQuantized && l.sm90) || l.swap_takes_tokens; }

  // Whether a forward on this plan launches programmatically (moe/cuda/launch.h).
  bool programmatic_launch(const Plan& l) const {
    if (!kArchHasSm90) return false;
    switch (options_.programmatic_launch) {
      case ProgrammaticLaunch::kOff: return false;
      case ProgrammaticLaunch::kFusedSwapOnly: return (l.sm90 && gemm::is_fused(l.tile)) || l.weight_only_swap;
      case ProgrammaticLaunch::kEverySchedule: return true;
    }
    return false;
  }

  // output[row] = GEMM2's output of input[row] for the rows of the segments; `workspace` is
  // plan.total bytes (any alignment). With `row_weight` the Sm80 schedule multiplies GEMM2's
  // output by it (epilogue 2); *weighted says whether the rows came out weighted.
  // With `tokens` (where takes_tokens(plan)) GEMM1's input comes from the token rows and `input`
  // is not read.
  Status run_planned(const Plan& l, const Weights& w, const IO* input, IO* output, const Segments& s,
                     const float* row_weight, std::span<std::byte> workspace, cudaStream_t stream, bool* weighted,
                     const TokenRows* tokens = nullptr) const {
    *weighted = false;
    if (l.rows == 0 || w.num_local_experts() == 0) return Status::ok();
    std::byte* base = moe::detail::WorkspaceCarver<256>::aligned_base(workspace.data());
    Buffers b{static_cast<IO*>(static_cast<void*>(base + l.inter)), static_cast<IO*>(static_cast<void*>(base + l.gemm1_out)),
              base + l.gemm_ws, static_cast<float*>(static_cast<void*>(base + l.partial)),
              static_cast<int*>(static_cast<void*>(base + l.splits_used)), base + l.k_ordered};
    if constexpr (kWeightOnly) {
      return run_weight_only(l, w, input, tokens, output, s, b, row_weight, stream, weighted);
    } else if constexpr (kQuantized) {
      if (!l.sm90) {
        const char* why = sm90_refusal(w);
        return unsupported("experts (", Quant::kName, "): ", why ? why : "the output rows are not 16-byte aligned");
      }
      return run_quantized(l, w, input, tokens, output, s, b, base, stream);
    } else {
      if constexpr (kMaySm90) {
        if (l.sm90) return run_sm90(l, w, input, output, s, b, stream);
      }
      *weighted = row_weight != nullptr;
      return run_sm80(l, w, input, output, s, b, row_weight, stream);
    }
  }

  // ---- moe/stages.h's interface --------------------------------------------------------------

  std::size_t workspace_bytes(const Weights& w, const Rows& r) const { return derived_layout(w, r).total; }

  // output row r = GEMM2's output of input row r (unweighted, rounded to IO) for every row of every
  // segment; other rows are not written. Shape checks first: on an error nothing is launched.
  Status run(const Weights& w, const Rows& r, std::span<std::byte> workspace, cudaStream_t stream = nullptr) const {
    MOE_RETURN_IF_ERROR(validate_expert_rows(w, r));
    const DerivedLayout d = derived_layout(w, r);
    MOE_RETURN_IF_ERROR(check_workspace(workspace.size(), d.total));
    const Index R = r.input.extent(0), E = w.num_local_experts();
    if (R == 0) return Status::ok();
    if constexpr (kWeightOnly) {  // refused before any launch
      if (const char* why = weight_only_refusal(w)) return unsupported("experts (", Quant::kName, "): ", why);
    } else if constexpr (kQuantized) {
      if (!d.plan.sm90) {
        const char* why = sm90_refusal(w);
        return unsupported("experts (", Quant::kName, "): ", why ? why : "rows need 16-byte alignment");
      }
    }
    std::byte* base = moe::detail::WorkspaceCarver<256>::aligned_base(workspace.data());
    Segments s;
    auto* begin = static_cast<Index*>(static_cast<void*>(base + d.begin));
    auto* count = static_cast<Index*>(static_cast<void*>(base + d.count));
    auto* tiles = static_cast<Index*>(static_cast<void*>(base + d.tiles));
    auto* row_list = static_cast<Index*>(static_cast<void*>(base + d.row_list));
    detail::clamp_segments_kernel<<<1, detail::kSegmentThreads, 0, stream>>>(
        r.seg_begin.data(), r.seg_count.data(), static_cast<int>(E), R, kTileM, begin, count, tiles);
    MOE_CUDA_CHECK_LAUNCH();
    MOE_CUDA_TRY(cudaMemsetAsync(row_list, 0xFF, static_cast<std::size_t>(R) * sizeof(Index), stream));  // -1
    const Index per_expert = r.max_rows_per_expert > 0 ? r.max_rows_per_expert : R;
    const dim3 grid(static_cast<unsigned>(E), static_cast<unsigned>(std::clamp<Index>((per_expert + 255) / 256, 1, 65535)));
    detail::mark_segment_rows_kernel<<<grid, 256, 0, stream>>>(begin, count, row_list);
    MOE_CUDA_CHECK_LAUNCH();
    s.seg_begin = begin;
    s.seg_count = count;
    s.tile_offsets = tiles;
    s.row_list = row_list;
    s.row_list_size = R;
    bool weighted = false;
    return run_planned(d.plan, w, r.input.data(), r.output.data(), s, nullptr,
                       std::span<std::byte>(base + d.stage, d.plan.total), stream, &weighted);
  }

  const Options& options() const { return options_; }

  // Why the weight-only GEMM cannot run these experts, or nullptr (shapes, strides, alignment).
  const char* weight_only_refusal(const Weights& w) const {
    if constexpr (kWeightOnly) {
      namespace wo = gemm::weight_only;
      if constexpr (std::is_same_v<Quant, quant::Mxfp4> && !std::is_same_v<IO, bfloat16>) {
        return "MXFP4 runs with bf16 activations on CUDA (f16 cannot hold the E8M0 scales' range)";
      }
      const auto packed = [](const auto& b, Index n) { return !b || (b->stride(1) == 1 && b->stride(0) == n); };
      if (!packed(w.w13_bias, w.w13.extent(1)) || !packed(w.w2_bias, w.hidden())) {
        return "the weight-only GEMMs read expert biases as contiguous [E, N] tensors";
      }
      if (w.num_local_experts() > wo::kMaxExperts) return "the weight-only GEMMs take at most 1024 local experts";
      if (w.w13.stride(2) != 1 || w.w2.stride(2) != 1) return "the weight-only GEMMs need rows of contiguous codes";
      if (w.w13.stride(0) % 16 != 0 || w.w2.stride(0) % 16 != 0) return "the weight-only GEMMs need 16-byte aligned experts";
      if (w.w13.extent(1) >= INT32_MAX / 2 || w.hidden() >= INT32_MAX / 2) return "GEMM extents must fit int32";
      if (const char* why = wo::refusal(w.hidden(), w.w13.stride(1), w.w13.data(), Quant::kBits)) return why;
      return wo::refusal(w.intermediate(), w.w2.stride(1), w.w2.data(), Quant::kBits);
    } else {
      return "not a weight-only scheme";
    }
  }

 private:
  struct Buffers {
    IO* inter;      // activated GEMM1 output [R, I]
    IO* gemm1_out;  // CUTLASS tiles: GEMM1's raw output [R, gemm1 width]
    std::byte* gemm_ws;
    float* partial;    // fused swap split-K partial sums
    int* splits_used;  // [2]: the split counts the fused swap GEMMs chose
    std::byte* k_ordered;  // weight-only act-order: GEMM1's input, K permuted
  };
  struct DerivedLayout {
    Plan plan;
    std::size_t begin, count, tiles, row_list, stage, total;
  };

  static bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

  DerivedLayout derived_layout(const Weights& w, const Rows& r) const {
    const Index R = r.input.extent(0), E = w.num_local_experts();
    const Index per_expert = r.max_rows_per_expert > 0 ? r.max_rows_per_expert : R;
    DerivedLayout d;
    // The Hopper schedule reads and writes the rows with 16-byte accesses.
    const bool rows_aligned = aligned16(r.input.data()) && aligned16(r.output.data());
    d.plan = plan(w, R, std::min(R, per_expert * std::max<Index>(1, E)), rows_aligned);
    const auto n = [](Index v) { return static_cast<std::size_t>(std::max<Index>(0, v)); };
    moe::detail::WorkspaceCarver<256> carver;
    d.begin = carver.take(n(E) * sizeof(Index));
    d.count = carver.take(n(E) * sizeof(Index));
    d.tiles = carver.take((n(E) + 1) * sizeof(Index));
    d.row_list = carver.take(n(R) * sizeof(Index));
    d.stage = carver.take(d.plan.total);
    d.total = carver.total();
    return d;
  }

  // The Hopper tile (the pinned one, else the table's; a fused swap tile falls back to CUTLASS's
  // where our mainloop does not apply) and, for fused swap tiles, the most K splits each GEMM may
  // choose on the device. Returns the floats of split-K partial sums the workspace needs.
  std::size_t plan_sm90(const Weights& w, Plan& l) const {
    using namespace gemm;
    const Index S = l.live_rows, E = w.num_local_experts();
    Sm90Tile tile = options_.sm90_tile ? *options_.sm90_tile
                                       : sm90_tile_for(static_cast<double>(S) / static_cast<double>(E), w.hidden());
    if constexpr (kQuantized) {
      if (is_prefill(tile) && fp8_prefill_gemm_applies(w)) {
        l.tile = Sm90Tile::kNormal128x256;  // CUTLASS's FP8 grouped GEMMs (gemm/sm90_fp8_gemm.h), their own tiles:
        // the per-tensor table's, or the pinned prefill tile's nearest (tests, tuning runs).
        l.fp8_tile = !options_.sm90_tile ? fp8_tensor_tile_for(static_cast<double>(S) / static_cast<double>(E),
                                                               w.hidden(), w.intermediate())
                     : tile == Sm90Tile::kPingpong64x256 ? Fp8Tile::kPingpong64x256
                                                         : Fp8Tile::kCooperative128x256;
        return 0;
      }
      // Elsewhere our swap mainloop takes the 8-bit operands: the nearest fused tile.
      tile = tile == Sm90Tile::kSwap128x16 || tile == Sm90Tile::kFusedSwap128x16   ? Sm90Tile::kFusedSwap128x16
             : tile == Sm90Tile::kSwap128x32 || tile == Sm90Tile::kFusedSwap128x32 ? Sm90Tile::kFusedSwap128x32
                                                                                   : Sm90Tile::kFusedSwap128x64;
    } else if (is_fused(tile)) {
      const bool applies = swap_detail::applies(w.w13, l.rows) &&
                           swap_detail::applies(w.w2, l.rows);
      if (!applies) tile = unfused(tile);
    }
    l.tile = tile;
    if (!is_fused(tile)) return 0;
    return plan_swap_splits(w, l, tile == Sm90Tile::kFusedSwap128x16 ? 16 : tile == Sm90Tile::kFusedSwap128x32 ? 32 : 64);
  }

  // The most K splits each swap GEMM (the fused tiles, the weight-only swap GEMM) may choose on
  // the device, with `tokens` per tile. Returns the floats of split-K partial sums the workspace needs.
  std::size_t plan_swap_splits(const Weights& w, Plan& l, int tokens) const {
    const Index S = l.live_rows, E = w.num_local_experts();
    constexpr bool kGated = kMode1 != detail::ColumnMode::kPlain;
    const Index H = w.hidden(), I = w.intermediate();
    // The bound is memory: split-K pays where few tiles leave SMs idle (decode, few rows), and the
    // partial sums of many rows would cost more workspace than the tail they fill.
    constexpr std::size_t kMaxPartialFloats = std::size_t{8} << 20;  // 32 MiB per GEMM
    const auto most_splits = [&](Index width) {
      const std::size_t per_split = static_cast<std::size_t>(l.rows) * static_cast<std::size_t>(width);
      const std::size_t fit = per_split > 0 ? kMaxPartialFloats / per_split : 1;
      return static_cast<int>(std::clamp<std::size_t>(fit, 1, static_cast<std::size_t>(std::max(1, options_.max_k_splits))));
    };
    l.max_splits1 = most_splits((kGated ? 2 : 1) * I);
    l.max_splits2 = most_splits(H);
    // The device splits only where the tiles leave half the CTAs idle (best_fill_splits). Where the
    // host's upper bound on the tiles rules that out, no reduction
    // is launched: an idle one between the GEMMs would still hold GEMM2's early weight prefetch back
    // until GEMM1 ends (2-20 µs on the decode rows).
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      sms = 0;  // no split; run reports the device error
    }
    const Index tiles_per_n_tile = std::min(E, S) + S / tokens;  // >= sum over experts of ceil(rows / tokens)
    const auto may_split = [&](Index n_tiles) { return 2 * n_tiles * tiles_per_n_tile < sms; };
    if (!may_split((I + (kGated ? 63 : 127)) / (kGated ? 64 : 128))) l.max_splits1 = 1;
    if (!may_split((H + 127) / 128)) l.max_splits2 = 1;
    const auto floats = [&](int splits, Index width) {
      return splits > 1 ? static_cast<std::size_t>(splits) * static_cast<std::size_t>(l.rows) * static_cast<std::size_t>(width) : 0;
    };
    return std::max(floats(l.max_splits1, (kGated ? 2 : 1) * I), floats(l.max_splits2, H));
  }

  Status run_sm90(const Plan& l, const Weights& w, const IO* input, IO* output, const Segments& s, const Buffers& b,
                  cudaStream_t stream) const {
    using namespace gemm;
    const bool pdl = programmatic_launch(l);
    const Index H = w.hidden(), I = w.intermediate(), N1 = w.w13.extent(1);
    const auto nothing_between = [] { return Status::ok(); };
    switch (l.tile) {
      case Sm90Tile::kFusedSwap128x16:
        return run_fused_swap<16, 1>(l, w, input, {}, b.inter, {}, output, s, b, pdl, stream, nothing_between, b.inter);
      case Sm90Tile::kFusedSwap128x32:
        return run_fused_swap<32, 1>(l, w, input, {}, b.inter, {}, output, s, b, pdl, stream, nothing_between, b.inter);
      case Sm90Tile::kFusedSwap128x64:
        return run_fused_swap<64, 1>(l, w, input, {}, b.inter, {}, output, s, b, pdl, stream, nothing_between, b.inter);
      default: break;
    }
    const std::span<std::byte> ws(b.gemm_ws, l.gemm_ws_bytes);
    // out[rows, n] = in[rows, k] x w[e]^T over the expert segments.
    const auto grouped_gemm = [&](const IO* in, Index k, DeviceView<const IO, 3> wt, IO* out, Index n) {
      Sm90GroupedGemmArgs g;
      g.element = std::is_same_v<IO, bfloat16> ? Element16::kBF16 : Element16::kF16;
      g.num_groups = static_cast<int>(w.num_local_experts());
      g.seg_begin = s.seg_begin;
      g.seg_count = s.seg_count;
      g.n = n;
      g.k = k;
      g.a = in;
      g.lda = k;
      g.w = wt.data();
      g.w_group_stride = wt.stride(0);
      g.ldw = wt.stride(1);
      g.d = out;
      g.ldd = n;
      return sm90_grouped_gemm(g, l.tile, ws, stream);
    };
    MOE_RETURN_IF_ERROR(grouped_gemm(input, H, w.w13, b.gemm1_out, N1));
    MOE_RETURN_IF_ERROR(activate_gemm1_out(w, s, b, pdl, stream));
    return grouped_gemm(b.inter, I, w.w2, output, H);
  }

  // GEMM1's stored output columns as activate8 reads them (stages.cuh).
  static constexpr int kActivationLayout =
      kMode1 == detail::ColumnMode::kPlain ? 0 : kMode1 == detail::ColumnMode::kGatedSplit ? 1 : 2;
  using Gemm1Expr = epilogue::Gemm1EpilogueOfStored<Activation, IO>;

  // The activation pass of the CUTLASS tiles: GEMM1's raw output rows -> the intermediate.
  Status activate_gemm1_out(const Weights& w, const Segments& s, const Buffers& b, bool pdl, cudaStream_t stream) const {
    return detail::launch_kernel(&detail::activation_kernel<IO, Gemm1Expr, Activation, kActivationLayout>,
                                 static_cast<unsigned>(s.row_list_size), 128, 0, stream, pdl, b.gemm1_out,
                                 w.w13.extent(1), w.intermediate(), s.row_list, w.activation, b.inter);
  }

  // Our swap mainloop: GEMM1 over `x1` with the activation fused, stored into `out1` (the
  // intermediate rows; or, Out1 = W, GEMM2's input codes at the static scale `out1_scale`), then
  // `between` (the dynamic W8A8 schemes quantize the intermediate into `x2`), then GEMM2 over `x2`,
  // stored raw. Unquantized: x1 = input, x2 = out1 = the intermediate, no scales.
  template <int kTokens, int kAtoms, class Between, class Out1>
  Status run_fused_swap(const Plan& l, const Weights& w, const W* x1, const gemm::swap_detail::SwapScales& scales1,
                        const W* x2, const gemm::swap_detail::SwapScales& scales2, IO* output, const Segments& s,
                        const Buffers& b, bool pdl, cudaStream_t stream, Between&& between, Out1* out1,
                        const float* out1_scale = nullptr) const {
    using namespace gemm;
    constexpr bool kGated = kMode1 != detail::ColumnMode::kPlain;  // either gate/up layout (the Activation's)
    using Tree1 = epilogue::Gemm1Epilogue<Activation, IO, false>;
    using Expr1 = std::conditional_t<std::is_same_v<Out1, IO>, Tree1, swap_detail::QuantizedOutput<Quant, Tree1>>;
    using Expr2 = epilogue::detail::Stored<IO, false, epilogue::Part::kAll>;
    const Index H = w.hidden(), I = w.intermediate();
    MOE_RETURN_IF_ERROR((swap_detail::launch<W, Out1, kTokens, kAtoms, kGated, kScaleMode, Expr1, Activation>(
        w.w13, x1, l.rows, s.seg_begin, s.seg_count, I, out1, I, w.activation, scales1, l.max_splits1, b.partial,
        b.splits_used, s.row_list, s.row_list_size, pdl, stream, out1_scale)));
    MOE_RETURN_IF_ERROR(between());
    return swap_detail::launch<W, IO, kTokens, kAtoms, false, kScaleMode, Expr2, Activation>(
        w.w2, x2, l.rows, s.seg_begin, s.seg_count, H, output, H, w.activation, scales2, l.max_splits2, b.partial,
        b.splits_used + 1, s.row_list, s.row_list_size, pdl, stream);
  }

  // ---- the weight-only schemes ------------------------------------------------------------------

  // GEMM1 (activation fused) into the intermediate, then GEMM2 with epilogue 2 (times `row_weight`
  // when given, as the Sm80 schedule). One or two n8 token tiles per pass, from the host's bound on
  // the rows per expert.
  Status run_weight_only(const Plan& l, const Weights& w, const IO* input, const TokenRows* tokens, IO* output,
                         const Segments& s, const Buffers& b, const float* row_weight, cudaStream_t stream,
                         bool* weighted) const {
    if constexpr (kWeightOnly) {
      namespace wo = gemm::weight_only;
      if (const char* why = weight_only_refusal(w)) return unsupported("experts (", Quant::kName, "): ", why);
      const Index H = w.hidden(), I = w.intermediate(), E = w.num_local_experts();
      if (l.weight_only_wgmma) {
        *weighted = false;
        return run_weight_only_wgmma(l, w, input, output, s, b, stream);
      }
      if (l.weight_only_swap) {
        *weighted = false;
        return run_weight_only_swap(l, w, input, tokens, output, s, b, stream);
      }
      *weighted = row_weight != nullptr;
      constexpr bool kInterleaved = kMode1 == detail::ColumnMode::kGatedInterleaved;
      constexpr bool kGated = kMode1 != detail::ColumnMode::kPlain;
      const auto params = [&](DeviceView<const W, 3> wt, const auto& scale, const IO* x, Index k, Index n_out, bool gated,
                              const auto& bias, IO* out) {
        wo::Params p{};
        p.w = wt.data();
        p.w_expert_stride = wt.stride(0);
        p.w_row_stride = wt.stride(1);
        Index group = quant::Mxfp4::kBlock;
        if constexpr (!kFp4) group = w.quant.group_size > 0 ? w.quant.group_size : k;
        if constexpr (kFp4) p.scale_e8m0 = scale.data();
        else p.scale = scale.data();
        p.group_size = static_cast<int>(group);
        p.groups = static_cast<int>((k + group - 1) / group);
        p.n_total = wt.extent(1);
        p.x = x;
        p.seg_begin = s.seg_begin;
        p.seg_count = s.seg_count;
        p.num_experts = static_cast<int>(E);
        p.k = static_cast<int>(k);
        p.n_out = static_cast<int>(n_out);
        p.gate_stride = gated && kInterleaved ? 2 : 1;
        p.gate_up_offset = !gated ? 0 : kInterleaved ? 1 : static_cast<int>(n_out);
        p.bias = bias ? bias->data() : nullptr;
        p.out = out;
        p.ldo = n_out;
        return p;
      };
      // The biases' epilogues: they add 0 where the experts have none.
      using Expr1 = epilogue::Gemm1Epilogue<Activation, IO, true>;
      using Stored2 = epilogue::Gemm2Epilogue<IO, true, false>;
      using Weighted2 = epilogue::Gemm2Epilogue<IO, true, true>;
      MOE_RETURN_IF_ERROR(order_k_if_act_order(l, w, s, b, stream, &input));
      wo::Params p1 = params(w.w13, w.quant.w13_scale, input, H, I, kGated, w.w13_bias, b.inter);
      wo::Params p2 = params(w.w2, w.quant.w2_scale, b.inter, I, H, false, w.w2_bias, output);
      unsigned default_zero = 0;
      if constexpr (!kFp4) {
        p1.zero = w.quant.w13_zero ? w.quant.w13_zero->data() : nullptr;
        p2.zero = w.quant.w2_zero ? w.quant.w2_zero->data() : nullptr;
        default_zero = Quant::kDefaultZero;
        p1.code_flip = p2.code_flip = w.quant.signed_codes ? 0x01010101u * Quant::kSignFlipByte : 0u;
      }
      p2.row_weight = row_weight;
      const auto both = [&]<int kN8>() -> Status {
        MOE_RETURN_IF_ERROR((wo::launch<IO, Quant::kBits, kFp4, kN8, kGated, Expr1, Activation>(p1, default_zero, w.activation,
                                                                                                l.rows, stream)));
        if (row_weight != nullptr) {
          return wo::launch<IO, Quant::kBits, kFp4, kN8, false, Weighted2, Activation>(p2, default_zero, w.activation,
                                                                                       l.rows, stream);
        }
        return wo::launch<IO, Quant::kBits, kFp4, kN8, false, Stored2, Activation>(p2, default_zero, w.activation, l.rows,
                                                                                   stream);
      };
      if constexpr (kFp4 && !std::is_same_v<IO, bfloat16>) {
        return unsupported("experts (mxfp4): ", weight_only_refusal(w));  // bf16 only; never launched
      } else {
        if (l.live_rows <= 8 * E) return both.template operator()<1>();
        return both.template operator()<2>();
      }
    } else {
      return unsupported("not a weight-only scheme");
    }
  }

  // Act-order: GEMM1 reads the input with K in the codes' order (a permuted copy in the workspace).
  Status order_k_if_act_order(const Plan& l, const Weights& w, const Segments& s, const Buffers& b, cudaStream_t stream,
                              const IO** input) const {
    if constexpr (requires { w.quant.w13_k_order; }) {
      if (w.quant.w13_k_order) {
        IO* ordered = static_cast<IO*>(static_cast<void*>(b.k_ordered));
        MOE_RETURN_IF_ERROR(gemm::weight_only::order_k(*input, w.quant.w13_k_order->data(), s.seg_begin, s.seg_count,
                                                       static_cast<int>(w.num_local_experts()),
                                                       static_cast<int>(w.hidden()), l.rows, ordered, stream));
        *input = ordered;
      }
    }
    return Status::ok();
  }

  // The mixed-input wgmma GEMM (moe/cuda/gemm/sm90_weight_only_gemm.h): prefill on sm_90a, bf16
  // rows, 4-bit integer codes (offset or two's-complement; MXFP4's 32-wide scale groups are
  // narrower than its K tile), expert biases fused.
  static constexpr bool kWeightOnlyWgmma = [] {
    if constexpr (kWeightOnly && kArchHasSm90 && std::is_same_v<IO, bfloat16>) {
      return Quant::kBits == 4 && !std::is_same_v<Quant, quant::Mxfp4>;
    } else {
      return false;
    }
  }();
  gemm::Sm90WeightOnlyCodes weight_only_codes(const Weights& w) const {
    if constexpr (kWeightOnlyWgmma) {
      return w.quant.signed_codes ? gemm::Sm90WeightOnlyCodes::kTwosComplement : gemm::Sm90WeightOnlyCodes::kOffset;
    } else {
      return gemm::Sm90WeightOnlyCodes::kOffset;
    }
  }
  // Its arguments for GEMM1 (w13) or GEMM2 (w2), the rows and output from the call.
  gemm::Sm90WeightOnlyGemmArgs weight_only_wgmma_args(const Weights& w, bool gemm1, Index rows_per_expert,
                                                      const IO* x, const Segments* s, IO* out) const {
    gemm::Sm90WeightOnlyGemmArgs a;
    if constexpr (kWeightOnlyWgmma) {
      const DeviceView<const W, 3> wt = gemm1 ? w.w13 : w.w2;
      const auto& bias = gemm1 ? w.w13_bias : w.w2_bias;
      const Index k = gemm1 ? w.hidden() : w.intermediate();
      a.num_experts = static_cast<int>(wt.extent(0));
      a.n = wt.extent(1);
      a.k = k;
      a.a = x;
      a.lda = k;
      a.seg_begin = s ? s->seg_begin : nullptr;
      a.seg_count = s ? s->seg_count : nullptr;
      a.w = wt.data();
      a.w_expert_stride = wt.stride(0);
      a.ldw = wt.stride(1);
      a.scale = (gemm1 ? w.quant.w13_scale : w.quant.w2_scale).data();
      const auto& zero = gemm1 ? w.quant.w13_zero : w.quant.w2_zero;
      a.zero = zero ? zero->data() : nullptr;
      a.default_zero = Quant::kDefaultZero;
      a.signed_codes = w.quant.signed_codes;
      a.group_size = w.quant.group_size;
      a.bias = bias ? bias->data() : nullptr;
      a.d = out;
      a.ldd = a.n;
      a.rows_per_expert = rows_per_expert;
    }
    return a;
  }

  // Whether the weight-only experts run the mixed-input wgmma GEMMs (`live_rows`: the host's bound
  // on the rows). Shapes, strides and alignment of the weights; the rows' alignment is the
  // caller's (plan's allow_sm90).
  bool picks_weight_only_wgmma(const Weights& w, Index live_rows) const {
    if constexpr (kWeightOnlyWgmma) {
      if (options_.weight_only_gemm != WeightOnlyGemm::kAuto && options_.weight_only_gemm != WeightOnlyGemm::kMixedInputWgmma) {
        return false;
      }
      const double switch_rows = picks_weight_only_swap(w) ? weight_only_swap_rows_per_expert
                                                           : weight_only_wgmma_rows_per_expert(w.quant.signed_codes);
      if (options_.weight_only_gemm == WeightOnlyGemm::kAuto &&
          static_cast<double>(live_rows) < switch_rows * static_cast<double>(w.num_local_experts())) {
        return false;
      }
      if (weight_only_refusal(w)) return false;
      // Stand-in operands: 16-byte aligned, never read (the rows are checked by the caller).
      const auto* aligned = reinterpret_cast<const IO*>(w.w13.data());
      const auto* seg = reinterpret_cast<const Index*>(aligned);
      const Segments stand_in{seg, seg, seg, seg, 0};
      IO* out = const_cast<IO*>(aligned);
      return !gemm::sm90_weight_only_gemm_refusal(weight_only_wgmma_args(w, true, 0, aligned, &stand_in, out)) &&
             !gemm::sm90_weight_only_gemm_refusal(weight_only_wgmma_args(w, false, 0, aligned, &stand_in, out));
    } else {
      return false;
    }
  }

  // The host's estimate of the rows per local expert (picks the mixed-input GEMM's token tile).
  static Index rows_per_expert(const Plan& l, const Weights& w) {
    return (l.live_rows + w.num_local_experts() - 1) / std::max<Index>(1, w.num_local_experts());
  }

  std::size_t weight_only_wgmma_workspace(const Weights& w, Index rows_per_expert) const {
    if constexpr (kWeightOnlyWgmma) {
      const int E = static_cast<int>(w.num_local_experts());
      const Index g = w.quant.group_size;
      const auto codes = weight_only_codes(w);
      return std::max(gemm::sm90_weight_only_gemm_workspace_bytes(E, w.w13.extent(1), w.hidden(), g, rows_per_expert, codes),
                      gemm::sm90_weight_only_gemm_workspace_bytes(E, w.hidden(), w.intermediate(), g, rows_per_expert, codes));
    } else {
      return 0;
    }
  }

  // The weight-only swap GEMM (moe/cuda/gemm/sm90_weight_only_swap.cuh): decode on sm_90a, bf16
  // rows, 4-bit integer codes without zero points or MXFP4, either w13 layout, expert biases fused.
  static constexpr bool kWeightOnlySwap = [] {
    if constexpr (kWeightOnly && kArchHasSm90 && std::is_same_v<IO, bfloat16>) {
      return Quant::kBits == 4;
    } else {
      return false;
    }
  }();
  // Token tile of the swap GEMMs: a tile larger than an expert's rows reads its codes once, a tile
  // smaller reads them once per tile, and a larger tile's rows take ring stages. 8 where the
  // experts average at most 4 rows (two stages more in the ring than 16: 3-9% faster decode on the
  // H200), 16 up to 8 (at an average of 8 rows, 8-token tiles made DeepSeek and gpt-oss M = 256
  // 25-35% slower), else 32 (mixtral M = 64, 16 rows on average: with 16-token tiles the ~40% of
  // experts over 16 rows read their codes twice). MXFP4 above 32 (prefill: the mixed-input GEMM
  // takes no E8M0 groups) converts its codes once per 64 tokens, above 96 once per 128, each
  // warpgroup taking 64 of the tile's rows (H200, gpt-oss M = 16384: 12439 µs with 64-token tiles
  // as a weight half per warpgroup, 11120 with paired rows, 9578 with 128; benchmarks/NOTES.md,
  // "MXFP4 prefill").
  static int weight_only_swap_tokens(const Plan& l, const Weights& w) {
    const Index rows = rows_per_expert(l, w);
    return rows <= 4 ? 8 : rows <= 8 ? 16 : !kFp4 || rows <= 32 ? 32 : rows <= 96 ? 64 : 128;
  }

  static constexpr bool kFp4 = std::is_same_v<Quant, quant::Mxfp4>;
  // K per scale group of a weight with reduction length k (k: per channel).
  static Index swap_group_size(const Weights& w, Index k) {
    if constexpr (kFp4) {
      return quant::Mxfp4::kBlock;
    } else {
      return w.quant.group_size > 0 ? w.quant.group_size : k;
    }
  }

  // Whether the weight-only experts run the swap GEMMs (the caller has ruled the mixed-input
  // wgmma GEMMs out): the option, then the weights' scheme variant, shapes, strides and alignment.
  bool picks_weight_only_swap(const Weights& w) const {
    if constexpr (kWeightOnlySwap) {
      if (options_.weight_only_gemm != WeightOnlyGemm::kAuto && options_.weight_only_gemm != WeightOnlyGemm::kSwapWgmma) {
        return false;
      }
      if (weight_only_refusal(w)) return false;
      if constexpr (!kFp4) {
        if (w.quant.w13_zero || w.quant.w2_zero) return false;
      }
      if (kMode1 == detail::ColumnMode::kGatedInterleaved && w.w13.extent(1) % 2 != 0) return false;
      const auto refused = [&](DeviceView<const W, 3> wt, Index k) {
        return gemm::weight_only_swap::refusal(wt.extent(0), wt.extent(1), k, wt.stride(0), wt.stride(1), wt.data(),
                                               swap_group_size(w, k), 0) != nullptr;
      };
      return !refused(w.w13, w.hidden()) && !refused(w.w2, w.intermediate());
    } else {
      return false;
    }
  }

  // Decode on the swap GEMMs: GEMM1's input reordered to the GEMMs' K pair order, GEMM1 with the
  // activation fused into the intermediate (stored in that order), GEMM2 stored raw (the finalize
  // applies the router weights); K split on the device where tiles are few.
  Status run_weight_only_swap(const Plan& l, const Weights& w, const IO* input, const TokenRows* tokens, IO* output,
                              const Segments& s, const Buffers& b, cudaStream_t stream) const {
    if constexpr (kWeightOnlySwap) {
      namespace ws = gemm::weight_only_swap;
      constexpr bool kGated = kMode1 != detail::ColumnMode::kPlain;
      constexpr bool kInterleaved = kMode1 == detail::ColumnMode::kGatedInterleaved;
      // The GEMMs add the expert biases to the accumulators themselves (SwapParams::bias).
      using Expr1 = epilogue::Gemm1Epilogue<Activation, IO, false>;
      using Expr2 = epilogue::detail::Stored<IO, false, epilogue::Part::kAll>;
      // GEMM1's input with K in the swap GEMM's pair order (and the codes' order under act-order):
      // gathered from the token rows where given, else reordered from the gathered rows.
      const bool pdl = programmatic_launch(l);
      IO* ordered = static_cast<IO*>(static_cast<void*>(b.k_ordered));
      if (tokens != nullptr) {
        MOE_RETURN_IF_ERROR(ws::gather_pair_order(tokens->hidden, tokens->ld, tokens->tokens, tokens->top_k,
                                                  tokens->slot_row, w.hidden(), ordered, pdl, stream));
      } else {
        const std::int32_t* k_order = nullptr;
        if constexpr (requires { w.quant.w13_k_order; }) k_order = w.quant.w13_k_order ? w.quant.w13_k_order->data() : nullptr;
        MOE_RETURN_IF_ERROR((gemm::weight_only::order_k<IO, ws::K32PairOrder>(
            input, k_order, s.seg_begin, s.seg_count, static_cast<int>(w.num_local_experts()), static_cast<int>(w.hidden()),
            l.rows, ordered, stream)));
      }
      const auto args = [&](DeviceView<const W, 3> wt, const auto& scale, const auto& bias, Index k, const IO* x,
                            Index n_out, IO* out, int max_splits, int* splits_used, bool pair_order_out) {
        ws::Args a;
        a.codes = wt.data();
        a.experts = wt.extent(0);
        a.n_total = wt.extent(1);
        a.k = k;
        a.row_stride = wt.stride(1);
        a.group_size = swap_group_size(w, k);
        if constexpr (kFp4) {
          a.scale_e8m0 = scale.data();
        } else {
          a.scale = scale.data();
          a.signed_codes = w.quant.signed_codes;
          a.default_zero = Quant::kDefaultZero;
        }
        a.bias = bias ? bias->data() : nullptr;
        a.x = x;
        a.num_rows = l.rows;
        a.seg_begin = s.seg_begin;
        a.seg_count = s.seg_count;
        a.n_out = n_out;
        a.out = out;
        a.ldo = n_out;
        a.max_splits = max_splits;
        a.partial = b.partial;
        a.splits_used = splits_used;
        a.slot_row = s.row_list;
        a.num_slots = s.row_list_size;
        a.k32_pair_order_out = pair_order_out;
        return a;
      };
      const Index H = w.hidden(), I = w.intermediate();
      const auto both = [&]<int kTokens>() -> Status {
        MOE_RETURN_IF_ERROR((ws::launch<kTokens, kGated, kInterleaved, kFp4, Expr1, Activation>(
            args(w.w13, w.quant.w13_scale, w.w13_bias, H, ordered, I, b.inter, l.max_splits1, b.splits_used, true),
            w.activation, pdl, stream)));
        return ws::launch<kTokens, false, false, kFp4, Expr2, Activation>(
            args(w.w2, w.quant.w2_scale, w.w2_bias, I, b.inter, H, output, l.max_splits2, b.splits_used + 1, false),
            w.activation, pdl, stream);
      };
      switch (weight_only_swap_tokens(l, w)) {
        case 8:
          return both.template operator()<8>();
        case 16:
          return both.template operator()<16>();
        case 64:
          if constexpr (kFp4) return both.template operator()<64>();  // MXFP4's prefill only
          [[fallthrough]];
        case 128:
          if constexpr (kFp4) return both.template operator()<128>();
          [[fallthrough]];
        default:
          return both.template operator()<32>();
      }
    } else {
      return unsupported("the weight-only swap GEMM does not take this scheme");
    }
  }

  // Prefill on the mixed-input wgmma GEMM: GEMM1 stored (its bias added), the activation pass,
  // GEMM2 stored (its bias added; unweighted: the finalize applies the router weights). The workspace's transposed scales are
  // rewritten per GEMM (stream order keeps GEMM1's until it is done).
  Status run_weight_only_wgmma(const Plan& l, const Weights& w, const IO* input, IO* output, const Segments& s,
                               const Buffers& b, cudaStream_t stream) const {
    if constexpr (kWeightOnlyWgmma) {
      MOE_RETURN_IF_ERROR(order_k_if_act_order(l, w, s, b, stream, &input));
      const std::span<std::byte> ws(b.gemm_ws, l.gemm_ws_bytes);
      const Index rows_per_expert = ExpertsStage::rows_per_expert(l, w);
      MOE_RETURN_IF_ERROR(gemm::sm90_weight_only_gemm(
          weight_only_wgmma_args(w, true, rows_per_expert, input, &s, b.gemm1_out), ws, stream));
      MOE_RETURN_IF_ERROR(activate_gemm1_out(w, s, b, false, stream));
      return gemm::sm90_weight_only_gemm(weight_only_wgmma_args(w, false, rows_per_expert, b.inter, &s, output), ws,
                                         stream);
    } else {
      return unsupported("experts (", Quant::kName, "): the mixed-input wgmma GEMM takes 4-bit codes and bf16 rows");
    }
  }

  // ---- the W8A8 schemes -------------------------------------------------------------------------

  // 128x128 scale blocks of a weight with `halves` * n rows (each half blocked separately) and k
  // columns, per expert.
  static Index blocks128(Index extent) { return (extent + gemm::kFp8ScaleBlock - 1) / gemm::kFp8ScaleBlock; }
  static Index w13_scale_blocks(Index n, Index k) { return kHalves * blocks128(n) * blocks128(k); }
  static Index w2_scale_blocks(Index n, Index k) { return blocks128(n) * blocks128(k); }

  // Whether the prefill GEMMs can run CUTLASS's FP8 kernels on these weights: block scales stored
  // packed per expert, or per-tensor ones. The codes' conditions (16-byte rows, packed experts)
  // are sm90_refusal's.
  bool fp8_prefill_gemm_applies(const Weights& w) const {
    if constexpr (!kFp8PrefillGemm) {
      return false;
    } else if constexpr (kPerTensorScales) {
      return true;
    } else {
      const auto packed = [](DeviceView<const float, 3> v, Index blocks) {
        return v.stride(2) == 1 && v.stride(1) == v.extent(2) && v.extent(1) * v.extent(2) == blocks;
      };
      return packed(w.quant.w13_scale, w13_scale_blocks(w.intermediate(), w.hidden())) &&
             packed(w.quant.w2_scale, w2_scale_blocks(w.hidden(), w.intermediate()));
    }
  }

  // Activation scale groups of a row of k columns: K blocks for per-group scales, else one (a
  // static scheme's one is not stored, but the region stays simple).
  static Index act_scale_groups(Index k) { return Quant::kActScale == quant::ScaleGranularity::kGroup ? Quant::k_blocks(k) : 1; }

  // The scales of one GEMM: weights `ws` ([E, scale rows, scale cols]), `half` rows per half of a
  // gated w13 (0 otherwise); activations per row in `xs` ([groups][rows]) or the static `fixed`.
  gemm::swap_detail::SwapScales swap_scales(DeviceView<const float, 3> ws, Index half, const float* xs, Index rows,
                                            const float* fixed) const {
    gemm::swap_detail::SwapScales sc;
    sc.w = ws.data();
    sc.w_rows = static_cast<int>(ws.extent(1));
    sc.w_cols = static_cast<int>(ws.extent(2));
    sc.w_row_block = Quant::kWeightScale == quant::ScaleGranularity::kBlock        ? Quant::kBlockN
                     : Quant::kWeightScale == quant::ScaleGranularity::kPerChannel ? 1
                                                                                   : 0;
    sc.w_half = Quant::kWeightScale == quant::ScaleGranularity::kBlock ? static_cast<int>(half) : 0;
    if constexpr (Quant::kStaticActivations) {
      sc.x = fixed;
      sc.x_block_stride = 0;
      sc.x_row_step = 0;
    } else {
      sc.x = xs;
      sc.x_block_stride = rows;
      sc.x_row_step = 1;
    }
    return sc;
  }

  // Codes and scales of GEMM1's input rows: from the token rows where given (one read and one
  // quantization per token, written to each of its slots' rows), else from the gathered rows.
  Status quantize_input(const IO* input, const TokenRows* tokens, Index H, const Segments& s, W* codes,
                        quant_detail::ScaleLayout scales, const float* static_scale, bool pdl, cudaStream_t stream) const {
    if (tokens) {
      return quant_detail::quantize_rows<Quant>(quant_detail::StoredRows<IO>{tokens->hidden, tokens->ld},
                                                quant_detail::TokenSlots{tokens->slot_row, tokens->top_k}, H,
                                                tokens->tokens, codes, scales, static_scale, pdl, stream);
    }
    return quant_detail::quantize_rows<Quant>(quant_detail::StoredRows<IO>{input, H},
                                              quant_detail::ListedRows{s.row_list}, H, s.row_list_size, codes, scales,
                                              static_scale, pdl, stream);
  }

  // K atoms (128-wide blocks) per stage of the 8-bit decode tiles. The mainloop takes two for FP8
  // (one set of promoted sums per atom, so the per-stage wait is paid once per 32 KiB of
  // weights), but on the H200 that was 1% faster on deepseek and gpt-oss decode and 10-18% slower
  // on qwen3's (half as many stages in the ring for its short K loops): one (benchmarks/NOTES.md).
  // INT8 and FP8 per-tensor must run one: they sum every atom into one set (int32, or FP8 fast
  // accumulation), and an atom past K is not loaded.
  static constexpr int kQuantAtoms = 1;
  // Quantize the rows -> 8-bit GEMM1 (activation fused) -> quantize the intermediate -> 8-bit GEMM2.
  Status run_quantized(const Plan& l, const Weights& w, const IO* input, const TokenRows* tokens, IO* output,
                       const Segments& s, const Buffers& b, std::byte* base, cudaStream_t stream) const {
    if constexpr (kFp8PrefillGemm) {
      if (l.tile == gemm::Sm90Tile::kNormal128x256) return run_fp8_prefill_gemms(l, w, input, tokens, output, s, b, base, stream);
    }
    const bool pdl = programmatic_launch(l);
    const Index H = w.hidden(), I = w.intermediate(), R = l.rows;
    auto* codes1 = static_cast<W*>(static_cast<void*>(base + l.codes1));
    auto* codes2 = static_cast<W*>(static_cast<void*>(base + l.codes2));
    auto* scales1 = static_cast<float*>(static_cast<void*>(base + l.scales1));
    auto* scales2 = static_cast<float*>(static_cast<void*>(base + l.scales2));
    const float* a13 = nullptr;
    const float* a2 = nullptr;
    if constexpr (Quant::kStaticActivations) {
      a13 = w.quant.a13_scale->data();
      a2 = w.quant.a2_scale->data();
    }
    MOE_RETURN_IF_ERROR(quantize_input(input, tokens, H, s, codes1, {scales1, R, 1}, a13, pdl, stream));
    constexpr bool kGated = kMode1 == detail::ColumnMode::kGatedSplit;
    const auto sc1 = swap_scales(w.quant.w13_scale, kGated ? I : 0, scales1, R, a13);
    const auto sc2 = swap_scales(w.quant.w2_scale, 0, scales2, R, a2);
    const auto between = [&] {
      if constexpr (kGemm1WritesCodes) return Status::ok();
      else return quant_detail::quantize_rows<Quant>(quant_detail::StoredRows<IO>{b.inter, I},
                                                     quant_detail::ListedRows{s.row_list}, I, s.row_list_size, codes2,
                                                     {scales2, R, 1}, a2, pdl, stream);
    };
    using Out1 = std::conditional_t<kGemm1WritesCodes, W, IO>;
    Out1* out1 = nullptr;
    if constexpr (kGemm1WritesCodes) out1 = codes2;
    else out1 = b.inter;
    using gemm::Sm90Tile;
    switch (l.tile) {
      case Sm90Tile::kFusedSwap128x16:
        return run_fused_swap<16, kQuantAtoms>(l, w, codes1, sc1, codes2, sc2, output, s, b, pdl, stream, between, out1, a2);
      case Sm90Tile::kFusedSwap128x32:
        return run_fused_swap<32, kQuantAtoms>(l, w, codes1, sc1, codes2, sc2, output, s, b, pdl, stream, between, out1, a2);
      default: return run_fused_swap<64, 1>(l, w, codes1, sc1, codes2, sc2, output, s, b, pdl, stream, between, out1, a2);
    }
  }

  // Prefill of the FP8 block-scaled and per-tensor schemes: quantize the rows (1x128 groups, or
  // the static scale) -> CUTLASS's FP8 GEMM1, stored raw -> activation and quantization of the
  // intermediate in one pass -> FP8 GEMM2, stored.
  Status run_fp8_prefill_gemms(const Plan& l, const Weights& w, const IO* input, const TokenRows* tokens, IO* output,
                             const Segments& s, const Buffers& b, std::byte* base, cudaStream_t stream) const {
    const bool pdl = programmatic_launch(l);
    const Index H = w.hidden(), I = w.intermediate(), E = w.num_local_experts();
    const Index kb1 = blocks128(H), kb2 = blocks128(I);
    auto* codes1 = static_cast<W*>(static_cast<void*>(base + l.codes1));
    auto* codes2 = static_cast<W*>(static_cast<void*>(base + l.codes2));
    auto* scales1 = static_cast<float*>(static_cast<void*>(base + l.scales1));
    auto* scales2 = static_cast<float*>(static_cast<void*>(base + l.scales2));
    const float* a13 = nullptr;
    const float* a2 = nullptr;
    if constexpr (kPerTensorScales) {  // the GEMMs read the static scales themselves
      a13 = w.quant.a13_scale->data();
      a2 = w.quant.a2_scale->data();
    }
    const std::span<std::byte> ws(b.gemm_ws, l.gemm_ws_bytes);
    // out[rows, halves * n] = codes[rows, k] x w[e]^T, scaled; `scales` are the rows' (block-scaled)
    // or the static activation scale (per-tensor).
    const auto gemm = [&](const W* codes, const float* scales, Index k, DeviceView<const W, 3> wt,
                          DeviceView<const float, 3> wscales, int halves, IO* out) {
      const Index n = wt.extent(1) / halves;
      gemm::Sm90Fp8GemmArgs args{.scales = kFp8Scales, .num_experts = static_cast<int>(E), .halves = halves, .n = n,
                                 .k = k, .a = codes, .lda = k, .a_scales = scales, .seg_begin = s.seg_begin,
                                 .seg_count = s.seg_count, .w = wt.data(), .w_expert_stride = wt.stride(0),
                                 .ldw = wt.stride(1), .w_scales = wscales.data(),
                                 .w_scales_expert_stride = wscales.stride(0), .d = out, .ldd = halves * n};
      args.tile = l.fp8_tile;
      return gemm::sm90_fp8_gemm(args, ws, stream);
    };
    MOE_RETURN_IF_ERROR(quantize_input(input, tokens, H, s, codes1, {scales1, 1, kb1}, a13, pdl, stream));
    MOE_RETURN_IF_ERROR(gemm(codes1, kPerTensorScales ? a13 : scales1, H, w.w13, w.quant.w13_scale, kFp8Halves, b.gemm1_out));
    // The activation runs inside the quantizer of GEMM2's input: the intermediate is never stored.
    const detail::ActivatedRows<IO, Gemm1Expr, Activation, kActivationLayout> activated{b.gemm1_out, w.w13.extent(1), I,
                                                                                       w.activation};
    MOE_RETURN_IF_ERROR(quant_detail::quantize_rows<Quant>(activated, quant_detail::ListedRows{s.row_list}, I,
                                                           s.row_list_size, codes2, {scales2, 1, kb2}, a2, pdl, stream));
    return gemm(codes2, kPerTensorScales ? a2 : scales2, I, w.w2, w.quant.w2_scale, 1, output);
  }

  // One grouped GEMM of the Sm80 mainloops over the segments: out = a x w[e]^T, K = a's width.
  static detail::GroupedGemmParams<IO, Activation> gemm_params(const Segments& s, const IO* in, Index k,
                                                               DeviceView<const IO, 3> w,
                                                               const std::optional<DeviceView<const IO, 2>>& bias,
                                                               const float* row_weight, IO* out, Index n_out,
                                                               Index n_total, const Weights& weights) {
    detail::GroupedGemmParams<IO, Activation> g{};
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
    g.seg_begin = s.seg_begin;
    g.seg_count = s.seg_count;
    g.tile_offsets = s.tile_offsets;
    g.num_experts = static_cast<int>(w.extent(0));
    g.activation = weights.activation;
    return g;
  }

  // Launches one grouped GEMM: the pipelined mainloop when the operands allow it (16-bit, rows
  // 16-byte aligned), else the generic one. Both use kTileM-row m-tiles (the tile prefix's unit).
  template <detail::ColumnMode Mode, class Expr>
  static Status launch_gemm(const detail::GroupedGemmParams<IO, Activation>& g, unsigned m_tiles, bool thin,
                            cudaStream_t stream) {
    using namespace detail;
    static_assert(kFastBM == kBM, "both mainloops tile M by the tile prefix's unit");
    if (pipelined_gemm_applies(g)) {
      if constexpr (sizeof(IO) == 2) {
        constexpr int kOut = Mode == ColumnMode::kPlain ? kFastBN : kFastBN / 2;
        const dim3 grid(m_tiles, static_cast<unsigned>((g.n_out + kOut - 1) / kOut));
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
    const dim3 grid(m_tiles, static_cast<unsigned>((g.n_out + kOut - 1) / kOut));
    grouped_gemm_kernel<IO, Mode, Expr, Activation><<<grid, kGemmThreads, 0, stream>>>(g);
    MOE_CUDA_CHECK_LAUNCH();
    return Status::ok();
  }

  // GEMM1 + epilogue 1 -> inter; GEMM2 + epilogue 2 (router weight when given) -> output.
  Status run_sm80(const Plan& l, const Weights& w, const IO* input, IO* output, const Segments& s, const Buffers& b,
                  const float* row_weight, cudaStream_t stream) const {
    using detail::ColumnMode;
    const Index E = w.num_local_experts(), H = w.hidden(), I = w.intermediate(), N1 = w.w13.extent(1);
    const unsigned m_tiles = static_cast<unsigned>((l.rows + kTileM - 1) / kTileM + E);
    // Expected rows per local expert, known on the host without a sync: below one m-tile, the
    // GEMMs stream weights (decode) rather than reuse them.
    const bool thin = l.live_rows < kTileM * E;
    {
      const auto g = gemm_params(s, input, H, w.w13, w.w13_bias, nullptr, b.inter, I, N1, w);
      if (g.bias) {
        MOE_RETURN_IF_ERROR((launch_gemm<kMode1, epilogue::Gemm1Epilogue<Activation, IO, true>>(g, m_tiles, thin, stream)));
      } else {
        MOE_RETURN_IF_ERROR((launch_gemm<kMode1, epilogue::Gemm1Epilogue<Activation, IO, false>>(g, m_tiles, thin, stream)));
      }
    }
    const auto g = gemm_params(s, b.inter, I, w.w2, w.w2_bias, row_weight, output, H, H, w);
    const auto second = [&]<bool kWeighted>() -> Status {
      if (g.bias) return launch_gemm<ColumnMode::kPlain, epilogue::Gemm2Epilogue<IO, true, kWeighted>>(g, m_tiles, thin, stream);
      return launch_gemm<ColumnMode::kPlain, epilogue::Gemm2Epilogue<IO, false, kWeighted>>(g, m_tiles, thin, stream);
    };
    return row_weight ? second.template operator()<true>() : second.template operator()<false>();
  }

  Options options_;
};

}  // namespace moe::cuda
