// Hopper "swap" grouped expert GEMM with fused epilogues: our own mainloop for the decode shapes.
//
//   out[row0(e) + t, n] = Expr( sum_k w[e, n(+I), k] * x[row0(e) + t, k] )    t < rows of expert e
//
// The weights are the wgmma's M side (128 weight rows per tile) and the expert's tokens its N side
// (kTokens = 16, 32 or 64 per tile), so a decode expert with a handful of tokens is not padded to
// 128 rows and each weight byte is read once per token tile. What the CUTLASS ptr-array schedule
// cannot do, and this one does:
//  * one TMA descriptor over all experts' weights ([E * N_total, K], one 2-D tensor) and one over
//    the gathered rows ([rows, K]): no per-expert descriptor rewrite when a CTA changes expert;
//  * gated GEMM1 loads the gate rows [n0, n0 + 64) and the up rows [I + n0, I + n0 + 64) of the
//    same expert into one 128-row A tile, so the thread that holds gate(n, t) also holds up(n, t)
//    and the activation runs on the accumulators (no [rows, 2I] round trip through memory);
//  * a persistent tile scheduler over (expert, n-tile, K split, token-tile) tuples built from the
//    per-expert row counts on the device, where the K split count is chosen too (the experts hit
//    are known there alone: a host bound would split too little or too much);
//  * launched programmatically (moe/cuda/launch.h), each CTA reads the counts and fills its stage
//    ring with the first tile's weights while the previous kernel is still finishing, and waits for
//    it only before loading the rows that kernel wrote.
//
// Operands: 16-bit (bf16, f16) or 8-bit codes (FP8 E4M3, INT8) of the W8A8 schemes
// (moe/quant/w8a8.h). A stage is one 128-byte swizzle atom per row either way: 64 16-bit or 128
// 8-bit elements of K. 8-bit GEMMs apply their scales (SwapScales): FP8 with block scales
// multiplies each stage's partial sums by s_x[token, K block] * s_w[row block, K block] as they are
// added into the fp32 accumulators (the stage is the 128-wide scale block; DeepGEMM's
// "promotion", which also keeps the FP8 wgmma's narrower internal accumulation to 128 products);
// FP8 with per-channel scales promotes each stage unscaled and scales at the end; FP8 with
// per-tensor scales keeps its sums in the wgmma accumulators across K (fast accumulation) and
// scales at the end; INT8 accumulates exactly in int32 and scales at the end.
//
// Warp roles: warpgroup 0 is the producer (one thread issues TMA loads into a kStages-deep ring of
// shared-memory stages, each completing on an mbarrier), warpgroup 1 the consumer (wgmma from
// shared memory, 128B-swizzled K-major tiles, fp32 accumulators in registers, then the epilogue
// tree of moe/epilogue.h per element).
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cudaTypedefs.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cute/arch/mma_sm90_gmma.hpp"
#include "moe/cuda/check.h"
#include "moe/cuda/launch.h"
#include "moe/epilogue.h"
#include "moe/quant/numeric.h"
#include "moe/tensor.h"

namespace moe::cuda::gemm::swap_detail {

constexpr int kAtomBytes = 128;             // one 128-byte swizzle atom of K per row
constexpr int kWeightRows = 128;            // M side of a tile: two m64 wgmma halves
constexpr int kThreads = 256;               // producer warpgroup + consumer warpgroup
constexpr int kMaxExperts = 1024;           // tile prefix kept in shared memory

// A stage holds kAtoms consecutive 64-wide K slices ("atoms", one 128-byte swizzle span each):
// more atoms read longer contiguous runs of every weight row per stage. Measured on the H200
// (benchmarks/NOTES.md, v5): 2 and 4 atoms stream no faster than 1 on any decode row, so the
// schedule instantiates kAtoms = 1; the knob stays for other chips and FP8 (half the bytes/row).
// K elements of one atom: 64 16-bit or 128 8-bit.
template <class T>
inline constexpr int kAtomK = kAtomBytes / static_cast<int>(sizeof(T));

template <int kTokens, int kAtoms>
struct TileShape {
  static constexpr int kAtomABytes = kWeightRows * kAtomBytes;  // 16 KiB: gate half, up half
  static constexpr int kAtomBBytes = kTokens * kAtomBytes;
  static constexpr int kABytes = kAtoms * kAtomABytes;
  static constexpr int kBBytes = kAtoms * kAtomBBytes;
  static constexpr int kStageBytes = kABytes + kBBytes;  // multiple of 1024
  static constexpr int kStages = (200 * 1024 / kStageBytes) < 10 ? (200 * 1024 / kStageBytes) : 10;
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + 1024: alignment slack
  static_assert(kStages >= 2, "the stage ring needs two stages");
};

// Shared memory for one tile's block scales (after the ring): both weight halves' and kTokens
// activation scales per K block.
inline int block_scale_smem_bytes(int k_blocks, int tokens) { return (k_blocks * (tokens + 2) * 4 + 15) / 16 * 16; }
constexpr int kMaxSmemBytes = 227 * 1024;  // sm_90 opt-in limit per block

// How an 8-bit GEMM's sums become values (moe/quant/w8a8.h writes the arithmetic out).
enum class ScaleMode {
  kNone,            // 16-bit operands: the fp32 sums are the values
  kBlockPerStage,   // FP8, 128x128 weight blocks, 1x128 activation groups: scaled per stage
  kPerRowAtEnd,     // FP8 per-channel (promoted per stage) or INT8 (int32 sums): scaled once
  kFastAtEnd,       // FP8 per-tensor: sums kept in the wgmma accumulators across K, scaled once
};

// The scales of one 8-bit GEMM. Weight scale of (expert e, weight row n, K block b):
//   w[(e * w_rows + scale_row(n)) * w_cols + (w_cols > 1 ? b : 0)]
// Activation scale of (gathered row r, K block b): x[b * x_block_stride + r * x_row_step]
// (x_row_step = 0: one static scale for every row).
struct SwapScales {
  const float* w = nullptr;
  int w_rows = 0, w_cols = 0;  // per expert
  int w_row_block = 0;         // weight rows per scale row: 128 (blocks), 1 (channels), 0 (per tensor)
  int w_half = 0;              // gated w13: rows per half; the halves are blocked separately
  const float* x = nullptr;
  Index x_block_stride = 0, x_row_step = 0;

