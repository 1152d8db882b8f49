// Hopper weight-only grouped expert GEMM for decode: the swap mainloop (sm90_swap_mainloop.cuh)
// with 4-bit codes dequantized from shared memory into the registers of a register-sourced wgmma:
// integers (moe/quant/weight_only.h: W4A16, no zero points) or E2M1 with E8M0 scales
// (moe/quant/mxfp4.h: MXFP4, gpt-oss), either w13 layout, expert biases fused.
//
//   out[row0(e) + t, n] = Expr( sum_k IO(float(q[e, n, k] - z) * IO(s[e, n, k / group])) * x[row0(e) + t, k] + bias[e, n] )
//   (MXFP4: IO(e2m1(q) * 2^(s - 127)) in place of the integer dequantization)
//
// Why: decode reads each touched expert's codes once, so the GEMM is a stream of packed bytes. The
// register GEMM (weight_only_gemm.cuh) holds its loads in registers and streams 0.5-1.8 TB/s; here
// TMA keeps a ring of stages in flight per SM as the bf16 swap mainloop does (4.1-4.3 TB/s there).
//
// Tile: 128 weight rows (two 64-row halves: gated GEMM1's gate rows of outputs [n0, n0 + 64) and
// their up rows, else rows [n0, n0 + 128)) x kTokens (8, 16, 32; 64 or 128 for MXFP4's prefill) tokens of one expert. Gate and
// up rows [gate; up] are two 2-D boxes I rows apart; interleaved (gpt-oss: gate 2j, up 2j + 1) the
// tile's 128 consecutive rows, whose even and odd rows the consumers read as the halves. A stage is 256 K: per half one
// 128-byte TMA box of codes per row (128B swizzle), four 64-K boxes of the rows (bf16, 128B
// swizzle, wgmma's B), and the stage's scales ([tile row][group]). Integer codes: float scales,
// copied by producer warps 1..3 with cp.async (a row's groups in one 8- or 16-byte copy where they
// divide into the stage's and the base is aligned, else 4 bytes each) that arrive on the stage's
// barrier. MXFP4: a byte per 32 K, in rows of K / 32 bytes that cp.async cannot take (not 4-byte
// aligned), loaded by the same warps with plain loads, a warp per third of the ring's slots, and
// stored as the bf16 pairs the conversion multiplies by.
//
// Dequantization (consumer warpgroups): a wgmma m64nNk16 A fragment gives thread (g = lane / 4,
// q = lane % 4) rows g and g + 8 of its warp's 16 and slot pairs (2q, 2q + 1) and (2q + 8, 2q + 9)
// of each 16-K step. The rows (wgmma's B, in shared memory) come with K in a pair order within
// each 32 K (swap_detail::k32_pair_slot: the input is reordered once per GEMM1, and GEMM1 stores
// its output so for GEMM2) in which those slots of the two steps of a 32-K chunk hold codes
// 8q .. 8q + 7 as nibble pairs (d, d + 4): the thread's one 4-byte shared load per row and chunk,
// and per 32-bit register one shift, one lop3 (mask, or the bf16 128.0 exponent, flip the
// two's-complement top bit), sub (128 + z) and mul (the IO-rounded scale): exactly the scheme's
// one rounding, as the register GEMM and the CPU reference round. (With the rows in natural K
// order a register needed a byte permute and a multiply more: 7-11% slower on the decode rows.)
// Two consumer warpgroups split each stage's K (the first 128, the last 128) with accumulators of
// their own, added in a fixed order at the tile's end (deterministic): the conversion is a chain
// of dependent instructions per register, and one warp per scheduler left it latency-bound
// (measured on the H200: 44% of issue slots busy, tensor pipe 9%). With 64 or 128 tokens (MXFP4's
// prefill) each warpgroup takes 64 of the rows over the whole stage instead (gated: the gate and
// up rows of 32 outputs, paired in each thread), and stores its own outputs.
// E2M1 codes (e2m1_pair): per pair a mask, a multiply that copies the nibbles into place, a mask,
// and one multiply by the scale pair where the stage's scale warp folded 2^126 into its scales
// (every E8M0 scale <= 128, gpt-oss's all), else two: exact up to the scheme's one rounding either
// way. MXFP4 at gpt-oss's decode rows (H200): 1.8-2.0x bf16 speed; its conversion and scale loads
// cost 10-15% over W4A16's.
// Pipelining within a warpgroup: 64 K (four steps, both halves) are converted into one of two
// register sets while the other set's wgmmas run; a stage is released once the next stage's first
// wgmma group has been issued and the group before it retired. Expert biases are added to the
// accumulators at the tile's end (row_biases), before the epilogue.
#pragma once

#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "moe/cuda/gemm/sm90_swap_mainloop.cuh"
#include "moe/cuda/gemm/weight_only_gemm.cuh"

namespace moe::cuda::gemm::weight_only_swap {

using swap_detail::kMaxExperts;
constexpr int kConsumers = 2;                // consumer warpgroups: each takes half of every stage's K
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kStageK = 256;                 // K per stage: 128 bytes of 4-bit codes per row
constexpr int kHalfCodeBytes = 64 * 128;     // one 64-row half of a stage's codes
constexpr int kCodeBytes = 2 * kHalfCodeBytes;
constexpr int kScaleThreads = 96;            // producer warps 1..3
constexpr int kMaxStages = 12;
constexpr int kRingBudget = 212 * 1024;      // shared memory for the ring (the rest: prefix, exchange, slack)

// The stage layout of one launch (the scales' part depends on the group size).
struct StageLayout {
  int groups_per_stage = 1;  // scale groups of one row in one stage
  int chunk_group_shift = 3;  // the group of 32-K chunk c (0..7) of a stage: c >> shift
  // The scale slot is [tile row][group] (4 * groups_per_stage bytes per row), filled with copies
  // of scale_copy_bytes: a row's groups of a stage at once (8 or 16 bytes) where the row's
  // groups divide into the stage's, else one group per copy.
  int scale_copy_bytes = 4;
  int scale_offset = 0, bytes = 0, stages = 0;

