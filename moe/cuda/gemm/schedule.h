// Schedules of the grouped expert GEMM: which mainloop runs, as types (CUTLASS 3's dispatch
// policies), and the tile configurations of each, chosen per problem from a committed table.
//
//   Sm80CpAsync             cp.async multistage + mma.sync (WMMA): any architecture >= sm_80, any
//                           16/32-bit operand, fused activation / router-weight epilogues.
//   Sm90TmaWarpSpecialized  wgmma + TMA, a producer warp and two consumer warpgroups, persistent
//                           over (expert, tile) pairs read from device-side row counts (sm_90a).
//   ScheduleAuto            Sm90TmaWarpSpecialized where the device, operand type and alignment
//                           allow it, else Sm80CpAsync; the tile comes from sm90_tile_for().
//
// A quantized schedule (FP8 block-scaled, say) derives from the one whose mainloop it extends and
// adds its scale operands; a combination a schedule cannot run is a static_assert naming both.
#pragma once

#include <type_traits>

#include "moe/tensor.h"

namespace moe::cuda::gemm {

struct Sm80CpAsync {
  static constexpr int kMinComputeCapability = 80;
};
struct Sm90TmaWarpSpecialized {
  static constexpr int kMinComputeCapability = 90;
};
struct ScheduleAuto {
  static constexpr int kMinComputeCapability = 80;
};

template <class S>
concept Schedule = std::is_same_v<S, Sm80CpAsync> || std::is_base_of_v<Sm80CpAsync, S> ||
                   std::is_same_v<S, Sm90TmaWarpSpecialized> || std::is_base_of_v<Sm90TmaWarpSpecialized, S> ||
                   std::is_same_v<S, ScheduleAuto>;

// Tile configurations of the Hopper schedule. "Normal" tiles put the expert's token rows on the
// MMA's M side (prefill: many rows per expert). "Swap" tiles compute the transposed product, the
// weight rows on M (128) and the tokens on N (16..64): a decode expert with a handful of tokens
// is not padded to 128 rows, and each weight byte is read once per token tile.
enum class Sm90Tile : int {
  kNormal128x256,
  kSwap128x64,
  kSwap128x32,
  kSwap128x16,
  // Our own swap mainloop (sm90_swap_mainloop.cuh): one TMA descriptor over all experts, gated
  // GEMM1 with the activation on the accumulators. Either gate/up layout and ungated w13; where
  // the mainloop does not apply (expert count, strides) the CUTLASS swap tile of the same width.
  kFusedSwap128x64,
  kFusedSwap128x32,
  kFusedSwap128x16,
  // Ping-pong: each consumer warpgroup owns a tile, so one's epilogue overlaps the other's
  // mainloop. 128x128 in clusters of two CTAs along N for the largest experts (>= 1024 rows);
  // 64x256 measured and not in the table. bf16 only; f16 runs kNormal128x256 in their place.
  kPingpong128x128,
  kPingpong64x256,
};

// The CUTLASS tile a fused one falls back to where the fused mainloop does not apply.
inline Sm90Tile unfused(Sm90Tile t) {
  switch (t) {
    case Sm90Tile::kFusedSwap128x64: return Sm90Tile::kSwap128x64;
    case Sm90Tile::kFusedSwap128x32: return Sm90Tile::kSwap128x32;
    case Sm90Tile::kFusedSwap128x16: return Sm90Tile::kSwap128x16;
    default: return t;
  }
}
inline bool is_fused(Sm90Tile t) { return unfused(t) != t; }
// Tiles with the token rows on M: the prefill tiles (the FP8 schemes run their own GEMM there).
inline bool is_prefill(Sm90Tile t) {
  return t == Sm90Tile::kNormal128x256 || t == Sm90Tile::kPingpong128x128 || t == Sm90Tile::kPingpong64x256;
}

inline const char* name(Sm90Tile t) {
  switch (t) {
    case Sm90Tile::kNormal128x256: return "normal_128x256x64";
    case Sm90Tile::kSwap128x64: return "swap_128x64x64";
    case Sm90Tile::kSwap128x32: return "swap_128x32x128";
    case Sm90Tile::kSwap128x16: return "swap_128x16x128";
    case Sm90Tile::kFusedSwap128x64: return "fused_swap_128x64x64";
    case Sm90Tile::kFusedSwap128x32: return "fused_swap_128x32x64";
    case Sm90Tile::kFusedSwap128x16: return "fused_swap_128x16x64";
    case Sm90Tile::kPingpong128x128: return "pingpong_128x128x64_c1x2";
    case Sm90Tile::kPingpong64x256: return "pingpong_64x256x64";
  }
  return "?";
}

// The tile for the grouped GEMMs of an experts stage whose groups average `rows_per_group` rows
// (a host-side estimate: slots / local experts; the real counts stay on the device) and whose
// hidden size is `hidden` (GEMM1's K, GEMM2's N). From the tuning runs on the H200
// (benchmarks/NOTES.md, "tile table" and "Prefill tiles"): every tile on the 28 benchmark rows, the
// fastest kept. Regenerate: `cuda_fused_moe_benchmark --tune_tiles --benchmark_filter=bf16_tile` and
// `--ab_prefill_tiles` (the prefill tiles interleaved on the same allocations, M >= 1024) on the GPU
// machine, then set each threshold between the averages where the winner changes. The first rule
// that holds (fewer rows than its bound, at least its hidden size) picks the tile.
struct Sm90TileRule {
  double max_rows_per_group;  // this rule applies below this average
  Index min_hidden;           // ... and from this hidden size
  Sm90Tile tile;
};
inline constexpr Sm90TileRule kSm90TileTable[] = {
    {3.0, 0, Sm90Tile::kFusedSwap128x16},   // decode: <= 2 rows per expert (M <= 64 on the big-expert shapes)
    // 4-16 rows per expert: our 32-token tile, 0.8-2.1% faster than CUTLASS's on the same
    // allocations (qwen3 M = 64/256, gpt-oss M = 256, mixtral M = 64; NOTES.md "The swap tiles on
    // 2-16 rows per expert"), 0.3% slower on DeepSeek M = 256.
    {24.0, 0, Sm90Tile::kFusedSwap128x32},
    {48.0, 0, Sm90Tile::kFusedSwap128x64},  // 32 rows per expert (deepseek, gpt-oss M = 1024)
    // The tensor-core-bound shapes (2026-12-04 runs, NOTES.md "Prefill tiles"). 64x256 ping-pong
    // wins from 128 to 1024 rows per expert where the hidden size is 4096 or more (mixtral M = 1024
    // and 4096, deepseek M = 4096: 2-6% on each of three H200s) and loses up to 12% on the narrower
    // shapes (qwen3, gpt-oss), which keep the cooperative tile, then 128x128 ping-pong.
    {96.0, 0, Sm90Tile::kNormal128x256},         // 64 rows per expert (unmeasured with 64x256)
    {2048.0, 4096, Sm90Tile::kPingpong64x256},   // 128-1024 rows per expert, hidden >= 4096
    {768.0, 0, Sm90Tile::kNormal128x256},        // 64-512 rows per expert
    {1e300, 0, Sm90Tile::kPingpong128x128},      // >= 1024 rows per expert
};

inline Sm90Tile sm90_tile_for(double rows_per_group, Index hidden) {
  for (const auto& r : kSm90TileTable) {
    if (rows_per_group < r.max_rows_per_group && hidden >= r.min_hidden) return r.tile;
  }
  return Sm90Tile::kNormal128x256;
}

}  // namespace moe::cuda::gemm
