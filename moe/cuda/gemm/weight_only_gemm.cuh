// Grouped expert GEMM on packed weights (moe/quant/weight_only.h: W4A16, W8A16; moe/quant/mxfp4.h:
// MXFP4), the codes dequantized in registers straight into tensor-core fragments:
//
//   out[row0(e) + t, n] = Expr( sum_k IO(float(q[e, n, k] - z) * IO(s)) * x[row0(e) + t, k] + bias )
//   (MXFP4: IO(e2m1(q) * 2^(s - 127)) in place of the integer dequantization)
//
// Decode reads each expert's weights once, so what matters is streaming the packed bytes at full
// bandwidth; the weights are the MMA's M side (mma.sync m16n8k16, sm_80+) and the tokens its N
// side, 8 per n8 tile, so one token is not padded to 64 rows.
//
// Work: a block (8 warps) owns a tile of weight rows of one expert: 2 m16 tiles per warp = 32 rows
// (gated GEMM1: 16 gate rows and the 16 up rows of the same outputs, so the thread holding
// gate(n, t) also holds up(n, t) and the activation runs on the accumulators). Its 8 warps split K
// in 128-wide chunks (chunk c to warp c % 8) and their sums are added in shared memory in warp
// order: deterministic, no workspace, no second launch. Blocks are persistent over the (expert
// with rows, row tile) pairs, built on the device from the per-expert row counts (no host sync).
//
// Registers: lane q = lane % 4 of a quad reads 32 consecutive K of its rows per chunk (16 bytes of
// 4-bit codes) and the same 32 K of its token. A k16 MMA step needs, per thread, the slot pairs
// (2q, 2q + 1) and (2q + 8, 2q + 9) of A and B alike: the sum over K does not care which physical
// k sits in which slot as long as A and B agree, so each step takes four k of the thread's own run:
//   4-bit word j (codes k0..k7 of 8j..8j+7, low nibble first): a nibble pair (k_i, k_i+4) is one
//     mask-and-or into a 16-bit pair (the exponent trick: 0x4300 | q is the bf16 128 + q), so
//     step 2j takes (k0, k4), (k1, k5) and step 2j + 1 (k2, k6), (k3, k7); the token's 16 bytes of
//     x are permuted to match with two byte-permutes per pair;
//   8-bit word j (codes k0..k3): step j takes (k0, k1), (k2, k3), the token's x in order.
// Dequantization is exact up to the one rounding the scheme defines: 128 + q - (128 + z) is exact
// in 16 bits, and times the IO-rounded scale rounds once (hmul2); 8-bit codes go through fp32
// (2^23 + q), whose product with a 16-bit scale is exact before the one rounding to IO. An E2M1
// nibble (sign, 2 exponent bits, 1 mantissa bit) placed at a bf16's bits 15 and 8..6 is its value
// times 2^-126 (subnormals included), so two exact hmul2 by 2^126 and by the E8M0 scale give
// IO(e2m1 * 2^(s - 127)) with the one rounding (bf16 only: f16 cannot hold the scales' range).
//
// Where it stands (H200, benchmarks/RESULTS.md): decode streams 0.5-1.8 TB/s of codes, bound by
// latency (two blocks per SM), not DRAM. Prefill re-reads and re-dequantizes each weight tile per
// 16 tokens: 2-8x slower than bf16 at M >= 1024. Both want the mixed-input design (codes staged
// through a shared-memory ring, dequantized once per tile into the MMA's operand, many token
// tiles per weight tile): benchmarks/NOTES.md, "Weight-only".
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "moe/cuda/check.h"
#include "moe/cuda/launch.h"
#include "moe/epilogue.h"
#include "moe/quant/numeric.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::cuda::gemm::weight_only {

constexpr int kWarps = 8;  // K slices of one row tile
constexpr int kThreads = 32 * kWarps;
// m16 tiles per warp: 2 (32 weight rows per block), so that two blocks fit an SM's registers with
// three chunks of weights in flight per warp. Measured on the H200 (2026-12-02, decode rows): 4
// tiles with one block per SM and one chunk ahead 5-30% slower; 2 tiles with one block per SM
// (no spills) 10-45% slower; three blocks per SM (80 registers, spilling) 15-50% slower.
constexpr int kM16 = 2;
constexpr int kBlocksPerSm = 2;
constexpr int kChunkK = 128;  // K per warp iteration: 32 per lane of a quad
constexpr int kMaxExperts = 1024;

