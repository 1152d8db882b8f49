// The data-movement stages of the CUDA forward: routing, slot keys, offsets, row assignment,
// gather and finalize. Each is a small kernel; ids are bounds-checked against E_global before
// they index anything.
#pragma once

#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "moe/cuda/launch.h"
#include "moe/epilogue.h"
#include "moe/expert_map.h"
#include "moe/output_epilogue.h"
#include "moe/quant/numeric.h"
#include "moe/routing.h"
#include "moe/tensor.h"

namespace moe::cuda::detail {

// One thread per token through the policy's route_token (the generic path: any policy, including
// a user's). Scratch: kScratchPerExpert * E floats and E ints per token.
template <class Routing>
__global__ void route_kernel(const float* logits, Index ld_logits, Index num_tokens, int num_experts, int top_k,
                             const float* correction_bias, typename Routing::Arguments args, float* scratch,
                             std::int32_t* index_scratch, std::int32_t* ids, float* weights) {
  const Index m = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (m >= num_tokens) return;
  routing::TokenContext t{logits + m * ld_logits,
                          num_experts,
                          top_k,
                          correction_bias,
                          scratch + m * routing::kScratchPerExpert * num_experts,
                          index_scratch + m * num_experts,
                          ids + m * top_k,
                          weights + m * top_k};
  Routing::route_token(t, args);
}

// Sort key of each slot: its local expert, or E_local when the id is out of range or remote.
// Counts go through a block-local histogram in shared memory (one global atomic per block and
// expert: at prefill, 10^5 slots on a few hundred counters would serialize on global atomics).
// With `ids_in` (precomputed routing) the ids and weights are also copied into the workspace.
static __global__ void slot_keys_kernel(const std::int32_t* ids_in, Index ld_ids, const float* w_in, Index ld_w, int top_k,
                                 std::int32_t* ids, float* weights, Index num_slots, const std::int32_t* expert_map,
                                 Index num_experts, int num_local, bool shared_histogram, std::int32_t* keys,
                                 std::int32_t* slots, std::int32_t* counts) {
  extern __shared__ std::int32_t histogram[];  // [num_local + 1] when shared_histogram
  if (shared_histogram) {
    for (int e = threadIdx.x; e <= num_local; e += blockDim.x) histogram[e] = 0;
    __syncthreads();
  }
  const Index s = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s < num_slots) {
    std::int32_t id;
    if (ids_in) {
      const Index m = s / top_k, j = s % top_k;
      id = ids_in[m * ld_ids + j];
      ids[s] = id;
      weights[s] = w_in[m * ld_w + j];
    } else {
      id = ids[s];
    }
    std::int32_t l = local_expert_id(id, expert_map, num_experts);
    if (l < 0 || l >= num_local) l = num_local;
    keys[s] = l;
    slots[s] = static_cast<std::int32_t>(s);
    atomicAdd(shared_histogram ? &histogram[l] : &counts[l], 1);
  }
  if (shared_histogram) {
    __syncthreads();
    for (int e = threadIdx.x; e <= num_local; e += blockDim.x) {
      if (histogram[e] != 0) atomicAdd(&counts[e], histogram[e]);
    }
  }
}
// Experts whose histogram fits the default 48 KiB of shared memory.
constexpr int kMaxSharedHistogramExperts = 8192;