  // kEightGroups: every stage holds eight groups of 32 per row, whatever K (MXFP4: the scale warps
  // fill and the consumers read a slot of that shape, even where K is a single group).
  template <int kTokens, bool kEightGroups = false>
  static StageLayout of(Index group_size, Index k) {
    StageLayout l;
    const bool one_group = !kEightGroups && (group_size >= k || group_size % kStageK == 0);
    l.groups_per_stage = one_group ? 1 : static_cast<int>(kStageK / group_size);
    l.chunk_group_shift = one_group ? 3 : group_size == 32 ? 0 : group_size == 64 ? 1 : 2;
    const Index groups = (k + group_size - 1) / group_size;
    l.scale_copy_bytes = groups % l.groups_per_stage == 0 ? std::min(16, 4 * l.groups_per_stage) : 4;
    l.scale_offset = kCodeBytes + 4 * kTokens * 128;
    l.bytes = (l.scale_offset + 128 * l.groups_per_stage * 4 + 1023) / 1024 * 1024;
    // The kernel's static shared memory beside the ring: the consumers' exchange (kTokens x 128
    // floats; from 64 tokens none), the tile prefix, barriers and flags.
    constexpr int kStatic = (kTokens >= 64 ? 1 : kTokens) * 128 * 4 + (kMaxExperts + 1) * 4 + 1024;
    constexpr int kBudget = std::min(kRingBudget, 227 * 1024 - 1024 - kStatic);  // 1024: the ring's alignment
    l.stages = std::min(kBudget / l.bytes, kMaxStages);
    return l;
  }
};

struct Params {
  swap_detail::SwapParams swap;  // rows, counts, output, K split (its `scales` unused)
  const float* scale;            // [E, n_total, groups] (4-bit integer codes)
  const std::uint8_t* scale_e8m0;  // [E, n_total, groups] (E2M1 codes: MXFP4)
  int groups;                    // per row
  int group_size;                // K per group (>= k: per channel)
  StageLayout stage;
  std::uint32_t magic;           // lop3's constant: bf16 128.0 pairs, | the code's top bit when two's complement
  std::uint32_t zero_pair;       // bf16 pair of 128 + the default zero point
};

// The GEMM's K order (k32_pair_slot), as weight_only::order_k places columns.
struct K32PairOrder {
  static constexpr int at(int k) { return swap_detail::k32_pair_slot(k); }
};

// rows[slot_row[m * top_k + j], k32_pair_slot(k)] = hidden[m, k] for each token m and its slots
// (-1 skipped): GEMM1's input gathered from the token rows straight into the pair order, in place
// of the prepare's gather (one pass, no extra launch). Keeps the programmatic-launch contract.
template <class IO>
__global__ void __launch_bounds__(256) gather_pair_order_kernel(const IO* __restrict__ hidden, Index ld, int top_k,
                                                                const Index* __restrict__ slot_row, int k,
                                                                IO* __restrict__ rows) {
  cuda::detail::grid_dependency_wait();
  cuda::detail::allow_dependents_launch();
  const Index m = blockIdx.x;
  const IO* src = hidden + m * ld;
  for (int c = static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x); c < k; c += static_cast<int>(gridDim.y * blockDim.x)) {
    const IO v = src[c];
    const int at = swap_detail::k32_pair_slot(c);
    for (int j = 0; j < top_k; ++j) {
      const Index r = slot_row[m * top_k + j];
      if (r >= 0) rows[r * k + at] = v;
    }
  }
}

template <class IO>
Status gather_pair_order(const IO* hidden, Index ld, Index tokens, int top_k, const Index* slot_row, Index k, IO* rows,
                         bool programmatic, cudaStream_t stream) {
  if (tokens == 0) return Status::ok();
  const Index column_blocks = std::max<Index>(1, std::min<Index>(8, k / 1024));
  return cuda::detail::launch_kernel(&gather_pair_order_kernel<IO>,
                                     dim3(static_cast<unsigned>(tokens), static_cast<unsigned>(column_blocks)), 256, 0,
                                     stream, programmatic, hidden, ld, top_k, slot_row, static_cast<int>(k), rows);
}

// Why this GEMM cannot take a weight with these properties, or nullptr. Codes [E, N, K / 2] bytes.
inline const char* refusal(Index experts, Index n_total, Index k, Index expert_stride, Index row_stride, const void* w,
                           Index group_size, Index rows) {
  if (experts > kMaxExperts) return "at most 1024 local experts";
  if (k % 32 != 0) return "K a multiple of 32";
  if (row_stride % 16 != 0 || reinterpret_cast<std::uintptr_t>(w) % 16 != 0) return "16-byte aligned rows of codes";
  if (expert_stride != n_total * row_stride) return "experts packed back to back";
  if (experts * n_total >= INT32_MAX || rows >= INT32_MAX || k >= INT32_MAX / 2) return "coordinates within int32";
  if (!(group_size >= k || group_size % kStageK == 0 || group_size == 32 || group_size == 64 || group_size == 128)) {
    return "groups of 32, 64, 128, a multiple of 256, or per channel";
  }
  return nullptr;
}

// A cp.async of kBytes (4, 8 or 16; zero-filled when not valid).
template <int kBytes>
__device__ __forceinline__ void cp_async(std::uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(dst), "l"(src), "n"(kBytes), "r"(valid ? kBytes : 0)
               : "memory");
}
// Arrives on `bar` once this thread's earlier cp.async copies have landed (counted in its init).
__device__ __forceinline__ void cp_async_arrive_at(std::uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}