struct Params {
  const std::uint8_t* w;     // [E, n_total, k * bits / 8] codes
  Index w_expert_stride;     // bytes
  Index w_row_stride;        // bytes
  const float* scale;        // [E, n_total, groups] (integer codes)
  const std::uint8_t* scale_e8m0;  // [E, n_total, groups] (E2M1 codes: MXFP4)
  const std::uint8_t* zero;  // [E, n_total, groups], or null: the default zero point
  std::uint32_t code_flip;   // XORed into each word of codes: 0, or two's-complement codes' top bits
  int groups;                // per row
  int group_size;            // K per group (k for per channel)
  Index n_total;             // weight rows per expert
  const void* x;             // [rows, k] IO, row stride k
  const Index* seg_begin;    // [E]
  const Index* seg_count;    // [E]
  int num_experts;
  int k;
  int n_out;           // output columns (I for gated GEMM1)
  int gate_stride;     // gated: output n's gate row is n * gate_stride (1: [gate; up], 2: interleaved)
  int gate_up_offset;  // gated: rows between a gate row and its up row (I split, 1 interleaved)
  const void* bias;    // [E, n_total] IO (row stride n_total), or null
  void* out;           // [rows, n_out], row stride ldo
  Index ldo;
  const float* row_weight;  // per row, the router weight Expr reads (RouterWeight), or null
};

// Whether the kernel takes a GEMM with reduction length k over codes of `bits` bits: every lane
// reads 32 whole K per chunk with 16-byte loads.
inline const char* refusal(Index k, Index row_stride_bytes, const void* w, int bits) {
  if (k % 32 != 0) return "weight-only GEMMs need hidden and intermediate sizes that are multiples of 32";
  if (row_stride_bytes % 16 != 0 || reinterpret_cast<std::uintptr_t>(w) % 16 != 0) {
    return "weight-only GEMMs need 16-byte aligned rows of packed codes";
  }
  if (k * bits / 8 > row_stride_bytes) return "weight-only GEMMs need rows of at least k codes";
  return nullptr;
}

template <class IO>
struct Pair;  // the 16-bit pair type and its exponent trick
template <>
struct Pair<bfloat16> {
  using T = __nv_bfloat162;
  static constexpr std::uint32_t kMagic = 0x43004300u;  // bf16 128.0 twice
  static constexpr float kBias = 128.0f;
};
template <>
struct Pair<half> {
  using T = __half2;
  static constexpr std::uint32_t kMagic = 0x64006400u;  // f16 1024.0 twice
  static constexpr float kBias = 1024.0f;
};

template <class IO>
__device__ __forceinline__ std::uint32_t pack_pair(float lo, float hi) {
  typename Pair<IO>::T v;
  if constexpr (std::is_same_v<IO, bfloat16>) v = __floats2bfloat162_rn(lo, hi);
  else v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<std::uint32_t*>(&v);
}
template <class IO>
__device__ __forceinline__ std::uint32_t sub_mul(std::uint32_t a, std::uint32_t b, std::uint32_t c) {
  using T = typename Pair<IO>::T;
  const T r = __hmul2(__hsub2(*reinterpret_cast<T*>(&a), *reinterpret_cast<T*>(&b)), *reinterpret_cast<T*>(&c));
  return *reinterpret_cast<const std::uint32_t*>(&r);
}

template <class IO>
__device__ __forceinline__ void mma16816(float (&d)[4], std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                                         std::uint32_t a3, std::uint32_t b0, std::uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<IO, bfloat16>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#endif
}

// Weights are read once per forward: past L1, so the rows (x), which every row tile of the expert
// reads, stay there.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// One chunk's weight data of one thread: its 2 rows of each m16 tile, 32 K each.
template <int kBits, int kM16>
struct WeightChunk {
  static constexpr int kVec = kBits * 32 / 8 / 16;  // 16-byte loads per row: 1 (4-bit) or 2 (8-bit)
  uint4 w[kM16][2][kVec];
  float s[kM16][2];
  unsigned z[kM16][2];
};

// 2^(s - 127) as a float (E8M0; 255 is NaN).
__device__ __forceinline__ float e8m0_to_float(unsigned s) {
  return __uint_as_float(s == 0 ? 0x00400000u : s == 255 ? 0x7FC00000u : s << 23);
}
template <class IO>
__device__ __forceinline__ std::uint32_t mul_pair(std::uint32_t a, std::uint32_t b) {
  using T = typename Pair<IO>::T;
  const T r = __hmul2(*reinterpret_cast<T*>(&a), *reinterpret_cast<T*>(&b));
  return *reinterpret_cast<const std::uint32_t*>(&r);
}