// Block-wide (one block): from per-expert slot counts (`count_of(e)`), the offsets into the sorted
// slots, each expert's row segment (standard: packed; batched: e * capacity, at most capacity
// rows) and the m-tile prefix for the GEMMs, by scans over chunks of kThreads experts (a serial
// loop cost ~0.3 us per expert). `sorted_start` may be null. `dropped` (optional): the slots beyond
// the batched capacity, stored, or added when `accumulate` (later chunks of a forward). Ends with
// a __syncthreads, after which the block may read what it wrote.
template <int kThreads, class CountOf>
__device__ void expert_offsets(CountOf count_of, int num_local, Index batched_capacity, int tile_m, Index* sorted_start,
                               Index* seg_begin, Index* seg_count, Index* tile_offsets, std::int64_t* dropped = nullptr,
                               bool accumulate = false) {
  using Scan = cub::BlockScan<Index, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ Index carry[3];  // sorted slots, rows, tiles before this chunk
  if (threadIdx.x < 3) carry[threadIdx.x] = 0;
  __syncthreads();
  for (int base = 0; base < num_local; base += kThreads) {
    const int e = base + static_cast<int>(threadIdx.x);
    const Index c = e < num_local ? count_of(e) : 0;
    const Index n = batched_capacity > 0 ? (c < batched_capacity ? c : batched_capacity) : c;
    const Index t = (n + tile_m - 1) / tile_m;
    Index c_before, n_before, t_before, c_total, n_total, t_total;
    Scan(temp).ExclusiveSum(c, c_before, c_total);
    __syncthreads();
    Scan(temp).ExclusiveSum(n, n_before, n_total);
    __syncthreads();
    Scan(temp).ExclusiveSum(t, t_before, t_total);
    if (e < num_local) {
      if (sorted_start) sorted_start[e] = carry[0] + c_before;
      seg_begin[e] = batched_capacity > 0 ? e * batched_capacity : carry[1] + n_before;
      seg_count[e] = n;
      tile_offsets[e] = carry[2] + t_before;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      carry[0] += c_total;
      carry[1] += n_total;
      carry[2] += t_total;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (sorted_start) sorted_start[num_local] = carry[0];
    tile_offsets[num_local] = carry[2];
    if (dropped) *dropped = (accumulate ? *dropped : 0) + (carry[0] - carry[1]);
  }
  __syncthreads();
}

// Single block: expert_offsets over the global counts of slot_keys_kernel.
constexpr int kOffsetsThreads = 512;
static __global__ void __launch_bounds__(kOffsetsThreads) offsets_kernel(const std::int32_t* counts, int num_local,
                                                                  Index batched_capacity, int tile_m,
                                                                  Index* sorted_start, Index* seg_begin,
                                                                  Index* seg_count, Index* tile_offsets,
                                                                  std::int64_t* dropped, bool accumulate) {
  expert_offsets<kOffsetsThreads>([&](int e) { return Index{counts[e]}; }, num_local, batched_capacity, tile_m,
                                  sorted_start, seg_begin, seg_count, tile_offsets, dropped, accumulate);
}

// Sorted position p -> the slot's row (or -1), and each row's router weight.
static __global__ void assign_rows_kernel(const std::int32_t* sorted_keys, const std::int32_t* sorted_slots, Index num_slots,
                                   int num_local, const Index* sorted_start, const Index* seg_begin,
                                   const Index* seg_count, const float* weights, Index* slot_row, float* row_weight) {
  const Index p = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= num_slots) return;
  const int e = sorted_keys[p];
  const std::int32_t s = sorted_slots[p];
  Index row = -1;
  if (e < num_local) {
    const Index rank = p - sorted_start[e];
    if (rank < seg_count[e]) row = seg_begin[e] + rank;
  }
  slot_row[s] = row;
  if (row >= 0) row_weight[row] = weights[s];
}