  // The scale row of weight row n (moe::quant::W8A8::weight_scale_row, the same layout).
  MOE_HOST_DEVICE int scale_row(int n) const {
    if (w_row_block == 0) return 0;
    if (w_half > 0 && n >= w_half) return (w_half + w_row_block - 1) / w_row_block + (n - w_half) / w_row_block;
    return n / w_row_block;
  }
  MOE_HOST_DEVICE const float* weight(int e, int n) const {
    return w + (static_cast<Index>(e) * w_rows + scale_row(n)) * w_cols;
  }
};

// Parameters; the tensor maps travel by value as __grid_constant__.
struct SwapParams {
  const Index* seg_begin;    // [E] first row of each expert in the gathered rows
  const Index* seg_count;    // [E] rows of each expert
  int num_experts;
  int k;                     // reduction length
  int n_out;                 // output columns (I for gated GEMM1)
  int gate_up_offset;        // rows between a gate row and its up row (I; 1 interleaved), 0 when not gated
  int gate_row_step = 1;     // rows between consecutive gate rows (2 interleaved)
  Index weight_rows_per_expert;  // N_total
  void* out;                 // [rows, n_out], row stride ldo
  Index ldo;
  // Split-K: every CTA picks the same split count s <= max_splits from the real tile count
  // (best_fill_splits) and CTA 0 records it in *splits_used. K blocks [split * per_split, ...) per
  // tile; with s > 1 each split writes fp32 partial sums to partial[split][row][width] (width: gate
  // then up columns when gated) and reduce_splits_kernel applies the epilogue, summing the splits
  // in order (deterministic). With s = 1 the tiles store the epilogue's output themselves.
  int max_splits;
  int* splits_used;  // null when max_splits == 1
  float* partial;
  Index partial_rows;
  SwapScales scales;  // 8-bit operands only
  // Output columns stored in the weight-only swap GEMM's pair order within each 32 columns
  // (k32_pair_slot): GEMM1's output is GEMM2's input there.
  bool k32_pair_order_out = false;
  // Expert biases [E, weight_rows_per_expert] of the output's element type (indexed by weight row),
  // or null: added to the accumulators before the epilogue (row_biases; with splits, to split 0's
  // partial sums).
  const void* bias = nullptr;
  // The static scale of an 8-bit output (a QuantizedOutput epilogue), else null.
  const float* out_scale = nullptr;
};

// An epilogue tree whose values are stored as 8-bit codes at a static scale: GEMM1 of a scheme
// whose GEMM2 input is quantized with a static per-tensor scale writes that input itself, with the
// arithmetic of the quantizer it replaces (Quant::encode of the rounded intermediate value, as
// moe/cuda/quant/quantize_rows.cuh encodes it), so the codes are the same bits.
template <class Quant, class Tree>
struct QuantizedOutput : Tree {
  using Code = typename Quant::WeightElement;
  MOE_HOST_DEVICE static Code encode(float v, float scale) { return Quant::encode(v, scale); }
};
template <class Expr>
concept EncodesOutput = requires { typename Expr::Code; };

// An output element from its epilogue value: rounded to TOut, or the code at the static scale.
template <class TOut, class Expr>
__device__ __forceinline__ TOut output_value(float v, const float* out_scale) {
  if constexpr (EncodesOutput<Expr>) {
    static_assert(std::is_same_v<TOut, typename Expr::Code>, "moe::cuda swap GEMM: codes stored as their own type");
    return Expr::encode(v, __ldg(out_scale));
  } else {
    return from_float<TOut>(v);
  }
}

// Where column k of a row goes in the weight-only swap GEMM's K order: within each 32 K, physical
// k = 32 c + 8 q + d sits at 32 c + 8 (d % 4) + 2 q + d / 4, so that a 4-byte word of 8 packed
// codes (8q .. 8q + 7, low nibble first) holds the A fragment pairs of thread q for two 16-K wgmma
// steps as nibble pairs (d, d + 4): one shift and one mask per pair (sm90_weight_only_swap.cuh).
MOE_HOST_DEVICE constexpr int k32_pair_slot(int k) {
  return (k & ~31) | ((k & 3) << 3) | (((k >> 3) & 3) << 1) | ((k >> 2) & 1);
}

// K splits for `tiles` equal work items on `ctas` persistent CTAs. None unless the tiles leave more
// than half the CTAs idle: these GEMMs stream weights, and half the SMs with a full stage ring
// each keep enough bytes in flight for the DRAM bandwidth; splitting costs partial sums, a
// reduction and a launch (on the H200, 2026-12-02: splitting to fill the last wave made qwen3 and
// gpt-oss M = 1..64 and deepseek M = 1 2-11% slower, mixtral M = 8 3% faster; benchmarks/NOTES.md).
// Then the count (1..max_splits, at most one per K block) whose items fill the last wave best; a
// count must fill it 2% better than a smaller one to win. The same on every CTA.
MOE_HOST_DEVICE int best_fill_splits(int tiles, int k_blocks, int ctas, int max_splits) {
  if (2 * static_cast<long long>(tiles) >= ctas) return 1;
  int best = 1;
  float best_fill = 0.0f;
  for (int s = 1; s <= max_splits && s <= k_blocks; ++s) {
    const long long items = static_cast<long long>(tiles) * s;
    const long long waves = (items + ctas - 1) / ctas;
    const float fill = waves > 0 ? static_cast<float>(items) / static_cast<float>(waves * ctas) : 1.0f;
    if (fill > best_fill + 0.02f) {
      best = s;
      best_fill = fill;
    }
  }
  return best;
}

// The K split of one launch: how many, and K blocks per split (every split non-empty).
struct KSplit {
  int count;
  int k_blocks_per_split;
  __device__ static KSplit of(int tiles, int k_blocks, int ctas, int max_splits) {
    const int chosen = best_fill_splits(tiles, k_blocks, ctas, max_splits);
    KSplit k;
    k.k_blocks_per_split = (k_blocks + chosen - 1) / chosen;
    k.count = (k_blocks + k.k_blocks_per_split - 1) / k.k_blocks_per_split;
    return k;
  }
};

// ---- PTX helpers (sm_90a) --------------------------------------------------------------------
__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(std::uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(std::uint64_t* bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
// The value, held in a register: ptxas otherwise recomputes a shared symbol's address (or a
// generic-to-shared conversion) inside every loop that uses it, each time a special-register read
// of the CTA's place in the cluster that the warp waits on (in the weight-only swap GEMM's
// consumer loop: 2 of 436 instructions per stage, 4% of the warps' stall samples on the H200).
__device__ __forceinline__ std::uint32_t held_in_register(std::uint32_t v) {
  asm volatile("mov.b32 %0, %0;" : "+r"(v));
  return v;
}
// The wait and arrive helpers take the barrier's shared address: loops compute it from a base
// held in a register (held_in_register) rather than converting a pointer per stage.
__device__ __forceinline__ void mbar_arrive_at(std::uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait_at(std::uint32_t bar, std::uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Barrier over `count` threads (a warpgroup) under id `id`: the consumer warpgroup alone.
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}
// L2 policies for TMA loads: expert weights are read once per forward (evict first), the gathered
// rows are read by every n-tile of their expert (evict last), so the weight stream does not push
// the rows out of L2.
__device__ __forceinline__ std::uint64_t l2_evict_first_policy() {
  std::uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ std::uint64_t l2_evict_last_policy() {
  std::uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void tma_load_2d(void* smem, const CUtensorMap* map, std::uint64_t* bar, int c0, int c1,
                                            std::uint64_t l2_policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%3, "
      "%4}], [%2], %5;" ::"r"(smem_addr(smem)),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "l"(l2_policy)
      : "memory");
}
// wgmma shared-memory descriptor of a K-major tile with 128-byte rows, 128B swizzle: 8-row groups
// 1024 bytes apart (stride byte offset), leading byte offset unused for this layout. The high
// word (stride, swizzle) is the same for every tile.
MOE_HOST_DEVICE constexpr std::uint64_t smem_desc_high() {
  return (std::uint64_t{1024 >> 4} << 32) | (std::uint64_t{1} << 62);
}
// Its low word (address field, leading byte offset 1) from a shared address.
__device__ __forceinline__ std::uint32_t smem_desc_low(std::uint32_t addr) { return ((addr & 0x3FFFF) >> 4) | (1u << 16); }

// wgmma m64 x kTokens x (32 bytes of K), both operands K-major in shared memory: k16 for 16-bit
// operands, k32 for 8-bit ones, fp32 accumulators (int32 for INT8, held in uint32 registers).
template <class T, int kTokens>
struct Wgmma;
#define MOE_SWAP_WGMMA(ELEM, N, OP, ACC)                                                                \
  template <>                                                                                          \
  struct Wgmma<ELEM, N> {                                                                              \
    using Op = OP;                                                                                     \
    using Acc = ACC;                                                                                   \
  };
#define MOE_SWAP_WGMMA_K(OP) cute::SM90::GMMA::OP<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>
MOE_SWAP_WGMMA(bfloat16, 16, MOE_SWAP_WGMMA_K(MMA_64x16x16_F32BF16BF16_SS), float)
MOE_SWAP_WGMMA(bfloat16, 32, MOE_SWAP_WGMMA_K(MMA_64x32x16_F32BF16BF16_SS), float)
MOE_SWAP_WGMMA(bfloat16, 64, MOE_SWAP_WGMMA_K(MMA_64x64x16_F32BF16BF16_SS), float)
MOE_SWAP_WGMMA(half, 16, MOE_SWAP_WGMMA_K(MMA_64x16x16_F32F16F16_SS), float)
MOE_SWAP_WGMMA(half, 32, MOE_SWAP_WGMMA_K(MMA_64x32x16_F32F16F16_SS), float)
MOE_SWAP_WGMMA(half, 64, MOE_SWAP_WGMMA_K(MMA_64x64x16_F32F16F16_SS), float)
MOE_SWAP_WGMMA(float8_e4m3, 16, cute::SM90::GMMA::MMA_64x16x32_F32E4M3E4M3_SS_TN<>, float)
MOE_SWAP_WGMMA(float8_e4m3, 32, cute::SM90::GMMA::MMA_64x32x32_F32E4M3E4M3_SS_TN<>, float)
MOE_SWAP_WGMMA(float8_e4m3, 64, cute::SM90::GMMA::MMA_64x64x32_F32E4M3E4M3_SS_TN<>, float)
MOE_SWAP_WGMMA(std::int8_t, 16, cute::SM90::GMMA::MMA_64x16x32_S32S8S8_SS_TN, std::uint32_t)
MOE_SWAP_WGMMA(std::int8_t, 32, cute::SM90::GMMA::MMA_64x32x32_S32S8S8_SS_TN, std::uint32_t)
MOE_SWAP_WGMMA(std::int8_t, 64, cute::SM90::GMMA::MMA_64x64x32_S32S8S8_SS_TN, std::uint32_t)
#undef MOE_SWAP_WGMMA_K
#undef MOE_SWAP_WGMMA

template <class Op, class Acc, int N, std::size_t... I>
__device__ __forceinline__ void wgmma_call(std::uint64_t a, std::uint64_t b, Acc (&d)[N], bool accumulate,
                                           std::index_sequence<I...>) {
  Op::fma(a, b, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}

// The accumulator as a float: INT8's int32 sums (exact) converted, fp32 as is.
template <class Acc>
__device__ __forceinline__ float acc_value(Acc v) {
  if constexpr (std::is_same_v<Acc, std::uint32_t>) return static_cast<float>(static_cast<std::int32_t>(v));
  else return v;
}

// Where tile `tile` lies: expert, first weight row of the n-tile, first token row, tokens in it,
// and its K split.
struct TileCoord {
  int expert;
  int n0;
  Index row0;
  int tokens;
  int split;
};

// `prefix` counts each expert's tiles of one split; every tile runs `split.count` times.
template <int kTokens>
__device__ __forceinline__ TileCoord locate(int tile, const int* prefix, int num_experts, int n_tiles, KSplit split,
                                            const SwapParams& p) {
  int lo = 0, hi = num_experts - 1;  // largest e with prefix[e] * splits <= tile
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (prefix[mid] * split.count <= tile) lo = mid;
    else hi = mid - 1;
  }
  // Within an expert: n-tile major, then split, then token tile (token tiles of one weight tile
  // run on neighbouring CTAs at about the same time: the weight tile's second read hits L2).
  const int local = tile - prefix[lo] * split.count;
  const int token_tiles = (prefix[lo + 1] - prefix[lo]) / n_tiles;
  const int token_tile = local % token_tiles;
  const int k_split = (local / token_tiles) % split.count;
  const int n_tile = local / (token_tiles * split.count);
  TileCoord c;
  c.expert = lo;
  c.split = k_split;
  c.n0 = n_tile * (p.gate_up_offset > 0 ? kWeightRows / 2 : kWeightRows);  // gated: 64 outputs per tile
  c.row0 = __ldcg(p.seg_begin + lo) + static_cast<Index>(token_tile) * kTokens;
  const Index left = __ldcg(p.seg_count + lo) - static_cast<Index>(token_tile) * kTokens;
  c.tokens = static_cast<int>(left < kTokens ? left : kTokens);
  return c;
}

// Tile prefix over experts, run by warp 0: prefix[e] = tiles (n_tiles x token tiles of kTokens
// rows) of the experts before e, prefix[num_experts] = all of them (one K split). Before the grid
// dependency wait: the counts come from a kernel two or more launches back (read through L2:
// __ldcg), never from the one this launch may overlap.
template <int kTokens>
__device__ __forceinline__ void build_tile_prefix(const SwapParams& p, int n_tiles, int* prefix) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  int carry = 0;
  for (int base = 0; base < p.num_experts; base += 32) {
    const int e = base + lane;
    const int t = e < p.num_experts ? static_cast<int>((__ldcg(p.seg_count + e) + kTokens - 1) / kTokens) * n_tiles : 0;
    int incl = t;
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    if (e < p.num_experts) prefix[e] = carry + incl - t;
    carry += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (lane == 0) prefix[p.num_experts] = carry;
}

// The expert biases of weight row r of a tile's two halves (the gate and up rows of output
// c.n0 + r, or rows c.n0 + r and c.n0 + 64 + r), for the caller to add to the accumulators before
// store_tile_outputs: (acc + bias) as the epilogue adds it, to split 0's partial sums only. Else
// -0.0, the additive identity (acc + -0.0 is acc, -0.0 included).
template <class TOut, bool kGated>
__device__ __forceinline__ void row_biases(const SwapParams& p, const TileCoord& c, int r, float* b0, float* b1) {
  *b0 = *b1 = -0.0f;
  if (p.bias == nullptr || c.split != 0) return;
  const TOut* bias = static_cast<const TOut*>(p.bias) + static_cast<Index>(c.expert) * p.weight_rows_per_expert;
  if constexpr (kGated) {
    if (c.n0 + r < p.n_out) {
      const int gate = (c.n0 + r) * p.gate_row_step;
      *b0 = to_float(bias[gate]);
      *b1 = to_float(bias[gate + p.gate_up_offset]);
    }
  } else {
    if (c.n0 + r < p.n_out) *b0 = to_float(bias[c.n0 + r]);
    if (c.n0 + 64 + r < p.n_out) *b1 = to_float(bias[c.n0 + 64 + r]);
  }
}

// The outputs of weight row r of a tile's two halves for token `tok` (v0: the gate row or row r,
// v1: the up row or row 64 + r): with splits > 1 the split's partial sums (reduce_splits_kernel
// applies the epilogue), else the epilogue tree, stored. Ungated, kRows picks the rows stored
// (bit 0: row r, bit 1: row 64 + r).
template <class TOut, bool kGated, class Expr, class Activation, int kRows = 3>
__device__ __forceinline__ void store_tile_outputs(const SwapParams& p, const TileCoord& c, int splits, int r, int tok,
                                                   float v0, float v1, const typename Activation::Arguments& act_args) {
  if (splits > 1) {
    const Index width = kGated ? 2 * static_cast<Index>(p.n_out) : p.n_out;
    float* dst = p.partial + (static_cast<Index>(c.split) * p.partial_rows + c.row0 + tok) * width;
    const int n = c.n0 + r;
    if constexpr (kGated) {
      if (n < p.n_out) dst[n] = v0;
      if (n < p.n_out) dst[p.n_out + n] = v1;
    } else {
      if ((kRows & 1) && n < p.n_out) dst[n] = v0;
      if ((kRows & 2) && c.n0 + 64 + r < p.n_out) dst[c.n0 + 64 + r] = v1;
    }
    return;
  }
  TOut* dst = static_cast<TOut*>(p.out) + (c.row0 + tok) * p.ldo;
  const auto at = [&](int n) { return p.k32_pair_order_out ? k32_pair_slot(n) : n; };
  epilogue::ElementContext<Activation> ctx;
  ctx.args = act_args;
  if constexpr (kGated) {
    const int n = c.n0 + r;
    if (n < p.n_out) {
      ctx.acc[1] = v0;
      ctx.acc[2] = v1;
      ctx.col = n;
      dst[at(n)] = output_value<TOut, Expr>(Expr::eval(ctx), p.out_scale);
    }
  } else {
    const int n = c.n0 + r, n1 = c.n0 + 64 + r;
    if ((kRows & 1) && n < p.n_out) {
      ctx.acc[0] = v0;
      ctx.col = n;
      dst[at(n)] = output_value<TOut, Expr>(Expr::eval(ctx), p.out_scale);
    }
    if ((kRows & 2) && n1 < p.n_out) {
      ctx.acc[0] = v1;
      ctx.col = n1;
      dst[at(n1)] = output_value<TOut, Expr>(Expr::eval(ctx), p.out_scale);
    }
  }
}

// T: the operands' element (weights and rows alike); TOut: the output's.
template <class T, class TOut, int kTokens, int kAtoms, bool kGated, ScaleMode kScales, class Expr, class Activation>
__global__ void __launch_bounds__(kThreads, 1)
    swap_gemm_kernel(const __grid_constant__ CUtensorMap weights, const __grid_constant__ CUtensorMap rows,
                     SwapParams p, typename Activation::Arguments act_args) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = TileShape<kTokens, kAtoms>;
  constexpr int kStages = Shape::kStages;
  constexpr int kAcc = kTokens / 2;  // accumulators per thread of one m64 x kTokens product
  constexpr int kK = kAtomK<T>;
  static_assert((kScales == ScaleMode::kNone) == (sizeof(T) == 2), "moe::cuda swap GEMM: 8-bit operands need scales");
  extern __shared__ unsigned char smem_raw[];
  // The ring starts at the first 1024-byte boundary (128B swizzle), computed on the shared address
  // (held: see held_in_register); `smem` is the same place as a generic pointer.
  const std::uint32_t smem_base = held_in_register((smem_addr(smem_raw) + 1023) & ~1023u);
  unsigned char* smem = smem_raw + (smem_base - smem_addr(smem_raw));
  __shared__ std::uint64_t full[kStages], empty[kStages];
  __shared__ int prefix[kMaxExperts + 1];
  // Block-scaled FP8: one tile's scales after the stage ring (block_scale_smem_bytes).
  [[maybe_unused]] float* tile_scales = reinterpret_cast<float*>(smem + kStages * Shape::kStageBytes);

  constexpr bool gated = kGated;
  // Interleaved gate/up rows (gate 2c, up 2c + 1): a tile's 64 outputs are its 128 consecutive
  // rows, loaded as the same two 64-row boxes; the epilogue pairs rows across lanes.
  constexpr bool interleaved = kGated && Activation::kLayout == GateUpLayout::kInterleaved;
  static_assert(!interleaved || kScales == ScaleMode::kNone, "moe::cuda swap GEMM: 8-bit operands take [gate; up] rows");
  // The first weight row of a tile's two boxes.
  const auto box_rows = [&](const TileCoord& c, int* w0, int* w1) {
    *w0 = static_cast<int>(c.expert * p.weight_rows_per_expert) + (interleaved ? 2 * c.n0 : c.n0);
    *w1 = gated && !interleaved ? *w0 + p.gate_up_offset : *w0 + kWeightRows / 2;
  };
  const int n_tiles = (p.n_out + (gated ? kWeightRows / 2 : kWeightRows) - 1) / (gated ? kWeightRows / 2 : kWeightRows);
  if (threadIdx.x < 32) build_tile_prefix<kTokens>(p, n_tiles, prefix);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const std::uint32_t full_base = held_in_register(smem_addr(full)), empty_base = held_in_register(smem_addr(empty));
  const int k_blocks = (p.k + kAtoms * kK - 1) / (kAtoms * kK);  // stages of K
  [[maybe_unused]] const int scale_blocks = (p.k + kK - 1) / kK;  // 128-wide K blocks (8-bit: one per atom)
  const KSplit split = KSplit::of(prefix[p.num_experts], k_blocks, static_cast<int>(gridDim.x), p.max_splits);
  const int total = prefix[p.num_experts] * split.count;

  if (threadIdx.x < 128) {
    // ---- producer: one thread issues every TMA load ----
    if (threadIdx.x != 0) {
      cuda::detail::grid_dependency_wait();
      cuda::detail::allow_dependents_launch();
      return;
    }
    const std::uint64_t stream_policy = l2_evict_first_policy(), reuse_policy = l2_evict_last_policy();
    // The first tile's first stages of weights go out before the wait (weights are constant); their
    // stages complete when the rows, loaded after it, arrive (expect_tx counts both).
    // Atoms wholly past K are not loaded (a box entirely out of bounds is never issued); the
    // consumer skips their sums (8-bit, one set per atom) and 16-bit tiles run one atom per stage.
    const auto atoms_of = [&](int kb) { return min(kAtoms, (p.k - kb * kAtoms * kK + kK - 1) / kK); };
    const auto stage_bytes = [&](int kb) { return static_cast<std::uint32_t>(atoms_of(kb) * (Shape::kAtomABytes + Shape::kAtomBBytes)); };
    int prefetched = 0;
    if (static_cast<int>(blockIdx.x) < total) {
      const TileCoord c = locate<kTokens>(blockIdx.x, prefix, p.num_experts, n_tiles, split, p);
      int w0, w1;
      box_rows(c, &w0, &w1);
      const int kb_begin = c.split * split.k_blocks_per_split;
      const int kb_end = min(k_blocks, kb_begin + split.k_blocks_per_split);
      for (int kb = kb_begin; kb < kb_end && prefetched < kStages; ++kb, ++prefetched) {
        unsigned char* a = smem + prefetched * Shape::kStageBytes;
        mbar_expect_tx(&full[prefetched], stage_bytes(kb));
#pragma unroll
        for (int atom = 0; atom < kAtoms; ++atom) {
          if (atom >= atoms_of(kb)) break;
          const int k0 = (kb * kAtoms + atom) * kK;
          unsigned char* aa = a + atom * Shape::kAtomABytes;
          tma_load_2d(aa, &weights, &full[prefetched], k0, w0, stream_policy);
          tma_load_2d(aa + Shape::kAtomABytes / 2, &weights, &full[prefetched], k0, w1, stream_policy);
        }
      }
    }
    cuda::detail::grid_dependency_wait();
    cuda::detail::allow_dependents_launch();
    int stage = 0;
    std::uint32_t phase = 0;
    int issued = 0;  // k-blocks issued so far by this CTA
    for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
      const TileCoord c = locate<kTokens>(tile, prefix, p.num_experts, n_tiles, split, p);
      int w0, w1;
      box_rows(c, &w0, &w1);
      const int kb_begin = c.split * split.k_blocks_per_split;
      const int kb_end = min(k_blocks, kb_begin + split.k_blocks_per_split);
      for (int kb = kb_begin; kb < kb_end; ++kb, ++issued) {
        unsigned char* a = smem + stage * Shape::kStageBytes;
        unsigned char* b = a + Shape::kABytes;
        if (issued >= prefetched) {
          mbar_wait_at(empty_base + 8 * stage, phase ^ 1);
          mbar_expect_tx(&full[stage], stage_bytes(kb));
        }
#pragma unroll
        for (int atom = 0; atom < kAtoms; ++atom) {
          if (atom >= atoms_of(kb)) break;
          const int k0 = (kb * kAtoms + atom) * kK;
          if (issued >= prefetched) {
            unsigned char* aa = a + atom * Shape::kAtomABytes;
            tma_load_2d(aa, &weights, &full[stage], k0, w0, stream_policy);
            tma_load_2d(aa + Shape::kAtomABytes / 2, &weights, &full[stage], k0, w1, stream_policy);
          }
          tma_load_2d(b + atom * Shape::kAtomBBytes, &rows, &full[stage], k0, static_cast<int>(c.row0), reuse_policy);
        }
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
  } else {
    // ---- consumer warpgroup: wgmma over the ring, then the epilogue ----
    using Mma = Wgmma<T, kTokens>;
    using Op = typename Mma::Op;
    using Acc = typename Mma::Acc;
    // FP8 sums go through a per-stage temporary added into fp32 accumulators ("promotion"), but
    // for per-tensor scales, whose sums stay in the wgmma accumulators across K (fast
    // accumulation, as our per-tensor prefill GEMM and vLLM's Hopper FP8 GEMMs): the per-stage
    // wait for the promotion cost 1-4.5% on the decode rows (benchmarks/NOTES.md).
    constexpr bool kPromote = std::is_same_v<T, float8_e4m3> && kScales != ScaleMode::kFastAtEnd;
    // Unpromoted 8-bit stages sum every atom into one set, and an atom past K is not loaded.
    static_assert(kPromote || sizeof(T) == 2 || kAtoms == 1,
                  "moe::cuda swap GEMM: unpromoted 8-bit sums take one K atom per stage");
    cuda::detail::grid_dependency_wait();  // before any store: the outputs may be what the previous kernel reads
    cuda::detail::allow_dependents_launch();
    if (blockIdx.x == 0 && threadIdx.x == 128 && p.splits_used != nullptr) *p.splits_used = split.count;
    const int t = threadIdx.x - 128;
    const int warp = t / 32, lane = t % 32;
    int stage = 0;
    std::uint32_t phase = 0;
    // Rows [0, 64) (gate) and [64, 128) (up) of the weight tile. Accumulator d[4c + 2i + j] holds
    // weight row 16*warp + lane/4 + 8i of its half and token 8c + 2*(lane%4) + j.
    // FP8: one set of stage sums per atom (each atom is its own 128-wide scale block), promoted
    // together after the stage's wait; others accumulate every atom into set 0.
    constexpr int kSets = kPromote ? kAtoms : 1;
    float facc0[kPromote ? kAcc : 1], facc1[kPromote ? kAcc : 1];
    Acc acc0[kSets][kAcc], acc1[kSets][kAcc];
    const auto token_of = [&](int idx) { return 8 * (idx / 4) + 2 * (lane % 4) + idx % 2; };
    for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
      const TileCoord c = locate<kTokens>(tile, prefix, p.num_experts, n_tiles, split, p);
      const int kb_begin = c.split * split.k_blocks_per_split;
      const int kb_end = min(k_blocks, kb_begin + split.k_blocks_per_split);
      // The tile's two weight halves, as rows of the expert (their scale rows).
      const int half0 = c.n0, half1 = gated ? p.gate_up_offset + c.n0 : c.n0 + kWeightRows / 2;
      if constexpr (kPromote) {
#pragma unroll
        for (int i = 0; i < kAcc; ++i) facc0[i] = facc1[i] = 0.0f;
      }
      // Block scales: the tile's whole run of K blocks is staged in shared memory at the tile's
      // start (weight scales of both halves, activation scales of its tokens), so a stage reads
      // its scales from shared memory. Loading them per stage from global memory, even a stage
      // ahead, held the consumer: under a saturated DRAM stream an L2 round trip outlasts a stage
      // (measured on the H200: block-scaled decode streamed at 2.3-3.0 TB/s against 3.9-4.2 for
      // per-tensor scales).
      // The tile's scale blocks: [sb_begin, sb_end) of the expert's K.
      [[maybe_unused]] const int sb_begin = kb_begin * kAtoms, sb_end = min(kb_end * kAtoms, scale_blocks);
      if constexpr (kScales == ScaleMode::kBlockPerStage) {
        const int sb_count = sb_end - sb_begin;
        named_barrier_sync(1, 128);  // the previous tile's reads are done
        const float* w0 = p.scales.weight(c.expert, half0) + sb_begin;
        const float* w1 = p.scales.weight(c.expert, half1) + sb_begin;
        for (int i = t; i < sb_count; i += 128) {
          tile_scales[i] = __ldg(w0 + i);
          tile_scales[scale_blocks + i] = __ldg(w1 + i);
        }
        float* xs = tile_scales + 2 * scale_blocks;
        for (int i = t; i < sb_count * kTokens; i += 128) {
          const int sbi = i / kTokens, tok = i % kTokens;
          xs[i] = tok < c.tokens ? __ldg(p.scales.x + (sb_begin + sbi) * p.scales.x_block_stride +
                                         (c.row0 + tok) * p.scales.x_row_step)
                                 : 0.0f;
        }
        named_barrier_sync(1, 128);
      }
      // One stage's wgmmas into (d0, d1): the gate and up halves of the tile.
      const auto issue = [&](Acc(&d0)[kSets][kAcc], Acc(&d1)[kSets][kAcc], int stage_, bool carry) {
        const std::uint32_t a = smem_base + stage_ * Shape::kStageBytes;
        const std::uint32_t b = a + Shape::kABytes;
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
        for (int atom = 0; atom < kAtoms; ++atom) {
          const std::uint32_t aa = a + atom * Shape::kAtomABytes;
          const std::uint32_t bb = b + atom * Shape::kAtomBBytes;
#pragma unroll
          for (int step = 0; step < 4; ++step) {  // 32 bytes of K per wgmma
            constexpr bool kPerAtom = kSets > 1;
            const int set = kPerAtom ? atom : 0;
            const bool accumulate = (kPerAtom ? false : carry || atom > 0) || step > 0;
            const std::uint64_t db = smem_desc_low(bb + 32 * step) | smem_desc_high();
            wgmma_call<Op>(smem_desc_low(aa + 32 * step) | smem_desc_high(), db, d0[set], accumulate,
                           std::make_index_sequence<kAcc>{});
            wgmma_call<Op>(smem_desc_low(aa + Shape::kAtomABytes / 2 + 32 * step) | smem_desc_high(), db, d1[set],
                           accumulate, std::make_index_sequence<kAcc>{});
          }
        }
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      };
      // FP8: add stage kb's sums (one set per atom = scale block), scaled, into the fp32
      // accumulators. An atom past K (zero-filled codes) has no scale block and adds nothing.
      [[maybe_unused]] const auto promote = [&](const Acc(&d0)[kSets][kAcc], const Acc(&d1)[kSets][kAcc], int kb) {
#pragma unroll
        for (int a = 0; a < kSets; ++a) {
          const int sb = kb * kAtoms + a;
          if (sb >= sb_end) break;
#pragma unroll
          for (int i = 0; i < kAcc; ++i) {
            if constexpr (kScales == ScaleMode::kBlockPerStage) {
              const int sbi = sb - sb_begin;  // (sum * s_x) * s_w, as the reference
              const float x = tile_scales[2 * scale_blocks + sbi * kTokens + token_of(i)];
              facc0[i] += d0[a][i] * x * tile_scales[sbi];
              facc1[i] += d1[a][i] * x * tile_scales[scale_blocks + sbi];
            } else {
              facc0[i] += d0[a][i];
              facc1[i] += d1[a][i];
            }
          }
        }
      };
      const auto next_stage = [&] {
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      };
      int previous = -1;  // the stage whose wgmmas may still be in flight
      for (int kb = kb_begin; kb < kb_end; ++kb) {
        mbar_wait_at(full_base + 8 * stage, phase);
        issue(acc0, acc1, stage, !kPromote && kb > kb_begin);
        if constexpr (kPromote) {
          // The stage's sums are needed now: wait for them, release the stage, add them in. (Two
          // sets of stage sums, one promoted while the other's wgmmas run, made ptxas serialize
          // every wgmma (C7514: it cannot tell which group a register belongs to); DeepGEMM and
          // CUTLASS's blockwise FP8 mainloop wait here too.)
          asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
          mbar_arrive_at(empty_base + 8 * stage);
          promote(acc0, acc1, kb);
        } else {
          // Keep this stage's group in flight while the next stage's data is awaited; release
          // the previous stage once its group has retired.
          asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
          if (previous >= 0) mbar_arrive_at(empty_base + 8 * previous);
          previous = stage;
        }
        next_stage();
      }
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
      if (previous >= 0) mbar_arrive_at(empty_base + 8 * previous);
      // Epilogue: the value of each accumulator (scaled for 8-bit operands), then the split's
      // partial sum or the epilogue tree.
#pragma unroll
      for (int idx = 0; idx < kAcc; ++idx) {
        const int tok = token_of(idx);
        const int r = 16 * warp + lane / 4 + 8 * ((idx / 2) % 2);
        if constexpr (interleaved) {
          // Box h's row r is output 32 h + r / 2's gate (r even) or up (r odd); row r ^ 1 sits in
          // lane ^ 4. The even lane stores both boxes' outputs (every lane shuffles first).
          const float v0 = acc_value(acc0[0][idx]), v1 = acc_value(acc1[0][idx]);
          const float up0 = __shfl_xor_sync(0xffffffffu, v0, 4), up1 = __shfl_xor_sync(0xffffffffu, v1, 4);
          if (tok >= c.tokens || (lane / 4) % 2 != 0) continue;
          store_tile_outputs<TOut, kGated, Expr, Activation>(p, c, split.count, r / 2, tok, v0, up0, act_args);
          store_tile_outputs<TOut, kGated, Expr, Activation>(p, c, split.count, 32 + r / 2, tok, v1, up1, act_args);
          continue;
        }
        if (tok >= c.tokens) continue;
        float v0, v1;
        if constexpr (kPromote) {
          v0 = facc0[idx];
          v1 = facc1[idx];
        } else {
          v0 = acc_value(acc0[0][idx]);
          v1 = acc_value(acc1[0][idx]);
        }
        if constexpr (kScales == ScaleMode::kPerRowAtEnd || kScales == ScaleMode::kFastAtEnd) {
          const float x = __ldg(p.scales.x + (c.row0 + tok) * p.scales.x_row_step);
          v0 = v0 * x * __ldg(p.scales.weight(c.expert, half0 + r));
          v1 = v1 * x * __ldg(p.scales.weight(c.expert, half1 + r));
        }
        store_tile_outputs<TOut, kGated, Expr, Activation>(p, c, split.count, r, tok, v0, v1, act_args);
      }
    }
  }
#else
  __trap();  // launched only after the host checked for an sm_90 device built with sm_90a
#endif
}

// out[row, n] = Expr(sum over splits, in order, of the partial sums) for the row of every slot
// (column k32_pair_slot(n) with `k32_pair_order_out`); nothing when the GEMM chose not to split
// (it stored the output itself).
template <class T, bool kGated, class Expr, class Activation>
__global__ void __launch_bounds__(256) reduce_splits_kernel(const float* partial, Index partial_rows,
                                                            const int* splits_used, int n_out, const Index* slot_row,
                                                            T* out, Index ldo, typename Activation::Arguments act_args,
                                                            bool k32_pair_order_out, const float* out_scale) {
  cuda::detail::grid_dependency_wait();
  cuda::detail::allow_dependents_launch();
  const int splits = *splits_used;
  if (splits <= 1) return;
  const Index row = slot_row[blockIdx.x];
  const int n = static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x);  // one column per thread:
  if (row < 0 || n >= n_out) return;                                      // decode grids are tiny
  const Index width = kGated ? 2 * static_cast<Index>(n_out) : n_out;
  {
    float a = 0.0f, b = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float* src = partial + (static_cast<Index>(s) * partial_rows + row) * width;
      a += src[n];
      if constexpr (kGated) b += src[n_out + n];
    }
    epilogue::ElementContext<Activation> ctx;
    ctx.args = act_args;
    ctx.col = n;
    if constexpr (kGated) {
      ctx.acc[1] = a;
      ctx.acc[2] = b;
    } else {
      ctx.acc[0] = a;
    }
    out[row * ldo + (k32_pair_order_out ? k32_pair_slot(n) : n)] = output_value<T, Expr>(Expr::eval(ctx), out_scale);
  }
}

// ---- host side ----------------------------------------------------------------------------------

// cuTensorMapEncodeTiled from the driver, found through the runtime (no link against libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A 2-D tensor map over a row-major [rows, k] matrix of 16- or 8-bit elements (row stride ld
// elements), boxes of one 128-byte atom x box_rows, 128-byte swizzle, zero fill past the edges.
template <class T>
Status make_tensor_map(CUtensorMap* map, const T* base, Index rows, Index k, Index ld, int box_rows) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 1, "moe::cuda swap GEMM: 16- or 8-bit operands");
  const auto encode = tensor_map_encoder();
  if (!encode) return make_status(StatusCode::kCudaError, "cuTensorMapEncodeTiled not available from the driver");
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld) * sizeof(T)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kAtomK<T>), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUtensorMapDataType type = std::is_same_v<T, bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                   : std::is_same_v<T, half>   ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                               : CU_TENSOR_MAP_DATA_TYPE_UINT8;  // codes: bits only
  const CUresult r = encode(map, type, 2, const_cast<T*>(base), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return make_status(StatusCode::kCudaError, "cuTensorMapEncodeTiled failed: ", static_cast<int>(r));
  return Status::ok();
}