// kFp4: the 4-bit codes are E2M1 with E8M0 scales (MXFP4), else unsigned integers.
template <class IO, int kBits, bool kFp4, int kN8, bool kGated, class Expr, class Activation>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    weight_only_gemm_kernel(Params p, unsigned default_zero, typename Activation::Arguments act_args) {
  static_assert(!kFp4 || (kBits == 4 && std::is_same_v<IO, bfloat16>), "MXFP4: 4-bit codes, bf16 activations");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kTokensPerPass = 8 * kN8;
  using Chunk = WeightChunk<kBits, kM16>;
  constexpr int kVec = Chunk::kVec;
  __shared__ int active[kMaxExperts];
  __shared__ int num_active;
  __shared__ float4 partial[kWarps][kM16][kN8][32];  // each warp's sums, added in warp order
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int q = lane % 4, quad = lane / 4;

  // The experts with rows, in order (warp 0, ballots).
  if (warp == 0) {
    int carry = 0;
    for (int base = 0; base < p.num_experts; base += 32) {
      const int e = base + lane;
      const bool has = e < p.num_experts && __ldg(p.seg_count + e) > 0;
      const unsigned mask = __ballot_sync(0xffffffffu, has);
      if (has) active[carry + __popc(mask & ((1u << lane) - 1u))] = e;
      carry += __popc(mask);
    }
    if (lane == 0) num_active = carry;
  }
  __syncthreads();

  const int outputs_per_tile = kGated ? 8 * kM16 : 16 * kM16;  // 16 or 32
  const int row_tiles = (p.n_out + outputs_per_tile - 1) / outputs_per_tile;
  const int chunks = (p.k + kChunkK - 1) / kChunkK;
  const int items = num_active * row_tiles;
  const float bias = Pair<IO>::kBias;

  // Work units, this block's in order: (item, pass of kTokensPerPass tokens). A unit's first two
  // chunks are loaded before the previous unit's reduction and epilogue, so that its load latency
  // overlaps that tail instead of following it.
  int item = static_cast<int>(blockIdx.x);
  if (item >= items) return;
  // The unit's state, 32-bit and few (the chunk buffers need the registers): the weight rows are
  // recomputed from n0 per load.
  int e = 0, n0 = 0, row0_expert = 0, count = 0, t0 = 0;
  const auto start_item = [&]() {
    e = active[item / row_tiles];
    n0 = (item % row_tiles) * outputs_per_tile;
    row0_expert = static_cast<int>(__ldg(p.seg_begin + e));
    count = static_cast<int>(__ldg(p.seg_count + e));
  };
  // Weight row h (0: tile row quad, 1: quad + 8; gated: the gate and the up row) of m16 tile i,
  // and whether it exists.
  const auto weight_row = [&](int i, int h, bool* ok) {
    if constexpr (kGated) {
      const int n = n0 + 8 * i + quad;
      *ok = n < p.n_out;
      return n * p.gate_stride + (h == 0 ? 0 : p.gate_up_offset);
    } else {
      const int r = n0 + 16 * i + quad + 8 * h;
      *ok = r < p.n_out;
      return r;
    }
  };
  const auto load = [&](int c, Chunk& d) {
    const int k0 = c * kChunkK + 32 * q;
    const bool k_ok = k0 < p.k;
    const int g = k0 / p.group_size;
    const std::uint8_t* w_expert = p.w + static_cast<Index>(e) * p.w_expert_stride;
    const Index scale_expert = static_cast<Index>(e) * p.n_total * p.groups;
#pragma unroll
    for (int i = 0; i < kM16; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        bool row_ok = false;
        const int row = weight_row(i, h, &row_ok);
        const bool ok = k_ok && row_ok;
        const std::uint8_t* src = w_expert + row * p.w_row_stride + k0 * kBits / 8;
#pragma unroll
        for (int v = 0; v < kVec; ++v) d.w[i][h][v] = ok ? load_stream(src + 16 * v) : make_uint4(0, 0, 0, 0);
        const Index si = scale_expert + static_cast<Index>(row) * p.groups + g;
        if constexpr (kFp4) d.s[i][h] = ok ? e8m0_to_float(__ldg(p.scale_e8m0 + si)) : 0.0f;
        else d.s[i][h] = ok ? __ldg(p.scale + si) : 0.0f;
        d.z[i][h] = ok && p.zero != nullptr ? __ldg(p.zero + si) : default_zero;
      }
    }
  };

    Chunk b0, b1, b2;  // three register buffers in rotation (a chunk computing, two loading)
    const auto load_first = [&]() {
      if (warp < chunks) load(warp, b0);
      if (warp + kWarps < chunks) load(warp + kWarps, b1);
    };
    start_item();
    load_first();
    for (;;) {
      const int tokens = static_cast<int>(count - t0 < kTokensPerPass ? count - t0 : kTokensPerPass);
      const IO* x = static_cast<const IO*>(p.x) + (static_cast<Index>(row0_expert) + t0) * p.k;
      float acc[kM16][kN8][4];
#pragma unroll
      for (int i = 0; i < kM16; ++i)
#pragma unroll
        for (int j = 0; j < kN8; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

      const auto compute = [&](int c, const Chunk& d) {
        // Lanes past K (the last chunk of a K that is not a multiple of 128) multiply zeros: every
        // lane of the warp must reach each mma.sync.
        const int k0 = c * kChunkK + 32 * q;
        const bool k_ok = k0 < p.k;
        // The token's 32 K of this lane: 4 x 16 bytes per n8 tile (zeros past the tokens).
        uint4 xv[kN8][4];
#pragma unroll
        for (int j = 0; j < kN8; ++j) {
          const int t = 8 * j + quad;
          const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<Index>(t) * p.k + k0);
#pragma unroll
          for (int v = 0; v < 4; ++v) xv[j][v] = t < tokens && k_ok ? __ldg(src + v) : make_uint4(0, 0, 0, 0);
        }
        // Per row: the scale and zero as 16-bit pairs (4-bit) or floats (8-bit).
        std::uint32_t ss[kM16][2], zz[kM16][2];
        float sf[kM16][2], zf[kM16][2];
#pragma unroll
        for (int i = 0; i < kM16; ++i) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float s_io = to_float(from_float<IO>(d.s[i][h]));
            const float zero = static_cast<float>(d.z[i][h] & ((1u << kBits) - 1u));
            ss[i][h] = pack_pair<IO>(s_io, s_io);
            zz[i][h] = pack_pair<IO>(bias + zero, bias + zero);
            sf[i][h] = s_io;
            zf[i][h] = 8388608.0f + zero;
          }
        }
        const auto word = [](const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; };
        if constexpr (kBits == 4) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // word j: K 8j..8j+7 of the lane's 32