// Decode batches (at most kSmallPrepSlots slots): slot keys, per-expert counts, the stable sort
// by local expert, offsets, the m-tile prefix and the rows in one block, in place of the five
// launches of the general path (counts memset, slot_keys_kernel, CUB radix sort, offsets_kernel,
// assign_rows_kernel), whose launch gaps cost more than their work at M = 1..64. Same outputs for
// the later stages (seg_begin, seg_count, tile_offsets, slot_row, row_weight; with `ids_in` also
// ids and weights) and the same order: ascending slot within an expert. sorted_start is not
// written (only assign_rows_kernel reads it). Shared memory: num_local + 1 counters.
constexpr int kSmallPrepThreads = 1024;
constexpr int kSmallPrepSlots = kSmallPrepThreads;  // one slot per thread
constexpr int kSmallPrepExperts = 8192;             // 32 KiB of counters
static __global__ void __launch_bounds__(kSmallPrepThreads)
    small_routing_prep_kernel(const std::int32_t* ids_in, Index ld_ids, const float* w_in, Index ld_w, int top_k,
                              std::int32_t* ids, float* weights, int num_slots, const std::int32_t* expert_map,
                              Index num_experts, int num_local, Index batched_capacity, int tile_m, Index* seg_begin,
                              Index* seg_count, Index* tile_offsets, Index* slot_row, float* row_weight,
                              std::int64_t* dropped, bool accumulate) {
  extern __shared__ std::int32_t prep_count[];  // [num_local + 1]: slots per key, then slots ranked so far
  grid_dependency_wait();
  allow_dependents_launch();
  for (int e = threadIdx.x; e <= num_local; e += blockDim.x) prep_count[e] = 0;
  __syncthreads();
  const int s = threadIdx.x;
  const bool valid = s < num_slots;
  int key = num_local;
  float w = 0.0f;
  if (valid) {
    std::int32_t id;
    if (ids_in) {
      const Index m = s / top_k, j = s % top_k;
      id = ids_in[m * ld_ids + j];
      w = w_in[m * ld_w + j];
      ids[s] = id;
      weights[s] = w;
    } else {
      id = ids[s];
      w = weights[s];
    }
    key = local_expert_id(id, expert_map, num_experts);
    if (key < 0 || key >= num_local) key = num_local;
    atomicAdd(&prep_count[key], 1);
  }
  __syncthreads();
  expert_offsets<kSmallPrepThreads>([&](int e) { return Index{prep_count[e]}; }, num_local, batched_capacity, tile_m,
                                    nullptr, seg_begin, seg_count, tile_offsets, dropped, accumulate);
  for (int e = threadIdx.x; e <= num_local; e += blockDim.x) prep_count[e] = 0;
  __syncthreads();  // the block's seg_begin / seg_count writes are visible to it after expert_offsets
  // Stable ranks: warps in slot order; inside a warp, lanes with the same key in lane order.
  const int warp = s / 32, lane = s % 32;
  const unsigned valid_lanes = __ballot_sync(0xffffffffu, valid);
  Index rank = 0;
  for (int turn = 0; turn * 32 < num_slots; ++turn) {
    if (warp == turn && valid) {
      const unsigned peers = __match_any_sync(valid_lanes, key);
      const int leader = __ffs(peers) - 1;
      int before = 0;
      if (lane == leader) {
        before = prep_count[key];
        prep_count[key] = before + __popc(peers);
      }
      before = __shfl_sync(valid_lanes, before, leader);
      rank = before + __popc(peers & ((1u << lane) - 1u));
    }
    __syncthreads();
  }
  if (valid) {
    Index row = -1;
    if (key < num_local && rank < seg_count[key]) row = seg_begin[key] + rank;
    slot_row[s] = row;
    if (row >= 0) row_weight[row] = w;
  }
}