// One bf16 pair IO((q - z) * s) of a fragment from a word of 8 codes shifted so that the pair's
// nibbles sit at bits 0..3 and 16..19: one lop3 (mask, or the bf16 128.0 exponent, flip the
// two's-complement top bit), sub 128 + z, mul by the IO-rounded scale.
__device__ __forceinline__ std::uint32_t dequant_pair(std::uint32_t shifted, std::uint32_t magic,
                                                      std::uint32_t zero_pair, std::uint32_t scale_pair) {
  std::uint32_t biased;  // mask ? shifted ^ magic : magic  ==  0x4300 | code (top bit flipped when signed)
  asm("lop3.b32 %0, %1, %2, %3, 0x6A;" : "=r"(biased) : "r"(shifted), "r"(0x000F000Fu), "r"(magic));
  std::uint32_t v;
  asm("{ sub.rn.bf16x2 %0, %1, %2; mul.rn.bf16x2 %0, %0, %3; }"
      : "=r"(v)
      : "r"(biased), "r"(zero_pair), "r"(scale_pair));
  return v;
}
// One bf16 pair of E2M1 codes (MXFP4) from a word whose pair's nibbles sit at bits 4n..4n + 3 and
// 16 + 4n.. (n = kNibble, 0 or 1): the multiply copies each nibble to bits 6..9 and 12..15 (no
// carries: the copies do not overlap), the mask keeps the sign at bit 15 and exponent and
// mantissa at bits 8..6, which is the code's value times 2^-126 (a subnormal for exponent 0).
// Times 2^126 (exact) and then the scale 2^(s - 127) gives IO(e2m1 * 2^(s - 127)) with the
// scheme's one rounding; kFolded: the scale pair is 2^(s - 1) (e8m0_pair), one multiply, the
// same bits (the product is exact before its one rounding either way).
template <int kNibble, bool kFolded>
__device__ __forceinline__ std::uint32_t e2m1_pair(std::uint32_t word, std::uint32_t scale_pair) {
  const std::uint32_t nibbles = word & (0x000F000Fu << (4 * kNibble));
  const std::uint32_t placed = (nibbles * (kNibble == 0 ? 0x1040u : 0x0104u)) & 0x81C081C0u;
  std::uint32_t v;
  if constexpr (kFolded) {
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(v) : "r"(placed), "r"(scale_pair));
  } else {
    asm("{ mul.rn.bf16x2 %0, %1, %2; mul.rn.bf16x2 %0, %0, %3; }" : "=r"(v) : "r"(placed), "r"(0x7E807E80u), "r"(scale_pair));
  }
  return v;
}
// The bf16 pair of an E8M0 scale 2^(s - 127) (s = 0: a subnormal; 255: NaN); kFolded: 2^(s - 1) =
// 2^126 x 2^(s - 127), which bf16 holds for s <= 128 (the scale warps fold a stage only where all
// its scales are), one multiply-add: (s + 126) << 7 in both halves.
template <bool kFolded>
__device__ __forceinline__ std::uint32_t e8m0_pair(unsigned s) {
  if constexpr (kFolded) {
    return s * 0x00800080u + 0x3F003F00u;
  } else {
    return (s == 255 ? 0x7FC0u : s == 0 ? 0x0040u : s << 7) * 0x00010001u;
  }
}
__device__ __forceinline__ uint2 lds64(std::uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}
__device__ __forceinline__ std::uint32_t lds32(std::uint32_t addr) {
  std::uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ void sts32(std::uint32_t addr, std::uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ float lds32f(std::uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ std::uint32_t bf16_pair(float v) {
  std::uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(r) : "f"(v));
  return r;
}

template <int kTokens>
struct RsWgmma;
template <>
struct RsWgmma<8> {
  using Op = cute::SM90::GMMA::MMA_64x8x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
};
template <>
struct RsWgmma<16> {
  using Op = cute::SM90::GMMA::MMA_64x16x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
};
template <>
struct RsWgmma<32> {
  using Op = cute::SM90::GMMA::MMA_64x32x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
};
template <>
struct RsWgmma<64> {
  using Op = cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
};
template <>
struct RsWgmma<128> {
  using Op = cute::SM90::GMMA::MMA_64x128x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
};
template <class Op, int N, std::size_t... I>
__device__ __forceinline__ void rs_wgmma(const std::uint32_t (&a)[4], std::uint64_t b, float (&d)[N],
                                         std::index_sequence<I...>) {
  Op::fma(a[0], a[1], a[2], a[3], b, d[I]..., cute::SM90::GMMA::ScaleOut::One);
}

// kInterleaved: gated w13 with gate and up rows alternating (gpt-oss), the tile's 128 rows loaded in
// that order and read as the two halves; kFp4: E2M1 codes with E8M0 scales (MXFP4), else 4-bit integers
// with float scales; kScalePerChunk: groups narrower than 128 (a scale per 32-K chunk), else one per
// half stage.
template <int kTokens, bool kGated, bool kInterleaved, bool kFp4, bool kScalePerChunk, class Expr, class Activation>
__global__ void __launch_bounds__(kThreads, 1)
    w4_swap_gemm_kernel(const __grid_constant__ CUtensorMap codes, const __grid_constant__ CUtensorMap rows, Params p,
                        typename Activation::Arguments act_args) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace swap_detail;
  using IO = bfloat16;
  constexpr int kAcc = kTokens / 2;
  constexpr int kRowAtomBytes = kTokens * 128;  // one 64-K box of the rows
  extern __shared__ unsigned char smem_raw[];
  // The ring starts at the first 1024-byte boundary (128B swizzle), computed on the shared address
  // (from the symbol: no generic-to-shared conversion, which the loops would otherwise redo per
  // stage); `smem` is the same place as a generic pointer.
  const std::uint32_t smem_base = held_in_register((smem_addr(smem_raw) + 1023) & ~1023u);
  unsigned char* smem = smem_raw + (smem_base - smem_addr(smem_raw));
  __shared__ std::uint64_t full[kMaxStages], empty[kMaxStages];
  __shared__ int prefix[kMaxExperts + 1];
  __shared__ int folded[kMaxStages];  // MXFP4: the ring slot's scales hold 2^(s - 1) (e8m0_pair)
  const SwapParams& sp = p.swap;
  const int stages = p.stage.stages, stage_bytes = p.stage.bytes;
  const int n_tiles = (sp.n_out + (kGated ? 63 : 127)) / (kGated ? 64 : 128);
  if (threadIdx.x < 32) build_tile_prefix<kTokens>(sp, n_tiles, prefix);
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      // The TMA thread's expect_tx, and the scale threads' copies (MXFP4: one warp's stores).
      mbar_init(&full[s], 1 + (kFp4 ? 32 : kScaleThreads));
      mbar_init(&empty[s], 128 * kConsumers);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  // Shared addresses converted once: the loops below add offsets to them.
  const std::uint32_t full_base = held_in_register(smem_addr(full)), empty_base = held_in_register(smem_addr(empty));
  const int k_blocks = (sp.k + kStageK - 1) / kStageK;
  const KSplit split = KSplit::of(prefix[sp.num_experts], k_blocks, static_cast<int>(gridDim.x), sp.max_splits);
  const int total = prefix[sp.num_experts] * split.count;
  // Tile `tile`'s place and its K blocks [kb_begin, kb_end) (its split's), the same in every role.
  struct TileRange {
    TileCoord c;
    int kb_begin, kb_end;
  };
  const auto tile_range = [&](int tile) {
    TileRange t;
    t.c = locate<kTokens>(tile, prefix, sp.num_experts, n_tiles, split, sp);
    t.kb_begin = t.c.split * split.k_blocks_per_split;
    t.kb_end = min(k_blocks, t.kb_begin + split.k_blocks_per_split);
    return t;
  };
  // The codes of a tile's two halves for K block kb: two 64-row boxes of the [E * N_total] rows
  // (interleaved: the tile's 128 consecutive rows, read as even and odd halves by the consumers).
  const auto load_codes = [&](unsigned char* a, std::uint64_t* bar, const TileCoord& c, int kb, std::uint64_t policy) {
    if constexpr (kInterleaved) {  // the 64 row pairs of outputs [n0, n0 + 64): 128 rows in order
      const int w0 = static_cast<int>(c.expert * sp.weight_rows_per_expert) + 2 * c.n0;
      tma_load_2d(a, &codes, bar, kb * 128, w0, policy);
      tma_load_2d(a + kHalfCodeBytes, &codes, bar, kb * 128, w0 + 64, policy);
    } else {
      const int w0 = static_cast<int>(c.expert * sp.weight_rows_per_expert) + c.n0;
      tma_load_2d(a, &codes, bar, kb * 128, w0, policy);
      tma_load_2d(a + kHalfCodeBytes, &codes, bar, kb * 128, kGated ? w0 + sp.gate_up_offset : w0 + 64, policy);
    }
  };
  // Row of the expert holding tile row R (half R / 64), and whether its output is in range.
  const auto expert_row = [&](const TileCoord& c, int R, bool* in_range) {
    const int h = R / 64, r = R % 64;
    *in_range = R < 128 && (kGated ? c.n0 + r : c.n0 + R) < sp.n_out;
    return kGated ? (c.n0 + r) * sp.gate_row_step + h * sp.gate_up_offset : c.n0 + R;
  };

  if (threadIdx.x < 128) {
    if (threadIdx.x >= 32) {
      // Scales are constant weights: no grid dependency to wait for.
      cuda::detail::allow_dependents_launch();
      if constexpr (kFp4) {
        // ---- MXFP4 scale warps: E8M0 bytes -> bf16 pairs in the slot ----
        // Plain loads (a row's K / 32 bytes need not be 4-byte aligned for cp.async). Warp w
        // (0..2) fills the ring slots s with s % 3 == w, in ring order (so its parity waits never
        // skip a phase): it issues a stage's loads before waiting for the slot, and the three warps
        // keep three stages' loads in flight. Lane = (quarter, group): tile rows R = 4 i + quarter
        // (i < 16: half 0, row 4 i + quarter; else half 1), each the scale of group kb * 8 + group.
        // Rows past the outputs and groups past K load nothing and take a finite stand-in (127):
        // their codes are zero-filled or their sums never stored, and 0 x NaN must not reach a sum.
        const int scale_warp = static_cast<int>(threadIdx.x) / 32 - 1, lane = static_cast<int>(threadIdx.x) % 32;
        const int group = lane % 8, quarter = lane / 8;
        int stage = 0;
        std::uint32_t phase = 0;
        for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
          const auto [c, kb_begin, kb_end] = tile_range(tile);
          // The lane's rows: i -> base[i / 16] + (i % 16) * step (rows 4 apart: gate/up pairs 8
          // apart when interleaved), and how many of each half are outputs.
          const int first = c.n0 + quarter;
          const Index step = Index{4} * (kGated ? sp.gate_row_step : 1) * p.groups;
          const std::uint8_t* base0 = p.scale_e8m0 +
                                      (static_cast<Index>(c.expert) * sp.weight_rows_per_expert +
                                       (kGated ? static_cast<Index>(first) * sp.gate_row_step : first)) * p.groups + group;
          const std::uint8_t* base1 = kGated ? base0 + static_cast<Index>(sp.gate_up_offset) * p.groups : base0 + 16 * step;
          const int rows_in = max(0, (sp.n_out - first + 3) / 4);  // i (ungated) or i % 16 (gated) below it
          for (int kb = kb_begin; kb < kb_end; ++kb) {
            if (stage % 3 == scale_warp) {
              const bool group_in = kb * 8 + group < p.groups;
              const std::uint8_t* const at[2] = {base0 + kb * 8, base1 + kb * 8};
              unsigned v[32];
              bool overflows = false;  // a scale past 2^1, or NaN: 2^(s - 1) does not fit bf16
#pragma unroll
              for (int i = 0; i < 32; ++i) {
                const bool in = group_in && (kGated ? i % 16 : i) < rows_in;
                v[i] = in ? __ldg(at[i / 16] + (i % 16) * step) : 127u;
                overflows |= v[i] > 128;
              }
              // Fold 2^126 into the stage's scales where bf16 holds every 2^(s - 1): the consumers'
              // conversion is then one multiply per pair in place of two.
              const bool fold = !__any_sync(0xFFFFFFFFu, overflows);
              mbar_wait_at(empty_base + 8 * stage, phase ^ 1);
              const std::uint32_t slot = smem_base + stage * stage_bytes + p.stage.scale_offset + 4 * group + 32 * quarter;
              if (fold) {
#pragma unroll
                for (int i = 0; i < 32; ++i) sts32(slot + 128 * i, e8m0_pair<true>(v[i]));
              } else {
#pragma unroll
                for (int i = 0; i < 32; ++i) sts32(slot + 128 * i, e8m0_pair<false>(v[i]));
              }
              if (lane == 0) folded[stage] = fold;
              mbar_arrive_at(full_base + 8 * stage);  // release: the stores before it
            }
            if (++stage == stages) {
              stage = 0;
              phase ^= 1;
            }
          }
        }
        return;
      }
      // ---- scale threads: the stage's scales, cp.async of 4, 8 or 16 bytes ----
      // Thread st copies tile rows st and st + 96 (< 128; warp-uniform: warp 1 alone has a
      // second), every group of the stage, into the slot's [tile row R = 64 half + r][group].
      const int st = static_cast<int>(threadIdx.x) - 32;
      const int groups_per_stage = p.stage.groups_per_stage;
      const int row_bytes = 4 * groups_per_stage;
      // Stage kb's first group: (kb / stages_per_group) * groups_per_stage (one group spans
      // several stages for groups of 512 and more; per channel, one group spans all of them).
      const int stages_per_group = p.group_size >= sp.k ? INT_MAX : max(1, p.group_size / kStageK);
      const std::uint32_t scale_base = smem_base + p.stage.scale_offset + row_bytes * st;
      // The copy width is a constant of each instance of the loop (one branch here, none per copy).
      const auto copy_scales = [&]<int kCopyBytes>() {
        int stage = 0;
        std::uint32_t phase = 0;
        for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
          const auto [c, kb_begin, kb_end] = tile_range(tile);
          const float* expert_scales = p.scale + static_cast<Index>(c.expert) * sp.weight_rows_per_expert * p.groups;
          const float* src[2];
          bool row_ok[2];
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int n = expert_row(c, st + kScaleThreads * u, &row_ok[u]);
            src[u] = expert_scales + static_cast<Index>(row_ok[u] ? n : 0) * p.groups;
          }
          int group_stage = kb_begin / stages_per_group, stage_in_group = kb_begin % stages_per_group;
          for (int kb = kb_begin; kb < kb_end; ++kb) {
            mbar_wait_at(empty_base + 8 * stage, phase ^ 1);
            const std::uint32_t slot = scale_base + stage * stage_bytes;
            const int g0 = group_stage * groups_per_stage;
#pragma unroll 1
            for (int b = 0; b < row_bytes; b += kCopyBytes) {
              const int j = b / 4;
              const bool group_ok = g0 + j < p.groups;  // a wide copy's groups are all in K or all past it
#pragma unroll
              for (int u = 0; u < 2; ++u) {
                if (u == 1 && st >= 128 - kScaleThreads) break;
                const bool ok = row_ok[u] && group_ok;
                cp_async<kCopyBytes>(slot + row_bytes * kScaleThreads * u + b, ok ? src[u] + g0 + j : p.scale, ok);
              }
            }
            if (++stage_in_group == stages_per_group) {
              stage_in_group = 0;
              ++group_stage;
            }
            cp_async_arrive_at(full_base + 8 * stage);
            if (++stage == stages) {
              stage = 0;
              phase ^= 1;
            }
          }
        }
      };
      if (p.stage.scale_copy_bytes == 16) {
        copy_scales.template operator()<16>();
      } else if (p.stage.scale_copy_bytes == 8) {
        copy_scales.template operator()<8>();
      } else {
        copy_scales.template operator()<4>();
      }
      asm volatile("cp.async.wait_all;" ::: "memory");
      return;
    }
    if (threadIdx.x != 0) {
      cuda::detail::grid_dependency_wait();
      cuda::detail::allow_dependents_launch();
      return;
    }
    // ---- TMA thread: codes of both halves, then the rows; the first tile's codes before the wait ----
    const std::uint64_t stream_policy = l2_evict_first_policy(), reuse_policy = l2_evict_last_policy();
    const auto row_atoms = [&](int kb) { return min(4, (sp.k - kb * kStageK + 63) / 64); };
    const auto tx_bytes = [&](int kb) { return static_cast<std::uint32_t>(kCodeBytes + row_atoms(kb) * kRowAtomBytes); };
    int prefetched = 0;
    if (static_cast<int>(blockIdx.x) < total) {
      const auto [c, kb_begin, kb_end] = tile_range(static_cast<int>(blockIdx.x));
      for (int kb = kb_begin; kb < kb_end && prefetched < stages; ++kb, ++prefetched) {
        mbar_expect_tx(&full[prefetched], tx_bytes(kb));
        load_codes(smem + prefetched * stage_bytes, &full[prefetched], c, kb, stream_policy);
      }
    }
    cuda::detail::grid_dependency_wait();
    cuda::detail::allow_dependents_launch();
    int stage = 0;
    std::uint32_t phase = 0;
    int issued = 0;
    for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
      const auto [c, kb_begin, kb_end] = tile_range(tile);
      for (int kb = kb_begin; kb < kb_end; ++kb, ++issued) {
        unsigned char* a = smem + stage * stage_bytes;
        if (issued >= prefetched) {
          mbar_wait_at(empty_base + 8 * stage, phase ^ 1);
          mbar_expect_tx(&full[stage], tx_bytes(kb));
          load_codes(a, &full[stage], c, kb, stream_policy);
        }
        // Boxes wholly past K are not issued; the consumer skips their steps.
        for (int atom = 0; atom < row_atoms(kb); ++atom) {
          tma_load_2d(a + kCodeBytes + atom * kRowAtomBytes, &rows, &full[stage], kb * kStageK + 64 * atom,
                      static_cast<int>(c.row0), reuse_policy);
        }
        if (++stage == stages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
  } else {
    // ---- consumer warpgroups: codes -> bf16 A fragments -> wgmma, then the epilogue ----
    using Op = typename RsWgmma<kTokens>::Op;
    // Two ways to share a stage. Below 64 tokens each warpgroup takes half of its K for all 128
    // weight rows (kHalves 2: two m64 products per step), and the second one's sums reach the first
    // through `exchange`. From 64 tokens (kPaired: MXFP4's prefill) each takes 64 of the rows over
    // the whole stage, one m64 product per step, so that its accumulators stay at kTokens / 2 per
    // thread: gated, the thread's wgmma rows g and g + 8 are the gate and up rows of one output
    // (f below), so the activation needs nothing from another thread; ungated, the warpgroup's
    // half. Either way a warpgroup converts 128 x 128 codes per stage.
    constexpr bool kPaired = kTokens >= 64;
    constexpr int kHalves = kPaired ? 1 : 2;  // m64 products per warpgroup and step
    constexpr int kChunks = kPaired ? 8 : 4;  // 32-K chunks of a stage per warpgroup
    constexpr int kSteps64 = kChunks / 2;     // 64-K steps (register sets) per stage
    cuda::detail::grid_dependency_wait();  // before any store: the outputs may be what the previous kernel reads
    cuda::detail::allow_dependents_launch();
    if (blockIdx.x == 0 && threadIdx.x == 128 && sp.splits_used != nullptr) *sp.splits_used = split.count;
    const int wg = (static_cast<int>(threadIdx.x) - 128) / 128;  // K half of each stage, or row half (kPaired)
    const int t = (static_cast<int>(threadIdx.x) - 128) % 128;
    const int warp = t / 32, lane = t % 32, g = lane / 4, q = lane % 4;
    const std::uint32_t magic = p.magic, zero_pair = p.zero_pair;
    // Per thread and loop invariant: the byte offset of its word (q) of each of this warpgroup's
    // four 32-K chunks within its rows (128B swizzle: 16-byte unit chunk ^ row % 8, and
    // row % 8 == g, or 2 g + h interleaved), of each chunk's scale group within a row of the scale slot, and of its four
    // scale rows (g and g + 8 of the warp's 16, both halves) in the slot.
    // Interleaved rows: the thread's gate row r = 16 warp + g + 8 i is shared row 2 r and its up
    // row 2 r + 1 (the tile's 128 rows in checkpoint order), so a row's place in its 8-row swizzle
    // group, 2 g + h, depends on the half.
    // kPaired: the thread's rows i = 0, 1 (wgmma rows g, g + 8): gated, the gate and up rows of
    // output f, ungated rows 64 wg + 16 warp + g + 8 i; their place in the stage's 128 code rows
    // (interleaved: 2 f + i) and in the scale slot ([half][row]).
    const int f = 32 * wg + 8 * warp + g;
    const auto paired_code_row = [&](int i) {
      return kGated ? (kInterleaved ? 2 * f + i : 64 * i + f) : 64 * wg + 16 * warp + g + 8 * i;
    };
    const auto paired_scale_row = [&](int i) { return kGated ? 64 * i + f : paired_code_row(i); };
    // kPaired: row i's word q of chunk c is at (stage + pair_base[i]) ^ (c << 4): the stage is
    // 1024-byte aligned and the row's swizzle, (c ^ row % 8) << 4, only touches bits 4..6 (one
    // register per row in place of one per row and chunk: the 128-token tile spilled without it).
    std::uint32_t chunk_off[kPaired ? 1 : kHalves][kChunks], group_off[kChunks], scale_row_off[kHalves][2];
    std::uint32_t pair_base[kPaired ? 2 : 1];
    if constexpr (kPaired) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = paired_code_row(i);
        pair_base[i] = static_cast<std::uint32_t>(row * 128 + ((row % 8) << 4) + 4 * q);
      }
    }