#pragma unroll
            for (int half_step = 0; half_step < 2; ++half_step) {
              // This step's nibble pairs: (k_t, k_t+4) for t = 2 half_step and 2 half_step + 1.
              const int t0n = 2 * half_step;
              std::uint32_t b0[kN8], b1[kN8];
#pragma unroll
              for (int jn = 0; jn < kN8; ++jn) {
                // x words of K 8j..8j+7: X0 = (x0, x1), X1 = (x2, x3), X2 = (x4, x5), X3 = (x6, x7).
                const uint4& X4 = xv[jn][j];
                const std::uint32_t xa = half_step == 0 ? X4.x : X4.y;  // (x0, x1) or (x2, x3)
                const std::uint32_t xb = half_step == 0 ? X4.z : X4.w;  // (x4, x5) or (x6, x7)
                b0[jn] = __byte_perm(xa, xb, 0x5410);  // (x_t, x_t+4)
                b1[jn] = __byte_perm(xa, xb, 0x7632);  // (x_t+1, x_t+5)
              }
#pragma unroll
              for (int i = 0; i < kM16; ++i) {
                std::uint32_t a[2][2];  // [row half][slot pair]
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                  const std::uint32_t wv = word(d.w[i][h][0], j) ^ p.code_flip;
#pragma unroll
                  for (int sp = 0; sp < 2; ++sp) {
                    const std::uint32_t nibbles = (wv >> (4 * (t0n + sp))) & 0x000F000Fu;
                    if constexpr (kFp4) {  // sign to bit 15, exponent and mantissa to bits 8..6
                      const std::uint32_t v = ((nibbles << 6) & 0x01C001C0u) | ((nibbles << 12) & 0x80008000u);
                      a[h][sp] = mul_pair<IO>(mul_pair<IO>(v, 0x7E807E80u), ss[i][h]);  // x 2^126, x 2^(s-127)
                    } else {
                      a[h][sp] = sub_mul<IO>(nibbles | Pair<IO>::kMagic, zz[i][h], ss[i][h]);
                    }
                  }
                }
#pragma unroll
                for (int jn = 0; jn < kN8; ++jn) mma16816<IO>(acc[i][jn], a[0][0], a[1][0], a[0][1], a[1][1], b0[jn], b1[jn]);
              }
            }
          }
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) {  // word j: K 4j..4j+3 of the lane's 32
            std::uint32_t b0[kN8], b1[kN8];
#pragma unroll
            for (int jn = 0; jn < kN8; ++jn) {
              const uint4& X4 = xv[jn][j / 2];
              b0[jn] = (j % 2 == 0) ? X4.x : X4.z;  // (x0, x1)
              b1[jn] = (j % 2 == 0) ? X4.y : X4.w;  // (x2, x3)
            }
#pragma unroll
            for (int i = 0; i < kM16; ++i) {
              std::uint32_t a[2][2];
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const std::uint32_t wv = word(d.w[i][h][j / 4], j % 4) ^ p.code_flip;
                float f[4];
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                  f[b] = (__uint_as_float(__byte_perm(wv, 0x4B00u, 0x5440u | b)) - zf[i][h]) * sf[i][h];
                }
                a[h][0] = pack_pair<IO>(f[0], f[1]);
                a[h][1] = pack_pair<IO>(f[2], f[3]);
              }