// Grid (tokens, column blocks): a token's columns are spread over gridDim.y blocks so that a decode
// batch of a few tokens still occupies many SMs (token_column_blocks picks gridDim.y).
__device__ __forceinline__ Index first_column() { return static_cast<Index>(blockIdx.y) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ Index column_stride() { return static_cast<Index>(gridDim.y) * blockDim.x; }
// Column blocks for a per-token pass over `units` column units (16-byte vectors) with `threads`
// per block: enough blocks for ~2 waves of 132 SMs, never more than the units need.
inline unsigned token_column_blocks(Index tokens, Index units, int threads) {
  const Index needed = (units + threads - 1) / threads;
  const Index wanted = (264 + tokens - 1) / (tokens > 0 ? tokens : 1);
  const Index y = needed < wanted ? needed : wanted;
  return static_cast<unsigned>(y < 1 ? 1 : y > 65535 ? 65535 : y);
}

// Per token: its hidden state is read once and copied to the rows of its top_k slots
// (optionally times the router weight, in the storage type, as vLLM's
// apply_router_weight_on_input). 16-byte copies when the rows allow them.
template <class T, bool WeightOnInput>
__global__ void gather_kernel(const T* hidden, Index ld_hidden, Index hidden_size, int top_k, const Index* slot_row,
                              const float* weights, T* rows) {
  grid_dependency_wait();
  allow_dependents_launch();
  const Index m = blockIdx.x;
  const T* src = hidden + m * ld_hidden;
  if constexpr (WeightOnInput) {
    for (int j = 0; j < top_k; ++j) {
      const Index row = slot_row[m * top_k + j];
      if (row < 0) continue;
      const float w = round_to<T>(weights[m * top_k + j]);
      for (Index c = first_column(); c < hidden_size; c += column_stride()) {
        rows[row * hidden_size + c] = from_float<T>(to_float(src[c]) * w);
      }
    }
  } else {
    constexpr int kVec = 16 / sizeof(T);
    const bool vector = hidden_size % kVec == 0 && ld_hidden % kVec == 0 &&
                        reinterpret_cast<std::uintptr_t>(hidden) % 16 == 0;
    if (vector) {
      const Index n = hidden_size / kVec;
      for (Index c = first_column(); c < n; c += column_stride()) {
        const uint4 v = reinterpret_cast<const uint4*>(src)[c];
        for (int j = 0; j < top_k; ++j) {
          const Index row = slot_row[m * top_k + j];
          if (row >= 0) reinterpret_cast<uint4*>(rows + row * hidden_size)[c] = v;
        }
      }
    } else {
      for (Index c = first_column(); c < hidden_size; c += column_stride()) {
        const T v = src[c];
        for (int j = 0; j < top_k; ++j) {
          const Index row = slot_row[m * top_k + j];
          if (row >= 0) rows[row * hidden_size + c] = v;
        }
      }
    }
  }
}

// out[m] = OutExpr(sum over slots j (ascending) of the slot's row, in float), rounded once.
template <class T, class OutExpr>
__global__ void finalize_kernel(const T* y, Index hidden_size, int top_k, const Index* slot_row, Index token_begin,
                                T* out, Index ld_out, epilogue::OutputEpilogueParams<T> out_epilogue) {
  grid_dependency_wait();
  allow_dependents_launch();
  const Index m = blockIdx.x;
  const Index* rows = slot_row + m * top_k;
  for (Index c = first_column(); c < hidden_size; c += column_stride()) {
    float sum = 0.0f;
    for (int j = 0; j < top_k; ++j) {
      const Index r = rows[j];
      if (r >= 0) sum += to_float(y[r * hidden_size + c]);
    }
    out[(token_begin + m) * ld_out + c] = epilogue::store_output<OutExpr>(out_epilogue, token_begin + m, c, sum);
  }
}

// ---- passes of schedules whose GEMMs store raw outputs (Sm90TmaWarpSpecialized) ----------------
// Both read and write 8 consecutive 16-bit columns per thread (16-byte accesses); the callers
// check that every row width is a multiple of 8 and that rows start 16-byte aligned.

// The alignment is what makes nvcc emit one 16-byte access: without it a Vec8 of 16-bit values
// is 2-byte aligned and every copy is eight 2-byte loads or stores (ncu: the activation pass
// issue-bound at 2.9 TB/s, the finalize at 2.8 TB/s).
template <class T>
struct alignas(8 * sizeof(T) < 16 ? 8 * sizeof(T) : 16) Vec8 {
  T v[8];
};
static_assert(sizeof(Vec8<bfloat16>) == 16 && alignof(Vec8<bfloat16>) == 16);

// The storage bits of x, a value the epilogue tree has already rounded to T (its last node is
// RoundTo<T>): on the device the bare cvt, exact for such a value. from_float would add its NaN
// test, which only picks a NaN's payload; the intermediate is no output, so any NaN will do.
template <class T>
__device__ __forceinline__ T from_rounded(float x) {
  if constexpr (std::is_same_v<T, bfloat16>) return bfloat16::from_bits(__bfloat16_as_ushort(__float2bfloat16_rn(x)));
  else if constexpr (std::is_same_v<T, half>) return half::from_bits(__half_as_ushort(__float2half_rn(x)));
  else return from_float<T>(x);
}

// The intermediate's columns [c0, c0 + 8) of one row: the Gemm1 epilogue tree over GEMM1's stored
// output row `in` ([gate | up] halves (split), gate/up pairs (interleaved), or one value
// (ungated)), rounded to T.
template <class T, class Expr, class Activation, int kLayoutMode>  // 0 plain, 1 split, 2 interleaved
__device__ __forceinline__ Vec8<T> activate8(const T* in, Index inter_cols, Index c0,
                                             const typename Activation::Arguments& args) {
  Vec8<T> out;
  if constexpr (kLayoutMode == 0) {
    const Vec8<T> x = *reinterpret_cast<const Vec8<T>*>(in + c0);
    for (int j = 0; j < 8; ++j) {
      epilogue::ElementContext<Activation> ctx;
      ctx.args = args;
      ctx.col = c0 + j;
      ctx.acc[0] = to_float(x.v[j]);
      out.v[j] = from_rounded<T>(Expr::eval(ctx));
    }
  } else {
    Vec8<T> g, u;
    if constexpr (kLayoutMode == 1) {
      g = *reinterpret_cast<const Vec8<T>*>(in + c0);
      u = *reinterpret_cast<const Vec8<T>*>(in + inter_cols + c0);
    } else {
      const Vec8<T> a = *reinterpret_cast<const Vec8<T>*>(in + 2 * c0);
      const Vec8<T> b = *reinterpret_cast<const Vec8<T>*>(in + 2 * c0 + 8);
      for (int j = 0; j < 4; ++j) {
        g.v[j] = a.v[2 * j];
        u.v[j] = a.v[2 * j + 1];
        g.v[j + 4] = b.v[2 * j];
        u.v[j + 4] = b.v[2 * j + 1];
      }
    }
    for (int j = 0; j < 8; ++j) {
      epilogue::ElementContext<Activation> ctx;
      ctx.args = args;
      ctx.col = c0 + j;
      ctx.acc[1] = to_float(g.v[j]);
      ctx.acc[2] = to_float(u.v[j]);
      out.v[j] = from_rounded<T>(Expr::eval(ctx));
    }
  }
  return out;
}

// inter[row, :] = activate8 over GEMM1's stored output at the row of every slot. One block per
// slot, threads over 8-column groups.
template <class T, class Expr, class Activation, int kLayoutMode>
__global__ void __launch_bounds__(128) activation_kernel(const T* gemm1_out, Index n_total, Index inter_cols,
                                                         const Index* slot_row, typename Activation::Arguments args,
                                                         T* inter) {
  grid_dependency_wait();
  allow_dependents_launch();
  const Index row = slot_row[blockIdx.x];
  if (row < 0) return;
  const T* in = gemm1_out + row * n_total;
  T* dst = inter + row * inter_cols;
  for (Index c0 = 8 * static_cast<Index>(threadIdx.x); c0 < inter_cols; c0 += 8 * static_cast<Index>(blockDim.x)) {
    *reinterpret_cast<Vec8<T>*>(dst + c0) = activate8<T, Expr, Activation, kLayoutMode>(in, inter_cols, c0, args);
  }
}

// The activated intermediate as a row source of the W8A8 quantizer (quantize_rows.cuh): the
// activation pass fused into the quantization of GEMM2's input, so the intermediate is never stored.
template <class T, class Expr, class Activation, int kLayoutMode>
struct ActivatedRows {
  using Element = T;
  const T* gemm1_out;
  Index n_total, inter_cols;
  typename Activation::Arguments args;
  __device__ __forceinline__ Vec8<T> load(Index row, Index c0) const {
    return activate8<T, Expr, Activation, kLayoutMode>(gemm1_out + row * n_total, inter_cols, c0, args);
  }
};

// Slots of finalize_epilogue_kernel's shared arrays: top_k rounded up to 4, the pad rows -1. The
// slot loop takes 4 slots at a time (and nvcc may load two rows at once past the last slot:
// memcheck saw a 16-byte read past an unpadded top_k = 1 array), so the arrays are padded to 4.
MOE_HOST_DEVICE int finalize_slot_capacity(int top_k) { return (top_k + 3) / 4 * 4; }
inline std::size_t finalize_smem_bytes(int top_k) {
  return static_cast<std::size_t>(finalize_slot_capacity(top_k)) * (sizeof(Index) + sizeof(float));
}

// out[m] = OutExpr(sum over slots j (ascending) of the Gemm2 epilogue tree applied to the slot's
// stored GEMM2 output and router weight, in float), rounded once. Grid (tokens, column blocks):
// each block reads the token's slot rows and weights into shared memory (finalize_smem_bytes),
// then each thread sums 8 columns.
template <class T, class Expr, class Activation, class OutExpr>
__global__ void __launch_bounds__(256) finalize_epilogue_kernel(const T* y, Index hidden_size, int top_k,
                                                                const Index* slot_row, const float* slot_weight,
                                                                Index token_begin, T* out, Index ld_out,
                                                                epilogue::OutputEpilogueParams<T> out_epilogue) {
  grid_dependency_wait();
  allow_dependents_launch();
  extern __shared__ unsigned char finalize_smem[];
  const int capacity = finalize_slot_capacity(top_k);
  Index* rows = reinterpret_cast<Index*>(finalize_smem);
  float* w = reinterpret_cast<float*>(rows + capacity);
  const Index m = blockIdx.x;
  for (int j = threadIdx.x; j < capacity; j += blockDim.x) {
    rows[j] = j < top_k ? slot_row[m * top_k + j] : Index{-1};
    w[j] = j < top_k ? slot_weight[m * top_k + j] : 0.0f;
  }
  __syncthreads();
  for (Index c0 = 8 * first_column(); c0 < hidden_size; c0 += 8 * column_stride()) {
    float sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    // Four slots' loads are issued before any is summed, so a thread has several 16-byte loads in
    // flight (kept from session 16; its gain was not measured apart: what made this pass fast was
    // leaving the identity rounding and NaN test out of the tree, benchmarks/NOTES.md). The
    // arrays are padded to a multiple of 4 with -1 rows (finalize_slot_capacity); skipped slots
    // add nothing.
    for (int j0 = 0; j0 < top_k; j0 += 4) {
      Vec8<T> x[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const Index r = rows[j0 + b];
        if (r >= 0) x[b] = *reinterpret_cast<const Vec8<T>*>(y + r * hidden_size + c0);
      }
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        if (rows[j0 + b] < 0) continue;
        epilogue::ElementContext<Activation> ctx;
        ctx.weight = w[j0 + b];
        for (int c = 0; c < 8; ++c) {
          ctx.acc[0] = to_float(x[b].v[c]);
          sum[c] += Expr::eval(ctx);
        }
      }
    }
    Vec8<T> o;
    for (int c = 0; c < 8; ++c) o.v[c] = epilogue::store_output<OutExpr>(out_epilogue, token_begin + m, c0 + c, sum[c]);
    *reinterpret_cast<Vec8<T>*>(out + (token_begin + m) * ld_out + c0) = o;
  }
}

}  // namespace moe::cuda::detail