#pragma unroll
    for (int cc = 0; cc < kChunks; ++cc) {
      const int chunk = kPaired ? cc : 4 * wg + cc;
      if constexpr (!kPaired) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int swizzle_row = kInterleaved ? (2 * g + h) % 8 : g;
          chunk_off[h][cc] = static_cast<std::uint32_t>(((chunk ^ swizzle_row) << 4) + 4 * q);
        }
      }
      group_off[cc] = static_cast<std::uint32_t>((chunk >> p.stage.chunk_group_shift) * 4);
    }
    const int scale_row_bytes = 4 * p.stage.groups_per_stage;
#pragma unroll
    for (int hh = 0; hh < kHalves; ++hh)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = kPaired ? paired_scale_row(i) : 64 * hh + 16 * warp + g + 8 * i;
        scale_row_off[hh][i] = static_cast<std::uint32_t>(p.stage.scale_offset + row * scale_row_bytes);
      }
    const std::uint32_t row_off = static_cast<std::uint32_t>((kInterleaved ? 32 * warp + 2 * g : 16 * warp + g) * 128);
    // From the thread's first row: the other half's row, and row g + 8 of the warp's 16.
    constexpr std::uint32_t kHalfStep = kInterleaved ? 128 : kHalfCodeBytes;
    constexpr std::uint32_t kRowStep8 = kInterleaved ? 16 * 128 : 8 * 128;
    // __shared__ exchange: the second warpgroup's sums, read by the first at each tile's end.
    __shared__ float exchange[kPaired ? 1 : 2 * kAcc][128];
    int stage = 0;
    std::uint32_t phase = 0;
    for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
      const auto [c, kb_begin, kb_end] = tile_range(tile);
      // The expert biases of the thread's two rows (g and g + 8 of its warp's 16), loaded before the
      // tile's K loop so that their latency hides under it (after it, each tile's epilogue waited
      // on them: 5-6% of gpt-oss's decode rows).
      float bias[2][2] = {};
      if constexpr (kPaired) {  // gated: output f's gate and up; ungated: rows i of either half
        if constexpr (kGated) {
          row_biases<IO, kGated>(sp, c, f, &bias[0][0], &bias[1][0]);
        } else {
#pragma unroll
          for (int i = 0; i < 2; ++i) row_biases<IO, kGated>(sp, c, 16 * warp + g + 8 * i, &bias[i][0], &bias[i][1]);
        }
      } else if (wg == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) row_biases<IO, kGated>(sp, c, 16 * warp + g + 8 * i, &bias[i][0], &bias[i][1]);
      }
      float acc0[kAcc], acc1[kAcc];  // gate (or rows [0, 64)) and up (or rows [64, 128)) halves
