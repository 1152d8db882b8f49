// Grouped expert GEMM on tensor cores (WMMA: HMMA on sm_80 and sm_90) with a fused epilogue.
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

  // Find this m-tile's expert.
  const int tile = blockIdx.x;
  if (tile >= p.tile_offsets[p.num_experts]) return;
  int lo = 0, hi = p.num_experts - 1;
  while (lo < hi) {  // largest e with tile_offsets[e] <= tile
    const int mid = (lo + hi + 1) / 2;
    if (p.tile_offsets[mid] <= tile) lo = mid;
    else hi = mid - 1;
  }
  const int e = lo;
  const Index row0 = p.seg_begin[e] + static_cast<Index>(tile - p.tile_offsets[e]) * kBM;
  const Index row_end = p.seg_begin[e] + p.seg_count[e];
  const T* w = p.w + static_cast<Index>(e) * p.w_expert_stride;

  constexpr int kOutPerTile = Mode == ColumnMode::kPlain ? kBN : kBN / 2;
  const Index out0 = static_cast<Index>(blockIdx.y) * kOutPerTile;
  if (out0 >= p.n_out) return;
  // Weight row of each accumulator column (-1: past the end, zero-filled).
  for (int c = threadIdx.x; c < kBN; c += kGemmThreads) {
    Index r = -1;
    if constexpr (Mode == ColumnMode::kPlain) {
      r = out0 + c < p.n_out ? out0 + c : -1;
    } else if constexpr (Mode == ColumnMode::kGatedSplit) {
      const Index i = out0 + (c < kBN / 2 ? c : c - kBN / 2);
      r = i < p.n_out ? (c < kBN / 2 ? i : p.n_out + i) : -1;
    } else {
      const Index i = out0 + c / 2;
      r = i < p.n_out ? 2 * out0 + c : -1;
    }
    s_row_of_col[c] = r;
  }
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

  // Epilogue: one output element per iteration, through the expression tree's scalar path.
  const T* bias = p.bias ? p.bias + static_cast<Index>(e) * p.bias_expert_stride : nullptr;
  for (int idx = threadIdx.x; idx < kBM * kOutPerTile; idx += kGemmThreads) {
    const int r = idx / kOutPerTile, c = idx % kOutPerTile;
    const Index row = row0 + r, col = out0 + c;
    if (row >= row_end || col >= p.n_out) continue;
    epilogue::ElementContext<Activation> ctx;
    ctx.args = p.activation;
    if constexpr (Mode == ColumnMode::kPlain) {
      ctx.acc[0] = cs[r][c];
      if (bias) ctx.bias_[0] = load_float(bias + col);
    } else {
      const int gc = Mode == ColumnMode::kGatedSplit ? c : 2 * c;
      const int uc = Mode == ColumnMode::kGatedSplit ? c + kBN / 2 : 2 * c + 1;
      ctx.acc[1] = cs[r][gc];
      ctx.acc[2] = cs[r][uc];
      if (bias) {
        ctx.bias_[1] = load_float(bias + s_row_of_col[gc]);
        ctx.bias_[2] = load_float(bias + s_row_of_col[uc]);
      }
    }
    if (p.row_weight) ctx.weight = p.row_weight[row];
    p.out[row * p.ldo + col] = from_float<T>(Expr::eval(ctx));
  }
}

}  // namespace moe::cuda::detail