#pragma unroll
              for (int jn = 0; jn < kN8; ++jn) mma16816<IO>(acc[i][jn], a[0][0], a[1][0], a[0][1], a[1][1], b0[jn], b1[jn]);
            }
          }
        }
      };

      // This warp's chunks (c = warp, warp + 8, ...), two ahead loading while one computes,
      // unrolled so that each buffer stays in registers; the first two are loaded already.
      const auto step = [&](int c, Chunk& now, Chunk& ahead2) {
        if (c + 2 * kWarps < chunks) load(c + 2 * kWarps, ahead2);
        compute(c, now);
      };
      for (int c = warp; c < chunks; c += 3 * kWarps) {
        step(c, b0, b2);
        if (c + kWarps >= chunks) break;
        step(c + kWarps, b1, b0);
        if (c + 2 * kWarps >= chunks) break;
        step(c + 2 * kWarps, b2, b1);
      }

      // This unit's place, for its epilogue; then the next unit's first chunks.
      const int e_done = e, n0_done = n0;
      const Index rows_done = static_cast<Index>(row0_expert) + t0;
      t0 += kTokensPerPass;
      if (t0 >= count) {
        t0 = 0;
        item += static_cast<int>(gridDim.x);
        if (item < items) start_item();
      }
      const bool more = item < items;
      if (more) load_first();

      // Sum the warps' partial sums in warp order, then the epilogue per (output, token).
#pragma unroll
      for (int i = 0; i < kM16; ++i)
#pragma unroll
        for (int j = 0; j < kN8; ++j) partial[warp][i][j][lane] = make_float4(acc[i][j][0], acc[i][j][1], acc[i][j][2], acc[i][j][3]);
      __syncthreads();
      for (int pair = static_cast<int>(threadIdx.x); pair < kM16 * kN8 * 32 * 2; pair += kThreads) {
        const int r = pair % 2, l = (pair / 2) % 32, j = (pair / 64) % kN8, i = pair / (64 * kN8);
        const int tok = 8 * j + 2 * (l % 4) + r;
        if (tok >= tokens) continue;
        float lo = 0.0f, hi = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          const float4 v = partial[w][i][j][l];
          lo += r == 0 ? v.x : v.y;
          hi += r == 0 ? v.z : v.w;
        }
        IO* dst = static_cast<IO*>(p.out) + (rows_done + tok) * p.ldo;
        epilogue::ElementContext<Activation> ctx;
        ctx.args = act_args;
        if (p.row_weight != nullptr) ctx.weight = p.row_weight[rows_done + tok];
        // Expr adds the bias (0 where the experts have none: acc + 0 is acc).
        const IO* bias = p.bias != nullptr ? static_cast<const IO*>(p.bias) + static_cast<Index>(e_done) * p.n_total : nullptr;
        const auto bias_at = [&](int row) { return bias != nullptr ? to_float(bias[row]) : 0.0f; };
        if constexpr (kGated) {
          const int n = n0_done + 8 * i + l / 4;
          if (n < p.n_out) {
            ctx.acc[1] = lo;
            ctx.acc[2] = hi;
            ctx.bias_[1] = bias_at(n * p.gate_stride);
            ctx.bias_[2] = bias_at(n * p.gate_stride + p.gate_up_offset);
            ctx.col = n;
            dst[n] = from_float<IO>(Expr::eval(ctx));
          }
        } else {
          const int n = n0_done + 16 * i + l / 4;
          if (n < p.n_out) {
            ctx.acc[0] = lo;
            ctx.bias_[0] = bias_at(n);
            ctx.col = n;
            dst[n] = from_float<IO>(Expr::eval(ctx));
          }
          if (n + 8 < p.n_out) {
            ctx.acc[0] = hi;
            ctx.bias_[0] = bias_at(n + 8);
            ctx.col = n + 8;
            dst[n + 8] = from_float<IO>(Expr::eval(ctx));
          }
        }
      }
      __syncthreads();  // `partial` is free for the next unit
      if (!more) break;
    }