#pragma unroll
      for (int i = 0; i < kAcc; ++i) acc0[i] = acc1[i] = 0.0f;
      int previous = -1;  // the stage whose wgmmas may still be in flight
      for (int kb = kb_begin; kb < kb_end; ++kb) {
        mbar_wait_at(full_base + 8 * stage, phase);
        const std::uint32_t stage_addr = smem_base + stage * stage_bytes;
        const std::uint32_t rows_addr = stage_addr + row_off;
        const int k_left = sp.k - kb * kStageK - (kPaired ? 0 : 128 * wg);  // K of this warpgroup's part of the stage
        const bool stage_folded = kFp4 && folded[stage];
        // Integer codes' scales of rows g, g + 8 of both halves: bf16 pairs, per chunk or once per
        // stage half (MXFP4's, stored as bf16 pairs, are read two chunks at a time below).
        const auto scale_pair = [&](int cc, int hh, int i) {
          return bf16_pair(lds32f(stage_addr + scale_row_off[hh][i] + group_off[cc]));
        };
        std::uint32_t half_scales[kHalves][2];
        if constexpr (!kScalePerChunk) {
#pragma unroll
          for (int hh = 0; hh < kHalves; ++hh)
#pragma unroll
            for (int i = 0; i < 2; ++i) half_scales[hh][i] = scale_pair(0, hh, i);
        }
        std::uint32_t a[2][kHalves][4][4];  // [register set][half][16-K step][fragment register]
#pragma unroll
        for (int local = 0; local < kSteps64; ++local) {  // 64 K: this warpgroup's chunks 2 local, 2 local + 1
          const int sub = kPaired ? local : 2 * wg + local;
          if (64 * local >= k_left) {  // past K (the tile's last stage only)
            // Retire every group here: the next tile's first conversion rewrites register set 0,
            // which this stage's last group may still be reading (ptxas proves it no other way).
            asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
            break;
          }
          std::uint32_t(&set)[kHalves][4][4] = a[local % 2];
          // The set's conversion (kFolded: MXFP4 scales stored with 2^126 folded in, e8m0_pair).
          const auto convert = [&]<bool kFolded>() {
            [[maybe_unused]] uint2 fp4_scales[kHalves][2];
            if constexpr (kFp4) {
#pragma unroll
              for (int hh = 0; hh < kHalves; ++hh)
#pragma unroll
                for (int i = 0; i < 2; ++i) fp4_scales[hh][i] = lds64(stage_addr + scale_row_off[hh][i] + group_off[2 * local]);
            }
#pragma unroll
            for (int hh = 0; hh < kHalves; ++hh) {
#pragma unroll
              for (int i = 0; i < 2; ++i) {  // rows g and g + 8 of the warp's 16
#pragma unroll
                for (int cc = 0; cc < 2; ++cc) {
                  // The thread's word of codes 8q .. 8q + 7 of the chunk: nibble pairs (d, d + 4)
                  // are its fragment pairs of the chunk's two steps (k32_pair_slot orders the rows'
                  // K to match).
                  const int chunk = 2 * local + cc;  // of this warpgroup's kChunks
                  std::uint32_t w;
                  if constexpr (kPaired) {
                    w = lds32((stage_addr + pair_base[i]) ^ static_cast<std::uint32_t>(chunk << 4));
                  } else {
                    w = lds32(rows_addr + chunk_off[hh][chunk] + hh * kHalfStep + i * kRowStep8);
                  }
                  std::uint32_t s2;
                  if constexpr (kFp4) {  // both chunks' scales (groups of 32: adjacent words) at once
                    s2 = cc == 0 ? fp4_scales[hh][i].x : fp4_scales[hh][i].y;
                  } else {
                    s2 = kScalePerChunk ? scale_pair(chunk, hh, i) : half_scales[hh][i];
                  }
                  if constexpr (kFp4) {
                    set[hh][2 * cc][i] = e2m1_pair<0, kFolded>(w, s2);
                    set[hh][2 * cc][2 + i] = e2m1_pair<1, kFolded>(w, s2);
                    set[hh][2 * cc + 1][i] = e2m1_pair<0, kFolded>(w >> 8, s2);
                    set[hh][2 * cc + 1][2 + i] = e2m1_pair<1, kFolded>(w >> 8, s2);
                  } else {
                    set[hh][2 * cc][i] = dequant_pair(w, magic, zero_pair, s2);
                    set[hh][2 * cc][2 + i] = dequant_pair(w >> 4, magic, zero_pair, s2);
                    set[hh][2 * cc + 1][i] = dequant_pair(w >> 8, magic, zero_pair, s2);
                    set[hh][2 * cc + 1][2 + i] = dequant_pair(w >> 12, magic, zero_pair, s2);
                  }
                }
              }
            }
          };
          if constexpr (kFp4) {
            if (stage_folded) convert.template operator()<true>();
            else convert.template operator()<false>();
          } else {
            convert.template operator()<false>();
          }
          asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
          // B descriptors: 32 bytes of K per step advance the descriptor's address field by 2.
          // Only the low word varies (the field never carries out of it: shared addresses are
          // below 256 KB), so the steps cost one 32-bit add each and the high word is a constant.
          // Broadcast from lane 0: the compiler then knows the descriptor is warp-uniform and
          // builds the steps' descriptors in uniform registers (without, two register-to-uniform
          // moves per wgmma: 32 of 379 instructions per stage).
          const std::uint32_t b_lo =
              __shfl_sync(0xFFFFFFFFu, smem_desc_low(stage_addr + kCodeBytes + sub * kRowAtomBytes), 0);
          constexpr std::uint64_t kDescHigh = smem_desc_high();
#pragma unroll
          for (int step = 0; step < 4; ++step) {
            const std::uint64_t db = kDescHigh | (b_lo + 2 * step);
            rs_wgmma<Op>(set[0][step], db, acc0, std::make_index_sequence<kAcc>{});
            if constexpr (!kPaired) rs_wgmma<Op>(set[kHalves - 1][step], db, acc1, std::make_index_sequence<kAcc>{});
          }
          asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
          // The group before this one has retired: its register set may be rewritten, and after
          // a stage's first group, the previous stage is free.
          asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
          if (local == 0 && previous >= 0) {
            mbar_arrive_at(empty_base + 8 * previous);
            previous = -1;
          }
        }
        if (previous >= 0) mbar_arrive_at(empty_base + 8 * previous);  // nothing of this stage was ours
        previous = stage;
        if (++stage == stages) {
          stage = 0;
          phase ^= 1;
        }
      }
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
      if (previous >= 0) mbar_arrive_at(empty_base + 8 * previous);
      // The second warpgroup's sums to the first (bar 1: written, bar 2: read; both warpgroups
      // wait at both, so the buffer is free again for the next tile).
      if constexpr (kPaired) {  // each warpgroup stores its own rows
#pragma unroll
        for (int idx = 0; idx < kAcc; ++idx) {
          const int tok = 8 * (idx / 4) + 2 * q + idx % 2;
          const int i = (idx / 2) % 2;
          if (tok >= c.tokens) continue;
          if constexpr (kGated) {  // rows g, g + 8: accumulators idx and idx + 2
            if (i == 0) {
              store_tile_outputs<IO, true, Expr, Activation>(sp, c, split.count, f, tok, acc0[idx] + bias[0][0],
                                                             acc0[idx + 2] + bias[1][0], act_args);
            }
          } else if (wg == 0) {
            store_tile_outputs<IO, false, Expr, Activation, 1>(sp, c, split.count, 16 * warp + g + 8 * i, tok,
                                                               acc0[idx] + bias[i][0], 0.0f, act_args);
          } else {
            store_tile_outputs<IO, false, Expr, Activation, 2>(sp, c, split.count, 16 * warp + g + 8 * i, tok, 0.0f,
                                                               acc0[idx] + bias[i][1], act_args);
          }
        }
        continue;
      }
      if (wg == 1) {
#pragma unroll
        for (int idx = 0; idx < kAcc; ++idx) {
          exchange[idx][t] = acc0[idx];
          exchange[kAcc + idx][t] = acc1[idx];
        }
      }
      named_barrier_sync(1, 256);
      if (wg == 0) {
#pragma unroll
        for (int idx = 0; idx < kAcc; ++idx) {  // first half of K, then the second
          acc0[idx] += exchange[idx][t];
          acc1[idx] += exchange[kAcc + idx][t];
        }
      }
      named_barrier_sync(2, 256);
      if (wg == 1) continue;
