// The Sm80CpAsync schedule: grouped expert GEMMs on tensor cores (WMMA: HMMA on sm_80 and sm_90) with
// the epilogue trees fused per element.
//
// out[row, n] = Epilogue( sum_k a[row, k] * w[e, b_row(n), k] ) for the rows of each expert's
// segment. Blocks are scheduled over (m-tile, n-tile); an m-tile belongs to the expert found by
// binary search in the device-side tile prefix, so the grid size is a host-known upper bound
// and nothing is synchronized. Rows past a segment and columns past N or K are zero-filled in
// shared memory and never written.
//
// Gated GEMM1 computes gate and up columns in the same block so the activation is applied in the
// epilogue: a tile of BN accumulator columns yields BN/2 outputs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "moe/epilogue.h"
#include "moe/quant/numeric.h"
#include "moe/tensor.h"

namespace moe::cuda::detail {

// Which weight rows a block's accumulator columns read, and how they pair into outputs.
enum class ColumnMode {
  kPlain,             // accumulator column c -> output column c
  kGatedSplit,        // w13 = [gate rows; up rows]: columns [0, BN/2) gate, [BN/2, BN) up
  kGatedInterleaved,  // w13 = [g0, u0, g1, u1, ...]: even columns gate, odd up
};

template <class T>
struct WmmaType;
template <>
struct WmmaType<bfloat16> {
  using type = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct WmmaType<half> {
  using type = __half;
  static constexpr int kK = 16;
};
template <>
struct WmmaType<float> {  // tf32 tensor cores: float storage, 10-bit mantissa products
  using type = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8;
};

template <class T, class Activation>
struct GroupedGemmParams {
  const T* a;                     // [rows, K], row stride lda
  Index lda;
  const T* w;                     // [E, N_total, K]
  Index w_expert_stride, ldw;
  const T* bias;                  // [E, N_total] or nullptr
  Index bias_expert_stride;
  const float* row_weight;        // [rows] or nullptr
  T* out;                         // [rows, N_out], row stride ldo
  Index ldo;
  Index K;                        // reduction length
  Index n_out;                    // output columns (I for gated GEMM1)
  Index n_total;                  // weight rows (2I gated, else n_out)
  const Index* seg_begin;         // [E] first row of each expert
  const Index* seg_count;         // [E] rows of each expert
  const Index* tile_offsets;      // [E + 1] prefix of m-tiles
  int num_experts;
  typename Activation::Arguments activation;
};

constexpr int kBM = 64, kBN = 64, kBK = 32, kGemmThreads = 128;
constexpr int kSmemPad = 8;

template <class T>
__device__ __forceinline__ float load_float(const T* p) {
  return to_float(*p);
}

// ---- pieces shared by both mainloops -----------------------------------------------------------

// The expert of m-tile `tile` (largest e with tile_offsets[e] <= tile), or -1 past the last tile.
__device__ __forceinline__ int expert_of_tile(const Index* tile_offsets, int num_experts, int tile) {
  if (tile >= tile_offsets[num_experts]) return -1;
  int lo = 0, hi = num_experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tile_offsets[mid] <= tile) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Weight row read by each of the BN accumulator columns of a block (-1: past the end, zero-filled).
template <ColumnMode Mode, int BN>
__device__ __forceinline__ void fill_row_of_col(Index out0, Index n_out, Index* row_of_col) {
  for (int c = threadIdx.x; c < BN; c += blockDim.x) {
    Index r = -1;
    if constexpr (Mode == ColumnMode::kPlain) {
      r = out0 + c < n_out ? out0 + c : -1;
    } else if constexpr (Mode == ColumnMode::kGatedSplit) {
      const Index i = out0 + (c < BN / 2 ? c : c - BN / 2);
      r = i < n_out ? (c < BN / 2 ? i : n_out + i) : -1;
    } else {
      const Index i = out0 + c / 2;
      r = i < n_out ? 2 * out0 + c : -1;
    }
    row_of_col[c] = r;
  }
}

// Where a block works: its expert, its rows [row0, row_end) and first output column; the weight
// row of each accumulator column goes to `row_of_col`. False when the block has no work (past the
// last m-tile or the last column); the caller returns before any barrier.
template <class T, ColumnMode Mode, int BM, int BN>
struct BlockTile {
  int e;
  Index row0, row_end, out0;
  const T* w;

