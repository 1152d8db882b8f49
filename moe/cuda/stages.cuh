// The data-movement stages of the CUDA forward: routing, slot keys, offsets, row assignment,
// gather and finalize. Each is a small kernel; ids are bounds-checked against E_global before
// they index anything.
#pragma once

#include <cstdint>

#include "moe/expert_map.h"
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

__global__ void copy_routing_kernel(const std::int32_t* ids_in, Index ld_ids, const float* w_in, Index ld_w,
                                    Index num_tokens, int top_k, std::int32_t* ids, float* weights) {
  const Index s = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= num_tokens * top_k) return;
  const Index m = s / top_k, j = s % top_k;
  ids[s] = ids_in[m * ld_ids + j];
  weights[s] = w_in[m * ld_w + j];
}

// Sort key of each slot: its local expert, or E_local when the id is out of range or remote.
__global__ void slot_keys_kernel(const std::int32_t* ids, Index num_slots, const std::int32_t* expert_map,
                                 Index num_experts, int num_local, std::int32_t* keys, std::int32_t* slots,
                                 std::int32_t* counts) {
  const Index s = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= num_slots) return;
  std::int32_t l = local_expert_id(ids[s], expert_map, num_experts);
  if (l < 0 || l >= num_local) l = num_local;
  keys[s] = l;
  slots[s] = static_cast<std::int32_t>(s);
  atomicAdd(&counts[l], 1);
}

// Single block: offsets into the sorted slots, each expert's row segment (standard: packed;
// batched: e * capacity, at most capacity rows) and the m-tile prefix for the GEMMs.
__global__ void offsets_kernel(const std::int32_t* counts, int num_local, Index batched_capacity, int tile_m,
                               Index* sorted_start, Index* seg_begin, Index* seg_count, Index* tile_offsets) {
  if (threadIdx.x != 0) return;
  Index start = 0, rows = 0, tiles = 0;
  for (int e = 0; e < num_local; ++e) {
    const Index c = counts[e];
    sorted_start[e] = start;
    start += c;
    const Index n = batched_capacity > 0 ? (c < batched_capacity ? c : batched_capacity) : c;
    seg_begin[e] = batched_capacity > 0 ? e * batched_capacity : rows;
    seg_count[e] = n;
    rows += n;
    tile_offsets[e] = tiles;
    tiles += (n + tile_m - 1) / tile_m;
  }
  sorted_start[num_local] = start;
  tile_offsets[num_local] = tiles;
}

// Sorted position p -> the slot's row (or -1), and each row's router weight.
__global__ void assign_rows_kernel(const std::int32_t* sorted_keys, const std::int32_t* sorted_slots, Index num_slots,
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

// One block per slot: copies the token's hidden state to the slot's row (optionally times the
// router weight, in the storage type, as vLLM's apply_router_weight_on_input).
template <class T, bool WeightOnInput>
__global__ void gather_kernel(const T* hidden, Index ld_hidden, Index hidden_size, int top_k, const Index* slot_row,
                              const float* weights, T* rows) {
  const Index s = blockIdx.x;
  const Index row = slot_row[s];
  if (row < 0) return;
  const T* src = hidden + (s / top_k) * ld_hidden;
  T* dst = rows + row * hidden_size;
  if constexpr (WeightOnInput) {
    const float w = round_to<T>(weights[s]);
    for (Index c = threadIdx.x; c < hidden_size; c += blockDim.x) dst[c] = from_float<T>(to_float(src[c]) * w);
  } else {
    for (Index c = threadIdx.x; c < hidden_size; c += blockDim.x) dst[c] = src[c];
  }
}

// out[m] = sum over slots j (ascending) of the slot's row, in float, rounded once.
template <class T>
__global__ void finalize_kernel(const T* y, Index hidden_size, int top_k, const Index* slot_row, Index token_begin,
                                T* out, Index ld_out) {
  const Index m = blockIdx.x;
  const Index* rows = slot_row + m * top_k;
  for (Index c = threadIdx.x; c < hidden_size; c += blockDim.x) {
    float sum = 0.0f;
    for (int j = 0; j < top_k; ++j) {
      const Index r = rows[j];
      if (r >= 0) sum += to_float(y[r * hidden_size + c]);
    }
    out[(token_begin + m) * ld_out + c] = from_float<T>(sum);
  }
}

}  // namespace moe::cuda::detail
