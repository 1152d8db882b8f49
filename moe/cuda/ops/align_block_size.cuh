// moe_align_block_size on the GPU (moe/cuda/ops.cuh documents every op's contract).
#pragma once

#include "moe/cuda/ops/common.cuh"

namespace moe::cuda {
namespace ops_detail {

// ---- moe_align_block_size ----------------------------------------------------------------------

// Bucket of each slot as the CPU's (dropped slots: key E, sorted last and never written).
static __global__ void align_keys_kernel(const std::int32_t* ids, Index ld_ids, Index top_k, Index num_slots,
                                  const std::int32_t* expert_map, Index num_experts, bool ignore_invalid_experts,
                                  std::uint32_t* keys, std::int32_t* slots, std::int32_t* counts) {
  for (Index s = global_thread(); s < num_slots; s += grid_threads()) {
    const std::int32_t id = ids[(s / top_k) * ld_ids + s % top_k];
    Index b;
    if (ignore_invalid_experts) {
      const std::int32_t l = local_expert_id(id, expert_map, num_experts);
      b = (l >= 0 && l < num_experts) ? Index{l} : num_experts;  // l >= E: rejected when checked
    } else {
      b = (id >= 0 && id < num_experts) ? Index{id} : num_experts;
    }
    keys[s] = static_cast<std::uint32_t>(b);
    slots[s] = static_cast<std::int32_t>(s);
    atomicAdd(&counts[b], 1);
  }
}

// Single thread: sorted starts, aligned starts (aligned_start[E] = total), num_tokens_post_padded.
static __global__ void align_offsets_kernel(const std::int32_t* counts, Index num_experts, Index block_size,
                                     Index* sorted_start, Index* aligned_start, std::int32_t* num_tokens_post_padded) {
  if (global_thread() != 0) return;
  Index sorted = 0, next = 0;
  for (Index e = 0; e < num_experts; ++e) {
    const Index c = counts[e];
    sorted_start[e] = sorted;
    sorted += c;
    aligned_start[e] = next;
    next += round_up_hd(c, block_size);
  }
  aligned_start[num_experts] = next;
  num_tokens_post_padded[0] = static_cast<std::int32_t>(next);
}

// Sentinels everywhere in sorted_token_ids; each block's expert label (or -1).
static __global__ void align_fill_kernel(Index max_padded, Index num_blocks, Index block_size, Index numel,
                                  const Index* aligned_start, Index num_experts, const std::int32_t* expert_map,
                                  bool ignore_invalid_experts, std::int32_t* sorted_ids, Index ld_sorted,
                                  std::int32_t* expert_ids, Index ld_expert_ids) {
  const Index n = max_padded > num_blocks ? max_padded : num_blocks;
  const Index total = aligned_start[num_experts];
  for (Index i = global_thread(); i < n; i += grid_threads()) {
    if (i < max_padded) sorted_ids[i * ld_sorted] = static_cast<std::int32_t>(numel);
    if (i < num_blocks) {
      const Index row = i * block_size;
      std::int32_t label = -1;
      if (row < total) {
        const Index e = segment_of(aligned_start, num_experts, row);
        label = (!ignore_invalid_experts && expert_map != nullptr) ? expert_map[e] : static_cast<std::int32_t>(e);
      }
      expert_ids[i * ld_expert_ids] = label;
    }
  }
}

static __global__ void align_scatter_kernel(const std::uint32_t* sorted_keys, const std::int32_t* sorted_slots,
                                     Index num_slots, Index num_experts, const Index* sorted_start,
                                     const Index* aligned_start, Index max_padded, std::int32_t* sorted_ids,
                                     Index ld_sorted) {
  for (Index p = global_thread(); p < num_slots; p += grid_threads()) {
    const Index key = sorted_keys[p];
    if (key >= num_experts) continue;  // dropped
    const Index dest = aligned_start[key] + (p - sorted_start[key]);
    if (dest < max_padded) sorted_ids[dest * ld_sorted] = sorted_slots[p];
  }
}

}  // namespace ops_detail

// ---------------------------------------------------------------------------------------------
// moe_align_block_size: the semantics of moe::cpu::moe_align_block_size, including its
// deterministic ascending-slot order within an expert. Unchecked: expert_map entries are not
// validated; with ignore_invalid_experts a slot whose map entry is outside [0, E) is dropped, and
// without it a block's label is copied from the map as is. Checked: the CPU's two map checks.

namespace ops_detail {
struct AlignLayout {
  Index slots = 0;
  int bits = 1;
  std::size_t cub_bytes = 0;
  std::size_t keys, slots_in, keys_sorted, slots_sorted, counts, sorted_start, aligned_start, cub;
  std::size_t total = 0;
};
inline Status align_layout(Index num_tokens, Index top_k, Index num_experts, AlignLayout* l) {
  l->slots = std::max<Index>(0, num_tokens) * std::max<Index>(0, top_k);
  const Index E = std::max<Index>(0, num_experts);
  l->bits = detail::radix_sort_bits(E);  // keys in [0, E]
  const Status st = sort_temp_bytes(l->slots, l->bits, &l->cub_bytes);
  Carve c;
  const std::size_t S = count_of(l->slots), K = count_of(E + 1);
  l->keys = c.take(S * 4);
  l->slots_in = c.take(S * 4);
  l->keys_sorted = c.take(S * 4);
  l->slots_sorted = c.take(S * 4);
  l->counts = c.take(K * 4);
  l->sorted_start = c.take(K * 8);
  l->aligned_start = c.take(K * 8);
  l->cub = c.take(l->cub_bytes);
  l->total = c.total();
  return st;
}
}  // namespace ops_detail

inline std::size_t moe_align_block_size_workspace_bytes(Index num_tokens, Index top_k, Index num_experts) {
  ops_detail::AlignLayout l;
  (void)ops_detail::align_layout(num_tokens, top_k, num_experts, &l);
  return l.total;
}

inline Status moe_align_block_size(DeviceView<const std::int32_t, 2> topk_ids, Index block_size, Index num_experts,
                                   OptDeviceView<const std::int32_t, 1> expert_map, bool pad_sorted_ids,
                                   bool ignore_invalid_experts, DeviceView<std::int32_t, 1> sorted_token_ids,
                                   DeviceView<std::int32_t, 1> expert_ids,
                                   DeviceView<std::int32_t, 1> num_tokens_post_padded, std::span<std::byte> workspace,
                                   cudaStream_t stream = nullptr, bool checked = false) {
  using namespace ops_detail;
  MOE_RETURN_IF_ERROR(moe::detail::check_align_shapes(topk_ids, block_size, num_experts, expert_map, pad_sorted_ids,
                                                      sorted_token_ids, expert_ids, num_tokens_post_padded));
  const Index M = topk_ids.extent(0), k = topk_ids.extent(1), numel = M * k;
  const AlignSizes sz = moe_align_block_size_sizes(numel, num_experts, block_size, pad_sorted_ids);
  if (expert_map && checked) {
    std::vector<std::int32_t> map;
    MOE_RETURN_IF_ERROR(copy_to_host(*expert_map, &map, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    MOE_RETURN_IF_ERROR(moe::detail::check_align_expert_map(HostView<const std::int32_t, 1>(map.data(), {num_experts}), num_experts));
  }
  // The CPU's kInternal check (padded total > buffer) cannot fire: each expert's padded run is
  // at most count + block_size - 1 and at most count * block_size. Writes are bounded anyway.

  AlignLayout l;
  MOE_RETURN_IF_ERROR(align_layout(M, k, num_experts, &l));
  MOE_RETURN_IF_ERROR(check_workspace(workspace, l.total, "moe_align_block_size_workspace_bytes"));
  std::byte* base = aligned_base(workspace.data());
  auto* keys = at<std::uint32_t>(base, l.keys);
  auto* slots_in = at<std::int32_t>(base, l.slots_in);
  auto* keys_sorted = at<std::uint32_t>(base, l.keys_sorted);
  auto* slots_sorted = at<std::int32_t>(base, l.slots_sorted);
  auto* counts = at<std::int32_t>(base, l.counts);
  auto* sorted_start = at<Index>(base, l.sorted_start);
  auto* aligned_start = at<Index>(base, l.aligned_start);
  const std::int32_t* map = expert_map ? expert_map->data() : nullptr;

  MOE_CUDA_TRY(cudaMemsetAsync(counts, 0, count_of(num_experts + 1) * sizeof(std::int32_t), stream));
  if (numel > 0) {
    align_keys_kernel<<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
        topk_ids.data(), topk_ids.stride(0), k, numel, map, num_experts, ignore_invalid_experts, keys, slots_in, counts);
    MOE_CUDA_CHECK_LAUNCH();
    std::size_t cub_bytes = l.cub_bytes;
    MOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(static_cast<void*>(base + l.cub), cub_bytes, keys, keys_sorted, slots_in,
                                                 slots_sorted, static_cast<int>(numel), 0, l.bits, stream));
  }
  align_offsets_kernel<<<1, 32, 0, stream>>>(counts, num_experts, block_size, sorted_start, aligned_start,
                                             num_tokens_post_padded.data());
  MOE_CUDA_CHECK_LAUNCH();
  const Index fill_n = std::max(sz.max_num_tokens_padded, sz.num_blocks);
  if (fill_n > 0) {
    align_fill_kernel<<<grid_for(fill_n, kThreads), kThreads, 0, stream>>>(
        sz.max_num_tokens_padded, sz.num_blocks, block_size, numel, aligned_start, num_experts, map,
        ignore_invalid_experts, sorted_token_ids.data(), sorted_token_ids.stride(0), expert_ids.data(),
        expert_ids.stride(0));
    MOE_CUDA_CHECK_LAUNCH();
  }
  if (numel > 0) {
    align_scatter_kernel<<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
        keys_sorted, slots_sorted, numel, num_experts, sorted_start, aligned_start, sz.max_num_tokens_padded,
        sorted_token_ids.data(), sorted_token_ids.stride(0));
    MOE_CUDA_CHECK_LAUNCH();
  }
  return Status::ok();
}

}  // namespace moe::cuda