  template <class Activation>
  __device__ __forceinline__ bool locate(const GroupedGemmParams<T, Activation>& p, Index* row_of_col) {
    const int tile = blockIdx.x;
    e = expert_of_tile(p.tile_offsets, p.num_experts, tile);
    if (e < 0) return false;
    row0 = p.seg_begin[e] + static_cast<Index>(tile - p.tile_offsets[e]) * BM;
    row_end = p.seg_begin[e] + p.seg_count[e];
    w = p.w + static_cast<Index>(e) * p.w_expert_stride;
    constexpr int kOutPerTile = Mode == ColumnMode::kPlain ? BN : BN / 2;
    out0 = static_cast<Index>(blockIdx.y) * kOutPerTile;
    if (out0 >= p.n_out) return false;
    fill_row_of_col<Mode, BN>(out0, p.n_out, row_of_col);
    return true;
  }
};

// Epilogue over a [BM, BN] float accumulator tile in shared memory: one output element per
// iteration through the expression tree's scalar path (moe/epilogue.h).
template <class T, ColumnMode Mode, class Expr, class Activation, int BM, int BN>
__device__ __forceinline__ void store_tile(const GroupedGemmParams<T, Activation>& p, const float* cs, int ldc,
                                           const Index* row_of_col, int e, Index row0, Index row_end, Index out0) {
  constexpr int kOutPerTile = Mode == ColumnMode::kPlain ? BN : BN / 2;
  const T* bias = p.bias ? p.bias + static_cast<Index>(e) * p.bias_expert_stride : nullptr;
  for (int idx = threadIdx.x; idx < BM * kOutPerTile; idx += blockDim.x) {
    const int r = idx / kOutPerTile, c = idx % kOutPerTile;
    const Index row = row0 + r, col = out0 + c;
    if (row >= row_end || col >= p.n_out) continue;
    epilogue::ElementContext<Activation> ctx;
    ctx.args = p.activation;
    ctx.col = col;
    if constexpr (Mode == ColumnMode::kPlain) {
      ctx.acc[0] = cs[r * ldc + c];
      if (bias) ctx.bias_[0] = load_float(bias + col);
    } else {
      const int gc = Mode == ColumnMode::kGatedSplit ? c : 2 * c;
      const int uc = Mode == ColumnMode::kGatedSplit ? c + BN / 2 : 2 * c + 1;
      ctx.acc[1] = cs[r * ldc + gc];
      ctx.acc[2] = cs[r * ldc + uc];
      if (bias) {
        ctx.bias_[1] = load_float(bias + row_of_col[gc]);
        ctx.bias_[2] = load_float(bias + row_of_col[uc]);
      }
    }
    if (p.row_weight) ctx.weight = p.row_weight[row];
    p.out[row * p.ldo + col] = from_float<T>(Expr::eval(ctx));
  }
}

// ---- generic mainloop: any K and alignment, also tf32 -------------------------------------------

template <class T, ColumnMode Mode, class Expr, class Activation>
__global__ void __launch_bounds__(kGemmThreads) grouped_gemm_kernel(GroupedGemmParams<T, Activation> p) {
  using namespace nvcuda;
  using Frag = typename WmmaType<T>::type;
  constexpr int FK = WmmaType<T>::kK;
  using Storage = std::conditional_t<std::is_same_v<T, float>, float, std::uint16_t>;

  __shared__ __align__(32) Storage as[kBM][kBK + kSmemPad];
  __shared__ __align__(32) Storage bs[kBN][kBK + kSmemPad];
  __shared__ __align__(32) float cs[kBM][kBN + 4];
  __shared__ Index s_row_of_col[kBN];

  BlockTile<T, Mode, kBM, kBN> bt;
  if (!bt.locate(p, s_row_of_col)) return;
  const int e = bt.e;
  const Index row0 = bt.row0, row_end = bt.row_end, out0 = bt.out0;
  const T* w = bt.w;
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, FK, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (Index k0 = 0; k0 < p.K; k0 += kBK) {
    for (int idx = threadIdx.x; idx < kBM * kBK; idx += kGemmThreads) {
      const int r = idx / kBK, c = idx % kBK;
      const Index row = row0 + r, k = k0 + c;
      Storage v{};
      if (row < row_end && k < p.K) v = reinterpret_cast<const Storage*>(p.a)[row * p.lda + k];
      as[r][c] = v;
    }
    for (int idx = threadIdx.x; idx < kBN * kBK; idx += kGemmThreads) {
      const int r = idx / kBK, c = idx % kBK;
      const Index wr = s_row_of_col[r], k = k0 + c;
      Storage v{};
      if (wr >= 0 && k < p.K) v = reinterpret_cast<const Storage*>(w)[wr * p.ldw + k];
      bs[r][c] = v;
    }
    __syncthreads();
    for (int kk = 0; kk < kBK; kk += FK) {
      wmma::fragment<wmma::matrix_a, 16, 16, FK, Frag, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, FK, Frag, wmma::col_major> fb[2];
      for (int i = 0; i < 2; ++i) {
        if constexpr (std::is_same_v<T, float>) {
          wmma::load_matrix_sync(fa[i], &as[wm + 16 * i][kk], kBK + kSmemPad);
          for (int t = 0; t < fa[i].num_elements; ++t) fa[i].x[t] = wmma::__float_to_tf32(fa[i].x[t]);
        } else {
          wmma::load_matrix_sync(fa[i], reinterpret_cast<const Frag*>(&as[wm + 16 * i][kk]), kBK + kSmemPad);
        }
      }
      for (int j = 0; j < 2; ++j) {
        if constexpr (std::is_same_v<T, float>) {
          wmma::load_matrix_sync(fb[j], &bs[wn + 16 * j][kk], kBK + kSmemPad);
          for (int t = 0; t < fb[j].num_elements; ++t) fb[j].x[t] = wmma::__float_to_tf32(fb[j].x[t]);
        } else {
          wmma::load_matrix_sync(fb[j], reinterpret_cast<const Frag*>(&bs[wn + 16 * j][kk]), kBK + kSmemPad);
        }
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&cs[wm + 16 * i][wn + 16 * j], acc[i][j], kBN + 4, wmma::mem_row_major);
  __syncthreads();
  store_tile<T, Mode, Expr, Activation, kBM, kBN>(p, &cs[0][0], kBN + 4, s_row_of_col, e, row0, row_end, out0);
}

// ---- pipelined mainloop: 16-bit operands, 16-byte aligned rows (K % 8 == 0) ---------------------
// 64 x 128 x BK tiles, 4 warps of 32 x 64, operands staged by cp.async (16-byte copies, zero-fill
// past the end) through a 3-deep shared-memory pipeline so loads overlap the tensor-core math.
// BK = 64 reads 128 contiguous bytes of every weight row per stage: better DRAM locality for the
// weight-streaming decode shapes (measured: 1.2-1.4x at M <= 64). BK = 32 halves the shared
// memory, so twice the blocks fit on an SM: better for prefill, where tiles are full.

constexpr int kFastBM = 64, kFastBN = 128, kFastStages = 3, kFastThreads = 128;
template <int BK>
struct PipelinedTile {
  static constexpr int kLd = BK + 8;  // padded row (elements), keeps 16-byte alignment
  static constexpr int kStageElems = (kFastBM + kFastBN) * kLd;
  static constexpr int kSmemBytes = kFastStages * kStageElems * 2;  // dynamic shared memory
  static_assert(kSmemBytes >= kFastBM * (kFastBN + 4) * 4, "the epilogue tile reuses the pipeline's shared memory");
};

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: fill the 16 bytes with zeros, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <class T, ColumnMode Mode, class Expr, class Activation, int kFastBK>
__global__ void __launch_bounds__(kFastThreads) grouped_gemm_pipelined_kernel(GroupedGemmParams<T, Activation> p) {
  static_assert(sizeof(T) == 2, "the pipelined mainloop takes 16-bit operands");
  constexpr int kFastLd = PipelinedTile<kFastBK>::kLd;
  constexpr int kFastStageElems = PipelinedTile<kFastBK>::kStageElems;
  using namespace nvcuda;
  using Frag = typename WmmaType<T>::type;
  extern __shared__ __align__(128) std::uint16_t smem[];  // PipelinedTile<BK>::kSmemBytes
  __shared__ Index s_row_of_col[kFastBN];

  BlockTile<T, Mode, kFastBM, kFastBN> bt;
  if (!bt.locate(p, s_row_of_col)) return;
  const int e = bt.e;
  const Index row0 = bt.row0, row_end = bt.row_end, out0 = bt.out0;
  const T* w = bt.w;
  __syncthreads();

  // One k-tile into stage `s`: A is 64 rows x 8 chunks, B 128 rows x 8 chunks of 8 elements.
  constexpr int kChunks = kFastBK / 8;
  auto load_stage = [&](int s, Index k0) {
    std::uint16_t* as = smem + s * kFastStageElems;
    std::uint16_t* bs = as + kFastBM * kFastLd;
    for (int idx = threadIdx.x; idx < kFastBM * kChunks; idx += kFastThreads) {
      const int r = idx / kChunks, c = (idx % kChunks) * 8;
      const Index row = row0 + r, k = k0 + c;
      const bool ok = row < row_end && k < p.K;
      cp_async_16(as + r * kFastLd + c, ok ? static_cast<const void*>(p.a + row * p.lda + k) : p.a, ok);
    }
    for (int idx = threadIdx.x; idx < kFastBN * kChunks; idx += kFastThreads) {
      const int r = idx / kChunks, c = (idx % kChunks) * 8;
      const Index wr = s_row_of_col[r], k = k0 + c;
      const bool ok = wr >= 0 && k < p.K;
      cp_async_16(bs + r * kFastLd + c, ok ? static_cast<const void*>(w + wr * p.ldw + k) : w, ok);
    }
  };

  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 64;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  const int k_tiles = static_cast<int>((p.K + kFastBK - 1) / kFastBK);
  for (int s = 0; s < kFastStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, static_cast<Index>(s) * kFastBK);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kFastStages - 2>();
    __syncthreads();  // stage kt landed for every thread; stage kt-1 is free to refill
    const int next = kt + kFastStages - 1;
    if (next < k_tiles) load_stage(next % kFastStages, static_cast<Index>(next) * kFastBK);
    cp_async_commit();
    const std::uint16_t* as = smem + (kt % kFastStages) * kFastStageElems;
    const std::uint16_t* bs = as + kFastBM * kFastLd;
    for (int kk = 0; kk < kFastBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, Frag, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, Frag, wmma::col_major> fb[4];
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const Frag*>(as + (wm + 16 * i) * kFastLd + kk), kFastLd);
      for (int j = 0; j < 4; ++j)
        wmma::load_matrix_sync(fb[j], reinterpret_cast<const Frag*>(bs + (wn + 16 * j) * kFastLd + kk), kFastLd);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every stage consumed: the shared memory becomes the epilogue tile
  float* cs = reinterpret_cast<float*>(smem);
  constexpr int kLdc = kFastBN + 4;
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j)
      wmma::store_matrix_sync(cs + (wm + 16 * i) * kLdc + wn + 16 * j, acc[i][j], kLdc, wmma::mem_row_major);
  __syncthreads();
  store_tile<T, Mode, Expr, Activation, kFastBM, kFastBN>(p, cs, kLdc, s_row_of_col, e, row0, row_end, out0);
}

// True when a GEMM's operands suit the pipelined mainloop: 16-bit, rows 16-byte aligned.
template <class T, class Activation>
bool pipelined_gemm_applies(const GroupedGemmParams<T, Activation>& p) {
  if constexpr (sizeof(T) != 2) {
    return false;
  } else {
    const auto aligned = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; };
    return p.K % 8 == 0 && p.lda % 8 == 0 && p.ldw % 8 == 0 && p.w_expert_stride % 8 == 0 && aligned(p.a) &&
           aligned(p.w);
  }
}

}  // namespace moe::cuda::detail