#pragma unroll
      for (int idx = 0; idx < kAcc; ++idx) {
        const int tok = 8 * (idx / 4) + 2 * q + idx % 2;
        const int i = (idx / 2) % 2;
        if (tok >= c.tokens) continue;
        store_tile_outputs<IO, kGated, Expr, Activation>(sp, c, split.count, 16 * warp + g + 8 * i, tok,
                                                         acc0[idx] + bias[i][0], acc1[idx] + bias[i][1], act_args);
      }
    }
  }
#else
  __trap();  // launched only after the host checked for an sm_90 device built with sm_90a
#endif
}

// The arguments of one weight-only swap GEMM (codes [E, n_total, k / 2] bytes, scales [E, n_total,
// groups] floats, rows x [num_rows, k] bf16 with row stride k).
struct Args {
  const std::uint8_t* codes = nullptr;
  Index experts = 0, n_total = 0, k = 0, row_stride = 0;  // row_stride in bytes
  const float* scale = nullptr;             // 4-bit integer codes
  const std::uint8_t* scale_e8m0 = nullptr;  // E2M1 codes (MXFP4; groups of 32)
  Index group_size = 0;
  bool signed_codes = false;
  unsigned default_zero = 8;
  const bfloat16* x = nullptr;  // K in k32_pair_slot order
  Index num_rows = 0;
  const Index* seg_begin = nullptr;
  const Index* seg_count = nullptr;
  Index n_out = 0;
  bfloat16* out = nullptr;
  Index ldo = 0;
  int max_splits = 1;
  float* partial = nullptr;
  int* splits_used = nullptr;
  const Index* slot_row = nullptr;
  Index num_slots = 0;
  bool k32_pair_order_out = false;  // out's columns in k32_pair_slot order (GEMM1's, for GEMM2)
  const bfloat16* bias = nullptr;    // [experts, n_total] (by weight row), or null
};

