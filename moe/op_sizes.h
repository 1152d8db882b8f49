// Output sizes and options of the standalone ops, shared by the CPU (moe/cpu/ops.h) and CUDA
// (moe/cuda/ops.cuh) implementations, so both size their buffers by one definition.
#pragma once

#include <algorithm>

#include "moe/tensor.h"

namespace moe {

inline Index round_up(Index x, Index m) { return (x + m - 1) / m * m; }

// Rows of moe_permute's outputs: M*k, or with alignment round_up(M*k + E_local*(A-1), A).
inline Index moe_permute_rows(Index num_tokens, int top_k, Index num_local_experts, Index align_block_size) {
  const Index slots = num_tokens * top_k;
  return align_block_size > 0 ? round_up(slots + num_local_experts * (align_block_size - 1), align_block_size) : slots;
}

// moe_align_block_size's buffer sizes (vLLM): numel + E*(block-1), rounded up to the block when
// pad_sorted_ids, and at most numel*block when numel < E.
struct AlignSizes {
  Index max_num_tokens_padded;
  Index num_blocks;
};
inline AlignSizes moe_align_block_size_sizes(Index num_slots, Index num_experts, Index block_size, bool pad_sorted_ids) {
  Index n = num_slots + num_experts * (block_size - 1);
  if (pad_sorted_ids) n = round_up(n, block_size);
  if (num_slots < num_experts) n = std::min(num_slots * block_size, n);
  return {n, (n + block_size - 1) / block_size};
}

// EPLB: how a logical expert's replica is chosen.
enum class ReplicaChoice {
  kTokenHash,     // newest vLLM: replica = ((m * 2654435769) mod 2^32) mod count
  kSlotPosition,  // older vLLM: replica = (m*k + j) mod count
};

}  // namespace moe