// Whether this mainloop runs a GEMM over `w` [E, N, K]: experts packed back to back, 16-byte rows,
// coordinates within int32, and few enough experts for the shared-memory tile prefix.
template <class T>
bool applies(DeviceView<const T, 3> w, Index rows) {
  constexpr Index kVector = 16 / static_cast<Index>(sizeof(T));  // elements per 16 bytes
  return w.extent(0) <= kMaxExperts && w.stride(0) == w.extent(1) * w.stride(1) && w.stride(1) % kVector == 0 &&
         w.extent(2) % kVector == 0 && reinterpret_cast<std::uintptr_t>(w.data()) % 16 == 0 &&
         w.extent(0) * w.extent(1) < INT32_MAX && rows < INT32_MAX;
}

// out[rows, n_out] = Expr(rows x w[e]^T) for the rows of each expert. Gated: w has 2 * n_out rows
// per expert ([gate; up], or interleaved where Activation::kLayout says so). `x` is [num_rows, k] with row stride k. 8-bit operands (codes) come
// with `scales` (kScales says how they apply).
// With max_splits > 1, `partial` holds max_splits * num_rows * (gated ? 2 : 1) * n_out floats,
// `splits_used` one int, and the reduction runs over the rows named by `slot_row` (num_slots
// entries, -1 skipped) when the kernel chose to split.
template <class T, class TOut, int kTokens, int kAtoms, bool kGated, ScaleMode kScales, class Expr, class Activation>
Status launch(DeviceView<const T, 3> w, const T* x, Index num_rows, const Index* seg_begin, const Index* seg_count,
              Index n_out, TOut* out, Index ldo, const typename Activation::Arguments& act_args, const SwapScales& scales,
              int max_splits, float* partial, int* splits_used, const Index* slot_row, Index num_slots, bool programmatic,
              cudaStream_t stream, const float* out_scale = nullptr) {
  using Shape = TileShape<kTokens, kAtoms>;
  if (EncodesOutput<Expr> && out_scale == nullptr) {
    return invalid_argument("swap GEMM: out_scale: required by an epilogue that stores 8-bit codes, not given");
  }
  const Index experts = w.extent(0), n_total = w.extent(1), k = w.extent(2);
  CUtensorMap wmap, xmap;
  MOE_RETURN_IF_ERROR(make_tensor_map(&wmap, w.data(), experts * n_total, k, w.stride(1), kWeightRows / 2));
  MOE_RETURN_IF_ERROR(make_tensor_map(&xmap, x, num_rows, k, k, kTokens));
  SwapParams p{};
  p.seg_begin = seg_begin;
  p.seg_count = seg_count;
  p.num_experts = static_cast<int>(experts);
  p.k = static_cast<int>(k);
  p.n_out = static_cast<int>(n_out);
  constexpr bool kInterleaved = kGated && Activation::kLayout == GateUpLayout::kInterleaved;
  p.gate_up_offset = !kGated ? 0 : kInterleaved ? 1 : static_cast<int>(n_out);
  p.gate_row_step = kInterleaved ? 2 : 1;
  p.weight_rows_per_expert = n_total;
  p.out = out;
  p.ldo = ldo;
  p.max_splits = max_splits > 1 ? max_splits : 1;
  p.splits_used = p.max_splits > 1 ? splits_used : nullptr;
  p.partial = partial;
  p.partial_rows = num_rows;
  p.scales = scales;
  p.out_scale = out_scale;
  int device = 0, sms = 0;
  MOE_CUDA_TRY(cudaGetDevice(&device));
  MOE_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  auto* kernel = &swap_gemm_kernel<T, TOut, kTokens, kAtoms, kGated, kScales, Expr, Activation>;
  int smem = Shape::kSmemBytes;
  if constexpr (kScales == ScaleMode::kBlockPerStage) {
    smem += block_scale_smem_bytes(static_cast<int>((k + kAtomK<T> - 1) / kAtomK<T>), kTokens);
    if (smem > kMaxSmemBytes) {
      return unsupported("block-scaled FP8 GEMM: K = ", k, " needs ", smem, " bytes of shared memory per CTA for its ",
                         "stage ring and one tile's scales; the most is ", kMaxSmemBytes);
    }
  }
  MOE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  MOE_RETURN_IF_ERROR(
      cuda::detail::launch_kernel(kernel, sms, kThreads, smem, stream, programmatic, wmap, xmap, p, act_args));
  if (p.max_splits > 1) {
    const dim3 grid(static_cast<unsigned>(num_slots), static_cast<unsigned>((n_out + 255) / 256));
    MOE_RETURN_IF_ERROR(cuda::detail::launch_kernel(&reduce_splits_kernel<TOut, kGated, Expr, Activation>, grid, 256, 0,
                                                    stream, programmatic, partial, num_rows, splits_used, p.n_out,
                                                    slot_row, out, ldo, act_args, false, out_scale));
  }
  return Status::ok();
}

}  // namespace moe::cuda::gemm::swap_detail