// kInterleaved: gated w13 with gate and up rows alternating; kFp4: E2M1 codes and E8M0 scales.
template <int kTokens, bool kGated, bool kInterleaved, bool kFp4, class Expr, class Activation>
Status launch(const Args& a, const typename Activation::Arguments& act_args, bool programmatic, cudaStream_t stream) {
  using namespace swap_detail;
  static_assert(kGated || !kInterleaved, "moe::cuda weight-only swap GEMM: only gated rows interleave");
  const Index group_size = kFp4 ? 32 : a.group_size;
  if (const char* why = refusal(a.experts, a.n_total, a.k, a.n_total * a.row_stride, a.row_stride, a.codes,
                                group_size, a.num_rows)) {
    return unsupported("weight-only swap GEMM: needs ", why);
  }
  if (kInterleaved && a.n_total % 2 != 0) return unsupported("weight-only swap GEMM: needs gate and up rows in pairs");
  CUtensorMap cmap, xmap;
  MOE_RETURN_IF_ERROR(make_tensor_map(&cmap, a.codes, a.experts * a.n_total, a.k / 2, a.row_stride, 64));
  MOE_RETURN_IF_ERROR(make_tensor_map(&xmap, a.x, a.num_rows, a.k, a.k, kTokens));
  Params p{};
  SwapParams& sp = p.swap;
  sp.seg_begin = a.seg_begin;
  sp.seg_count = a.seg_count;
  sp.num_experts = static_cast<int>(a.experts);
  sp.k = static_cast<int>(a.k);
  sp.n_out = static_cast<int>(a.n_out);
  sp.gate_up_offset = !kGated ? 0 : kInterleaved ? 1 : static_cast<int>(a.n_out);
  sp.gate_row_step = kInterleaved ? 2 : 1;
  sp.bias = a.bias;
  sp.weight_rows_per_expert = a.n_total;
  sp.out = a.out;
  sp.ldo = a.ldo;
  sp.max_splits = a.max_splits > 1 ? a.max_splits : 1;
  sp.splits_used = sp.max_splits > 1 ? a.splits_used : nullptr;
  sp.partial = a.partial;
  sp.partial_rows = a.num_rows;
  sp.k32_pair_order_out = a.k32_pair_order_out;
  const Index group = group_size > 0 ? group_size : a.k;
  p.scale = a.scale;
  p.scale_e8m0 = a.scale_e8m0;
  p.group_size = static_cast<int>(group < a.k ? group : a.k);
  p.groups = static_cast<int>((a.k + group - 1) / group);
  p.stage = StageLayout::of<kTokens, kFp4>(group, a.k);
  // Wide scale copies need the scales' base aligned to their width (a view may start anywhere).
  if (reinterpret_cast<std::uintptr_t>(a.scale) % p.stage.scale_copy_bytes != 0) p.stage.scale_copy_bytes = 4;
  p.magic = 0x43004300u | (a.signed_codes ? 0x00080008u : 0u);
  const __nv_bfloat162 zero = __floats2bfloat162_rn(128.0f + static_cast<float>(a.default_zero), 128.0f + static_cast<float>(a.default_zero));
  p.zero_pair = *reinterpret_cast<const std::uint32_t*>(&zero);
  int device = 0, sms = 0;
  MOE_CUDA_TRY(cudaGetDevice(&device));
  MOE_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // Groups narrower than 128 (MXFP4's 32 always) take a scale per 32-K chunk, wider ones one per
  // half stage (the MXFP4 instance of the second is never launched: kFp4 keeps it per chunk).
  auto* kernel = p.stage.chunk_group_shift < 2
                     ? &w4_swap_gemm_kernel<kTokens, kGated, kInterleaved, kFp4, true, Expr, Activation>
                     : &w4_swap_gemm_kernel<kTokens, kGated, kInterleaved, kFp4, kFp4, Expr, Activation>;
  const int smem = p.stage.stages * p.stage.bytes + 1024;
  MOE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  MOE_RETURN_IF_ERROR(cuda::detail::launch_kernel(kernel, sms, kThreads, smem, stream, programmatic, cmap, xmap, p, act_args));
  if (sp.max_splits > 1) {
    const dim3 grid(static_cast<unsigned>(a.num_slots), static_cast<unsigned>((a.n_out + 255) / 256));
    MOE_RETURN_IF_ERROR(cuda::detail::launch_kernel(&reduce_splits_kernel<bfloat16, kGated, Expr, Activation>, grid, 256,
                                                    0, stream, programmatic, a.partial, a.num_rows, a.splits_used,
                                                    sp.n_out, a.slot_row, a.out, a.ldo, act_args,
                                                    sp.k32_pair_order_out, nullptr));
  }
  return Status::ok();
}

}  // namespace moe::cuda::gemm::weight_only_swap