#else
  __trap();  // launched only on sm_80+ (the Arch tag's check)
#endif
}

// out[rows, n_out] = Expr(rows x dequantized w[e]^T) for the rows of each expert; gated: w has
// 2 * n_out rows per expert ([gate; up]). kN8: token n8 tiles per pass (1: decode, up to 8 tokens
// per expert and pass; 2: 16).
template <class IO, int kBits, bool kFp4, int kN8, bool kGated, class Expr, class Activation>
Status launch(const Params& p, unsigned default_zero, const typename Activation::Arguments& act_args, Index rows,
              cudaStream_t stream) {
  if (rows > INT32_MAX) return unsupported("weight-only GEMMs: ", rows, " rows do not fit int32 (the kernel's row offsets)");
  int device = 0, sms = 0, per_sm = 0;
  MOE_CUDA_TRY(cudaGetDevice(&device));
  MOE_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  auto* kernel = &weight_only_gemm_kernel<IO, kBits, kFp4, kN8, kGated, Expr, Activation>;
  MOE_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const Index outputs_per_tile = kGated ? 8 * kM16 : 16 * kM16;
  const Index items = ((p.n_out + outputs_per_tile - 1) / outputs_per_tile) *
                      (rows < p.num_experts ? rows : static_cast<Index>(p.num_experts));
  const Index resident = static_cast<Index>(sms) * (per_sm > 0 ? per_sm : 1);
  const unsigned grid = static_cast<unsigned>(items < resident ? (items > 0 ? items : 1) : resident);
  return cuda::detail::launch_kernel(kernel, grid, kThreads, 0, stream, false, p, default_zero, act_args);
}

// Act-order (GPTQ desc_act): x_ordered[r, k] = x[r, order[e][k]] for the rows r of each expert e's
// segment, so the GEMM reads K in the order the codes are stored (moe/quant/weight_only.h). An
// index outside [0, k) reads 0: the permutation is checked on the host, never trusted here.
// `Column` places column k of the result (Column::at(k); the identity for the register GEMM, the
// swap GEMM's pair order for it), and a null `order` reads x in order.
struct SameColumn {
  static constexpr int at(int k) { return k; }
};
template <class IO, class Column>
__global__ void order_k_kernel(const IO* __restrict__ x, const std::int32_t* __restrict__ order, const Index* seg_begin,
                               const Index* seg_count, int k, IO* __restrict__ x_ordered) {
  const int e = static_cast<int>(blockIdx.y);
  const Index begin = seg_begin[e], count = seg_count[e];
  const std::int32_t* o = order != nullptr ? order + static_cast<Index>(e) * k : nullptr;
  for (Index r = blockIdx.x; r < count; r += gridDim.x) {
    const IO* src = x + (begin + r) * k;
    IO* dst = x_ordered + (begin + r) * k;
    for (int c = static_cast<int>(threadIdx.x); c < k; c += static_cast<int>(blockDim.x)) {
      const std::int32_t from = o != nullptr ? __ldg(o + c) : c;
      dst[Column::at(c)] = from >= 0 && from < k ? src[from] : IO(0.0f);
    }
  }
}

template <class IO, class Column = SameColumn>
Status order_k(const IO* x, const std::int32_t* order, const Index* seg_begin, const Index* seg_count, int num_experts,
               int k, Index rows, IO* x_ordered, cudaStream_t stream) {
  if (num_experts == 0 || rows == 0) return Status::ok();
  const dim3 grid(static_cast<unsigned>(rows < 1024 ? rows : 1024), static_cast<unsigned>(num_experts));
  order_k_kernel<IO, Column><<<grid, 256, 0, stream>>>(x, order, seg_begin, seg_count, k, x_ordered);
  MOE_CUDA_CHECK_LAUNCH();
  return Status::ok();
}

}  // namespace moe::cuda::gemm::weight_only
