// moe_permute and moe_unpermute on the GPU (moe/cuda/ops.cuh documents every op's contract).
#pragma once

#include "moe/cuda/ops/common.cuh"

namespace moe::cuda {
namespace ops_detail {

// ---- moe_permute -------------------------------------------------------------------------------

// Sort key of slot s (as the CPU's key_of): local id; else E_local + global id (non-local
// experts, and locals whose map entry is out of [0, E_local) in unchecked mode); else E_local + E
// (ids outside [0, E)).
static __global__ void permute_keys_kernel(const std::int32_t* ids, Index ld_ids, Index top_k, Index num_slots,
                                    const std::int32_t* expert_map, Index num_experts, Index num_local,
                                    std::uint32_t* keys, std::int32_t* slots, std::int32_t* counts) {
  for (Index s = global_thread(); s < num_slots; s += grid_threads()) {
    const std::int32_t id = ids[(s / top_k) * ld_ids + s % top_k];
    const std::int32_t l = local_expert_id(id, expert_map, num_experts);
    Index key;
    if (l >= 0 && l < num_local) key = l;
    else key = num_local + ((id >= 0 && id < num_experts) ? Index{id} : num_experts);
    keys[s] = static_cast<std::uint32_t>(key);
    slots[s] = static_cast<std::int32_t>(s);
    atomicAdd(&counts[key], 1);
  }
}

// Single thread: where each key's run starts in the sorted order and in the rows, and
// expert_first_token_offset (segment starts, seg_start[E_local] = the local total).
static __global__ void permute_offsets_kernel(const std::int32_t* counts, Index num_local, Index num_keys, Index align,
                                       Index* sorted_start, Index* dest_start, Index* seg_start, std::int64_t* offsets,
                                       Index ld_offsets) {
  if (global_thread() != 0) return;
  Index sorted = 0, next = 0;
  for (Index e = 0; e < num_local; ++e) {
    const Index c = counts[e];
    sorted_start[e] = sorted;
    sorted += c;
    dest_start[e] = next;
    seg_start[e] = next;
    offsets[e * ld_offsets] = next;
    next += align > 0 ? round_up_hd(c, align) : c;
  }
  seg_start[num_local] = next;
  offsets[num_local * ld_offsets] = next;
  for (Index key = num_local; key < num_keys; ++key) {
    const Index c = counts[key];
    sorted_start[key] = sorted;
    sorted += c;
    dest_start[key] = next;
    next += c;
  }
}

// Sorted position p -> destination row; inv_permuted_idx of every slot, row_slot of local rows.
static __global__ void permute_scatter_kernel(const std::uint32_t* sorted_keys, const std::int32_t* sorted_slots,
                                       Index num_slots, Index num_local, Index align, const Index* sorted_start,
                                       const Index* dest_start, const Index* seg_start, Index num_rows,
                                       std::int32_t* inv, Index ld_inv, std::int32_t* row_slot) {
  for (Index p = global_thread(); p < num_slots; p += grid_threads()) {
    const Index key = sorted_keys[p];
    const std::int32_t s = sorted_slots[p];
    const Index dest = dest_start[key] + (p - sorted_start[key]);
    if (key < num_local) {
      inv[s * ld_inv] = static_cast<std::int32_t>(dest);
      if (dest < num_rows) row_slot[dest] = s;
    } else {
      inv[s * ld_inv] = static_cast<std::int32_t>(align > 0 ? seg_start[num_local] : dest);
    }
  }
}

// One block per row (grid-stride): permuted_idx, m_indices, the hidden row (or zeros) and the
// scales row (vLLM: a1q_scale[permuted_idx.clamp(max=M*k-1) // k]).
template <class T>
__global__ void permute_rows_kernel(const T* hidden, Index ld_hidden, Index hidden_size, const float* scales,
                                    Index ld_scales, Index num_scales, Index num_tokens, Index top_k,
                                    const std::int32_t* row_slot, const Index* seg_start, Index num_local,
                                    Index num_rows, std::int32_t fill_invalid_expert, T* permuted, Index ld_permuted,
                                    float* permuted_scales, Index ld_permuted_scales, std::int32_t* permuted_idx,
                                    Index ld_permuted_idx, std::int32_t* m_indices, Index ld_m_indices) {
  const Index slots = num_tokens * top_k;
  for (Index r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const std::int32_t s = row_slot[r];
    const Index pidx = s >= 0 ? Index{s} : slots;
    if (threadIdx.x == 0) {
      permuted_idx[r * ld_permuted_idx] = static_cast<std::int32_t>(pidx);
      if (m_indices != nullptr) {
        m_indices[r * ld_m_indices] = r < seg_start[num_local]
                                          ? static_cast<std::int32_t>(segment_of(seg_start, num_local, r))
                                          : fill_invalid_expert;
      }
    }
    T* dst = permuted + r * ld_permuted;
    if (s >= 0) {
      const T* src = hidden + (Index{s} / top_k) * ld_hidden;
      for (Index c = threadIdx.x; c < hidden_size; c += blockDim.x) dst[c] = src[c];
    } else {
      const T zero = from_float<T>(0.0f);
      for (Index c = threadIdx.x; c < hidden_size; c += blockDim.x) dst[c] = zero;
    }
    if (permuted_scales != nullptr) {
      float* sdst = permuted_scales + r * ld_permuted_scales;
      const Index token = slots == 0 ? 0 : (pidx < slots - 1 ? pidx : slots - 1) / top_k;
      for (Index c = threadIdx.x; c < num_scales; c += blockDim.x) {
        sdst[c] = num_tokens == 0 ? 0.0f : scales[token * ld_scales + c];
      }
    }
  }
}

// ---- moe_unpermute ----------------------------------------------------------------------------

// One block per token (grid-stride), threads over columns; ascending j, float, one rounding.
template <class T>
__global__ void unpermute_kernel(const T* permuted, Index ld_permuted, Index num_rows, Index hidden_size,
                                 const float* weights, Index ld_weights, Index num_tokens, Index top_k,
                                 const std::int32_t* inv, Index ld_inv, const std::int64_t* valid_rows, T* out,
                                 Index ld_out) {
  const bool has_valid = valid_rows != nullptr;
  const Index valid = has_valid ? Index{*valid_rows} : num_rows;
  for (Index m = blockIdx.x; m < num_tokens; m += gridDim.x) {
    for (Index c = threadIdx.x; c < hidden_size; c += blockDim.x) {
      float acc = 0.0f;
      for (Index j = 0; j < top_k; ++j) {
        const Index r = inv[(m * top_k + j) * ld_inv];
        if (has_valid && r >= valid) continue;  // non-local slot
        if (r < 0 || r >= num_rows) continue;   // rejected when checked; never addressed
        acc = mul_add_rn(acc, weights[m * ld_weights + j], to_float(permuted[r * ld_permuted + c]));
      }
      out[m * ld_out + c] = from_float<T>(acc);
    }
  }
}

}  // namespace ops_detail

// ---------------------------------------------------------------------------------------------
// moe_permute / moe_unpermute: the semantics of moe::cpu::moe_permute / moe_unpermute (see
// moe/cpu/ops.h). The order within an expert is ascending slot: a stable CUB radix sort of
// (key, slot) pairs with the CPU's keys.

template <class T>
struct PermuteOutputs {
  DeviceView<T, 2> permuted_hidden;                      // [R, H]
  OptDeviceView<float, 2> permuted_scales;               // [R, S] when scales are given
  DeviceView<std::int64_t, 1> expert_first_token_offset; // [E_local + 1]
  DeviceView<std::int32_t, 1> inv_permuted_idx;          // [M * k]
  DeviceView<std::int32_t, 1> permuted_idx;              // [R]
  OptDeviceView<std::int32_t, 1> m_indices;              // [R]
};

namespace ops_detail {
struct PermuteLayout {
  Index slots = 0, rows = 0, num_keys = 0;
  int bits = 1;
  std::size_t cub_bytes = 0;
  std::size_t keys, slots_in, keys_sorted, slots_sorted, counts, sorted_start, dest_start, seg_start, row_slot, cub;
  std::size_t total = 0;
};
inline Status permute_layout(Index num_tokens, int top_k, Index num_experts, Index num_local_experts,
                             Index align_block_size, PermuteLayout* l) {
  l->slots = std::max<Index>(0, num_tokens) * std::max(0, top_k);
  l->rows = std::max<Index>(0, moe_permute_rows(std::max<Index>(0, num_tokens), std::max(0, top_k),
                                                std::max<Index>(0, num_local_experts), std::max<Index>(0, align_block_size)));
  l->num_keys = std::max<Index>(0, num_local_experts) + std::max<Index>(0, num_experts) + 1;
  l->bits = detail::radix_sort_bits(l->num_keys - 1);  // keys in [0, num_keys)
  const Status st = sort_temp_bytes(l->slots, l->bits, &l->cub_bytes);
  Carve c;
  const std::size_t S = count_of(l->slots), K = count_of(l->num_keys), L = count_of(num_local_experts);
  l->keys = c.take(S * 4);
  l->slots_in = c.take(S * 4);
  l->keys_sorted = c.take(S * 4);
  l->slots_sorted = c.take(S * 4);
  l->counts = c.take(K * 4);
  l->sorted_start = c.take(K * 8);
  l->dest_start = c.take(K * 8);
  l->seg_start = c.take((L + 1) * 8);
  l->row_slot = c.take(count_of(l->rows) * 4);
  l->cub = c.take(l->cub_bytes);
  l->total = c.total();
  return st;
}
}  // namespace ops_detail

inline std::size_t moe_permute_workspace_bytes(Index num_tokens, int top_k, Index num_experts, Index num_local_experts,
                                               Index align_block_size) {
  ops_detail::PermuteLayout l;
  (void)ops_detail::permute_layout(num_tokens, top_k, num_experts, num_local_experts, align_block_size, &l);
  return l.total;
}

// Unchecked (checked = false): expert_map entries outside [0, num_local_experts) count as
// non-local (the slot sorts with its global id); duplicate local ids merge both globals into one
// expert. Checked: validate_expert_map on a host copy, as the CPU op.
template <class T>
Status moe_permute(DeviceView<const T, 2> hidden, OptDeviceView<const float, 2> scales,
                   DeviceView<const std::int32_t, 2> topk_ids, Index num_experts, Index num_local_experts,
                   OptDeviceView<const std::int32_t, 1> expert_map, Index align_block_size,
                   std::int32_t fill_invalid_expert, const PermuteOutputs<T>& out, std::span<std::byte> workspace,
                   cudaStream_t stream = nullptr, bool checked = false) {
  using namespace ops_detail;
  Index R = 0;
  MOE_RETURN_IF_ERROR(moe::detail::check_permute_shapes(hidden, scales, topk_ids, num_experts, num_local_experts,
                                                        expert_map, align_block_size, out, &R));
  if (expert_map && checked) {
    std::vector<std::int32_t> map;
    MOE_RETURN_IF_ERROR(copy_to_host(*expert_map, &map, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    MOE_RETURN_IF_ERROR(validate_expert_map(HostView<const std::int32_t, 1>(map.data(), {num_experts}), num_local_experts));
  }
  const Index M = hidden.extent(0), H = hidden.extent(1), k = topk_ids.extent(1);

  PermuteLayout l;
  const Status query = permute_layout(M, static_cast<int>(k), num_experts, num_local_experts, align_block_size, &l);
  MOE_RETURN_IF_ERROR(query);
  MOE_RETURN_IF_ERROR(check_workspace(workspace, l.total, "moe_permute_workspace_bytes"));

  std::byte* base = aligned_base(workspace.data());
  auto* keys = at<std::uint32_t>(base, l.keys);
  auto* slots_in = at<std::int32_t>(base, l.slots_in);
  auto* keys_sorted = at<std::uint32_t>(base, l.keys_sorted);
  auto* slots_sorted = at<std::int32_t>(base, l.slots_sorted);
  auto* counts = at<std::int32_t>(base, l.counts);
  auto* sorted_start = at<Index>(base, l.sorted_start);
  auto* dest_start = at<Index>(base, l.dest_start);
  auto* seg_start = at<Index>(base, l.seg_start);
  auto* row_slot = at<std::int32_t>(base, l.row_slot);
  const Index S = l.slots;

  MOE_CUDA_TRY(cudaMemsetAsync(counts, 0, count_of(l.num_keys) * sizeof(std::int32_t), stream));
  if (S > 0) {
    permute_keys_kernel<<<grid_for(S, kThreads), kThreads, 0, stream>>>(
        topk_ids.data(), topk_ids.stride(0), k, S, expert_map ? expert_map->data() : nullptr, num_experts,
        num_local_experts, keys, slots_in, counts);
    MOE_CUDA_CHECK_LAUNCH();
    std::size_t cub_bytes = l.cub_bytes;
    MOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(static_cast<void*>(base + l.cub), cub_bytes, keys, keys_sorted, slots_in,
                                                 slots_sorted, static_cast<int>(S), 0, l.bits, stream));
  }
  permute_offsets_kernel<<<1, 32, 0, stream>>>(counts, num_local_experts, l.num_keys, align_block_size, sorted_start,
                                               dest_start, seg_start, out.expert_first_token_offset.data(),
                                               out.expert_first_token_offset.stride(0));
  MOE_CUDA_CHECK_LAUNCH();
  if (R > 0) MOE_CUDA_TRY(cudaMemsetAsync(row_slot, 0xFF, count_of(R) * sizeof(std::int32_t), stream));  // -1
  if (S > 0) {
    permute_scatter_kernel<<<grid_for(S, kThreads), kThreads, 0, stream>>>(
        keys_sorted, slots_sorted, S, num_local_experts, align_block_size, sorted_start, dest_start, seg_start, R,
        out.inv_permuted_idx.data(), out.inv_permuted_idx.stride(0), row_slot);
    MOE_CUDA_CHECK_LAUNCH();
  }
  if (R > 0) {
    const bool with_scales = scales.has_value();
    permute_rows_kernel<T><<<grid_for(R, 1), kRowThreads, 0, stream>>>(
        hidden.data(), hidden.stride(0), H, with_scales ? scales->data() : nullptr, with_scales ? scales->stride(0) : 0,
        with_scales ? scales->extent(1) : 0, M, k, row_slot, seg_start, num_local_experts, R, fill_invalid_expert,
        out.permuted_hidden.data(), out.permuted_hidden.stride(0),
        with_scales ? out.permuted_scales->data() : nullptr, with_scales ? out.permuted_scales->stride(0) : 0,
        out.permuted_idx.data(), out.permuted_idx.stride(0), out.m_indices ? out.m_indices->data() : nullptr,
        out.m_indices ? out.m_indices->stride(0) : 0);
    MOE_CUDA_CHECK_LAUNCH();
  }
  return Status::ok();
}

// out[m] = sum_j topk_weights[m, j] * permuted[inv_permuted_idx[m*k + j]] in float, ascending j,
// rounded once (bitwise the CPU's). With expert_first_token_offset, slots whose row is >= its
// last entry are skipped; that entry is read on the device. Unchecked: rows outside [0, R) that
// are not skipped contribute zero (the CPU rejects them), and a last entry outside [0, R] is used
// as is. Checked: both are reported as the CPU op does. No workspace.
template <class T>
Status moe_unpermute(DeviceView<const T, 2> permuted, DeviceView<const float, 2> topk_weights,
                     DeviceView<const std::int32_t, 1> inv_permuted_idx,
                     OptDeviceView<const std::int64_t, 1> expert_first_token_offset, DeviceView<T, 2> out,
                     cudaStream_t stream = nullptr, bool checked = false) {
  using namespace ops_detail;
  const Index M = topk_weights.extent(0), k = topk_weights.extent(1), R = permuted.extent(0), H = permuted.extent(1);
  MOE_RETURN_IF_ERROR(expect_shape(permuted, "permuted_hidden_states", std::array<Dim, 2>{{{"R", R}, {"H", H}}}));
  MOE_RETURN_IF_ERROR(expect_shape(topk_weights, "topk_weights", std::array<Dim, 2>{{{"M", M}, {"top_k", k}}}));
  MOE_RETURN_IF_ERROR(expect_shape(inv_permuted_idx, "inv_permuted_idx", std::array<Dim, 1>{{{"M*top_k", M * k}}}));
  MOE_RETURN_IF_ERROR(expect_shape(out, "output", std::array<Dim, 2>{{{"M", M}, {"H", H}}}));
  const std::int64_t* valid_ptr = nullptr;
  if (expert_first_token_offset) {
    const Index n = expert_first_token_offset->extent(0);
    if (n < 1) return invalid_argument("expert_first_token_offset: expected E_local+1 >= 1 entries, got 0");
    MOE_RETURN_IF_ERROR(expect_shape(*expert_first_token_offset, "expert_first_token_offset", std::array<Dim, 1>{{{"E_local+1", n}}}));
    valid_ptr = expert_first_token_offset->data() + (n - 1) * expert_first_token_offset->stride(0);
  }
  if (checked) {
    Index valid = R;
    if (valid_ptr != nullptr) {
      std::int64_t last = 0;
      MOE_CUDA_TRY(cudaMemcpyAsync(&last, valid_ptr, sizeof(last), cudaMemcpyDeviceToHost, stream));
      MOE_CUDA_TRY(cudaStreamSynchronize(stream));
      valid = last;
      if (valid < 0 || valid > R) {
        return invalid_argument("expert_first_token_offset: last entry ", valid, " must be in [0, R=", R, "]");
      }
    }
    std::vector<std::int32_t> inv;
    MOE_RETURN_IF_ERROR(copy_to_host(inv_permuted_idx, &inv, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    for (Index s = 0; s < M * k; ++s) {
      const std::int32_t r = inv[static_cast<std::size_t>(s)];
      const bool skipped = valid_ptr != nullptr && r >= valid;
      if (!skipped && (r < 0 || r >= R)) {
        return invalid_argument("inv_permuted_idx: entry ", s, " is ", r, "; expected a row in [0, ", R, ")");
      }
    }
  }
  if (M == 0 || H == 0) return Status::ok();
  unpermute_kernel<T><<<grid_for(M, 1), kRowThreads, 0, stream>>>(
      permuted.data(), permuted.stride(0), R, H, topk_weights.data(), topk_weights.stride(0), M, k,
      inv_permuted_idx.data(), inv_permuted_idx.stride(0), valid_ptr, out.data(), out.stride(0));
  MOE_CUDA_CHECK_LAUNCH();
  return Status::ok();
}

}  // namespace moe::cuda
