// Standalone MoE ops on the GPU: the CUDA counterparts of moe/cpu/ops.h (the spec), with the
// same semantics, the same outputs (bit for bit: index outputs exactly, and the float outputs of
// moe_permute, moe_unpermute and moe_fused_mul_sum bitwise; select_experts' weights differ from
// the CPU's only by the device expf) and the same validation messages. Include only from .cu
// files (CUB is included here and nowhere in the host-compilable headers).
//
// Every op
//   * validates shapes and scalar arguments on the host exactly as the CPU op does (same
//     moe::detail::expect_shape calls, same order, same messages) before it enqueues anything, so
//     a rejected call leaves every output untouched;
//   * takes its scratch from a caller-provided `workspace` where it needs any (size from the
//     matching *_workspace_bytes function; any alignment: the op aligns inside), and returns
//     kWorkspaceTooSmall when it is smaller;
//   * is stream-ordered on `stream`, with no host synchronization and no allocation (it can be
//     captured in a CUDA graph), unless `checked` is true;
//   * never forms an address from an expert id outside [0, E), or from one that maps to -1.
//
// Data-dependent validation. The CPU ops also check the *contents* of some device-resident
// inputs (expert_map entries, inv_permuted_idx rows, the last expert_first_token_offset, EPLB
// replica counts and physical ids). That needs the data on the host, i.e. a synchronization, so
// here it is opt-in: with `checked = true` the op copies those inputs to the host on `stream`,
// synchronizes it, and runs the CPU's checks (same messages, same order relative to the shape
// checks) before writing anything. With `checked = false` (the default) such inputs are not
// reported; the kernels stay memory-safe and their behaviour on them is documented per op.
#pragma once

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "moe/cuda/check.h"
#include "moe/cuda/radix_bits.h"
#include "moe/detail/workspace.h"
#include "moe/detail/op_checks.h"
#include "moe/detail/validate.h"
#include "moe/expert_map.h"
#include "moe/quant/numeric.h"
#include "moe/routing.h"
#include "moe/status.h"
#include "moe/op_sizes.h"
#include "moe/tensor.h"

namespace moe::cuda {

template <class T, int R>
using OptDeviceView = std::optional<DeviceView<T, R>>;

using ::moe::AlignSizes;
using ::moe::moe_align_block_size_sizes;
using ::moe::moe_permute_rows;
using ::moe::ReplicaChoice;

namespace ops_detail {

using ::moe::detail::Dim;
using ::moe::detail::expect_shape;
using ::moe::detail::format_shape;

constexpr int kThreads = 256;
constexpr int kRowThreads = 128;
constexpr Index kMaxGrid = Index{1} << 20;  // every kernel is grid-stride: any grid size is correct
constexpr std::size_t kAlign = 256;

inline unsigned grid_for(Index n, int per_block) {
  return static_cast<unsigned>(std::clamp<Index>((n + per_block - 1) / per_block, 1, kMaxGrid));
}

MOE_HOST_DEVICE Index round_up_hd(Index x, Index m) { return (x + m - 1) / m * m; }
MOE_DEVICE Index global_thread() { return static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; }
MOE_DEVICE Index grid_threads() { return static_cast<Index>(gridDim.x) * blockDim.x; }

// Workspace layout: 256-byte aligned regions from a base the op aligns itself (moe/detail/workspace.h).
using Carve = moe::detail::WorkspaceCarver<kAlign>;
inline std::byte* aligned_base(std::byte* p) { return Carve::aligned_base(p); }
template <class T>
T* at(std::byte* base, std::size_t off) {
  return reinterpret_cast<T*>(base + off);
}
inline std::size_t count_of(Index n) { return static_cast<std::size_t>(std::max<Index>(0, n)); }

inline Status check_workspace(std::span<std::byte> workspace, std::size_t need, const char* fn) {
  if (workspace.size() < need) {
    return make_status(StatusCode::kWorkspaceTooSmall, "workspace: expected at least ", need, " bytes (", fn,
                       "()), got ", workspace.size());
  }
  return Status::ok();
}

// Bits of a radix key whose values are in [0, num_keys).

// CUB temp storage for a stable sort of n (uint32 key, int32 value) pairs on `bits` key bits.
// A size query only: no device work.
inline Status sort_temp_bytes(Index n, int bits, std::size_t* bytes) {
  *bytes = 0;
  if (n <= 0) return Status::ok();
  MOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, *bytes, static_cast<const std::uint32_t*>(nullptr),
                                               static_cast<std::uint32_t*>(nullptr),
                                               static_cast<const std::int32_t*>(nullptr),
                                               static_cast<std::int32_t*>(nullptr), static_cast<int>(n), 0, bits));
  return Status::ok();
}

// Checked mode: device views to packed host vectors, on `stream` (the caller synchronizes).
template <class T>
Status copy_to_host(DeviceView<const T, 1> v, std::vector<std::remove_const_t<T>>* out, cudaStream_t stream) {
  out->resize(count_of(v.extent(0)));
  if (out->empty()) return Status::ok();
  if (out->size() == 1 || v.stride(0) == 1) {
    MOE_CUDA_TRY(cudaMemcpyAsync(out->data(), v.data(), out->size() * sizeof(T), cudaMemcpyDeviceToHost, stream));
  } else {
    MOE_CUDA_TRY(cudaMemcpy2DAsync(out->data(), sizeof(T), v.data(), v.stride(0) * sizeof(T), sizeof(T), out->size(),
                                   cudaMemcpyDeviceToHost, stream));
  }
  return Status::ok();
}
template <class T>
Status copy_to_host(DeviceView<const T, 2> v, std::vector<std::remove_const_t<T>>* out, cudaStream_t stream) {
  const Index rows = v.extent(0), cols = v.extent(1);
  out->resize(count_of(rows * cols));
  if (out->empty()) return Status::ok();
  if (rows == 1 || v.stride(0) == cols) {
    MOE_CUDA_TRY(cudaMemcpyAsync(out->data(), v.data(), out->size() * sizeof(T), cudaMemcpyDeviceToHost, stream));
  } else {
    MOE_CUDA_TRY(cudaMemcpy2DAsync(out->data(), cols * sizeof(T), v.data(), v.stride(0) * sizeof(T), cols * sizeof(T),
                                   rows, cudaMemcpyDeviceToHost, stream));
  }
  return Status::ok();
}

// Largest e in [0, n) with starts[e] <= r, for r in [starts[0], starts[n]) (starts ascending).
MOE_DEVICE Index segment_of(const Index* starts, Index n, Index r) {
  Index lo = 0, hi = n;
  while (hi - lo > 1) {
    const Index mid = lo + (hi - lo) / 2;
    if (starts[mid] <= r) lo = mid;
    else hi = mid;
  }
  return lo;
}

// out += w * x with one rounding per operation, never contracted to an FMA: the CPU op's
// `acc += w * x` compiled without FMA contraction, so both give the same bits.
MOE_DEVICE float mul_add_rn(float acc, float w, float x) { return __fadd_rn(acc, __fmul_rn(w, x)); }

// ---- select_experts --------------------------------------------------------------------------

// Grid-stride over tokens; thread t owns scratch slot t (kScratchPerExpert*E floats, E ints).
template <class Routing>
__global__ void select_experts_kernel(const float* logits, Index ld_logits, Index num_tokens, int num_experts,
                                      int top_k, const float* correction_bias, typename Routing::Arguments args,
                                      float* scratch, std::int32_t* index_scratch, std::int32_t* ids, Index ld_ids,
                                      float* weights, Index ld_weights) {
  const Index t = global_thread();
  float* my_scratch = scratch + t * routing::kScratchPerExpert * num_experts;
  std::int32_t* my_index_scratch = index_scratch + t * num_experts;
  for (Index m = t; m < num_tokens; m += grid_threads()) {
    routing::TokenContext ctx{logits + m * ld_logits, num_experts,      top_k,          correction_bias,
                              my_scratch,             my_index_scratch, ids + m * ld_ids, weights + m * ld_weights};
    Routing::route_token(ctx, args);
  }
}

// Threads (hence scratch slots) of select_experts: all tokens up to a 64 MiB scratch budget,
// at least 1024 and at most 65536, a multiple of the block size.
constexpr int kRouteThreads = 128;
inline Index select_experts_threads(Index num_tokens, Index num_experts) {
  if (num_tokens <= 0 || num_experts <= 0) return 0;
  const Index per_token = (routing::kScratchPerExpert * 4 + 4) * num_experts;
  const Index cap = std::clamp<Index>((Index{64} << 20) / per_token, 1024, 65536);
  return round_up(std::min(num_tokens, cap), kRouteThreads);
}

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

// ---- moe_unpermute / moe_fused_mul_sum -------------------------------------------------------

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

template <class T>
__global__ void fused_mul_sum_kernel(const T* inputs, Index ld_token, Index ld_slot, Index num_tokens, Index top_k,
                                     Index hidden_size, const float* weights, Index ld_weights, const std::int32_t* ids,
                                     Index ld_ids, const std::int32_t* expert_map, Index map_size, T* out,
                                     Index ld_out) {
  for (Index m = blockIdx.x; m < num_tokens; m += gridDim.x) {
    for (Index c = threadIdx.x; c < hidden_size; c += blockDim.x) {
      float acc = 0.0f;
      for (Index j = 0; j < top_k; ++j) {
        if (expert_map != nullptr && local_expert_id(ids[m * ld_ids + j], expert_map, map_size) < 0) continue;
        acc = mul_add_rn(acc, weights[m * ld_weights + j], to_float(inputs[m * ld_token + j * ld_slot + c]));
      }
      out[m * ld_out + c] = from_float<T>(acc);
    }
  }
}

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

// ---- eplb_logical_to_physical ------------------------------------------------------------------

static __global__ void eplb_kernel(const std::int32_t* logical_ids, Index ld_ids, Index num_tokens, Index top_k,
                            const std::int32_t* map, Index ld_map, Index num_logical, Index max_replicas,
                            const std::int32_t* replica_count, Index ld_count, Index num_physical, bool token_hash,
                            std::int32_t* physical_ids, Index ld_physical, std::int64_t* expert_load, Index ld_load,
                            Index num_unpadded_tokens) {
  for (Index s = global_thread(); s < num_tokens * top_k; s += grid_threads()) {
    const Index m = s / top_k, j = s % top_k;
    const std::int32_t id = logical_ids[m * ld_ids + j];
    std::int32_t phys = -1;
    if (id >= 0 && id < num_logical) {
      const std::int32_t c = replica_count[Index{id} * ld_count];
      if (c >= 1 && c <= max_replicas) {  // else rejected when checked; never addressed
        const std::uint32_t count = static_cast<std::uint32_t>(c);
        const std::uint32_t replica =
            token_hash ? static_cast<std::uint32_t>(static_cast<std::uint64_t>(m) * 2654435769ull) % count
                       : static_cast<std::uint32_t>(static_cast<std::uint64_t>(s) % count);
        const std::int32_t p = map[Index{id} * ld_map + replica];
        if (p >= 0 && p < num_physical) phys = p;
      }
    }
    physical_ids[m * ld_physical + j] = phys;
    const bool counted = num_unpadded_tokens < 0 || m < num_unpadded_tokens;
    if (expert_load != nullptr && phys >= 0 && counted) {
      // Two's-complement int64 increment: integer atomics, so the counts are deterministic.
      atomicAdd(reinterpret_cast<unsigned long long*>(expert_load + Index{phys} * ld_load), 1ull);
    }
  }
}

}  // namespace ops_detail

// ---------------------------------------------------------------------------------------------
// select_experts: router logits [M, E] -> topk_ids [M, k], topk_weights [M, k], through the
// policy's route_token (the generic path: any policy whose route_token is __host__ __device__).
// Workspace: per-thread routing scratch (a grid-stride loop bounds it at ~64 MiB for large E).
// No data-dependent checks: every token gets k ids in [0, E) by the routing conventions.

inline std::size_t select_experts_workspace_bytes(Index num_tokens, Index num_experts) {
  const Index threads = ops_detail::select_experts_threads(num_tokens, num_experts);
  ops_detail::Carve c;
  c.take(ops_detail::count_of(threads * routing::kScratchPerExpert * num_experts) * sizeof(float));
  c.take(ops_detail::count_of(threads * num_experts) * sizeof(std::int32_t));
  return threads == 0 ? 0 : c.total();
}

template <class Routing>
Status select_experts(DeviceView<const float, 2> router_logits, int top_k, const typename Routing::Arguments& args,
                      OptDeviceView<const float, 1> correction_bias, DeviceView<std::int32_t, 2> topk_ids,
                      DeviceView<float, 2> topk_weights, std::span<std::byte> workspace, cudaStream_t stream = nullptr) {
  using namespace ops_detail;
  static_assert(Routing::kUsesLogits, "moe::cuda::select_experts: the routing policy must route from logits");
  MOE_RETURN_IF_ERROR(moe::detail::check_select_experts<Routing>(router_logits, top_k, args, correction_bias, topk_ids, topk_weights));
  const Index M = router_logits.extent(0), E = router_logits.extent(1);
  const std::size_t need = select_experts_workspace_bytes(M, E);
  MOE_RETURN_IF_ERROR(check_workspace(workspace, need, "select_experts_workspace_bytes"));
  if (M == 0) return Status::ok();

  const Index threads = select_experts_threads(M, E);
  Carve c;
  const std::size_t scratch_off = c.take(count_of(threads * routing::kScratchPerExpert * E) * sizeof(float));
  const std::size_t iscratch_off = c.take(count_of(threads * E) * sizeof(std::int32_t));
  std::byte* base = aligned_base(workspace.data());
  select_experts_kernel<Routing><<<static_cast<unsigned>(threads / kRouteThreads), kRouteThreads, 0, stream>>>(
      router_logits.data(), router_logits.stride(0), M, static_cast<int>(E), top_k,
      correction_bias ? correction_bias->data() : nullptr, args, at<float>(base, scratch_off),
      at<std::int32_t>(base, iscratch_off), topk_ids.data(), topk_ids.stride(0), topk_weights.data(),
      topk_weights.stride(0));
  MOE_CUDA_CHECK_LAUNCH();
  return Status::ok();
}

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

// ---------------------------------------------------------------------------------------------
// moe_fused_mul_sum: out[m] = sum_j topk_weights[m, j] * inputs[m, j] in float, ascending j,
// rounded once (bitwise the CPU's). With an expert_map, slots whose id is outside [0, E) or maps
// to a negative entry are skipped (the CPU op does not validate the map's contents either, so
// there is nothing to check). No workspace.
template <class T>
Status moe_fused_mul_sum(DeviceView<const T, 3> inputs, DeviceView<const float, 2> topk_weights, DeviceView<T, 2> out,
                         OptDeviceView<const std::int32_t, 2> topk_ids, OptDeviceView<const std::int32_t, 1> expert_map,
                         cudaStream_t stream = nullptr) {
  using namespace ops_detail;
  MOE_RETURN_IF_ERROR(moe::detail::check_fused_mul_sum_shapes(inputs, topk_weights, out, topk_ids, expert_map));
  const Index M = inputs.extent(0), k = inputs.extent(1), H = inputs.extent(2);
  if (M == 0 || H == 0) return Status::ok();
  const bool mapped = expert_map.has_value();
  fused_mul_sum_kernel<T><<<grid_for(M, 1), kRowThreads, 0, stream>>>(
      inputs.data(), inputs.stride(0), inputs.stride(1), M, k, H, topk_weights.data(), topk_weights.stride(0),
      mapped ? topk_ids->data() : nullptr, mapped ? topk_ids->stride(0) : 0, mapped ? expert_map->data() : nullptr,
      mapped ? expert_map->extent(0) : 0, out.data(), out.stride(0));
  MOE_CUDA_CHECK_LAUNCH();
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------
// EPLB: logical expert ids -> physical expert ids (moe::cpu::eplb_logical_to_physical). The
// load counts are added to expert_load (not overwritten) with int64 atomics: deterministic.
// Unchecked: a logical expert whose replica count is outside [1, max_replicas], or whose chosen
// physical id is outside [0, P), gives physical id -1 and is not counted (the CPU rejects both).
// Checked: the CPU's checks on host copies. No workspace.
inline Status eplb_logical_to_physical(DeviceView<const std::int32_t, 2> logical_ids,
                                       DeviceView<const std::int32_t, 2> logical_to_physical_map,
                                       DeviceView<const std::int32_t, 1> logical_replica_count,
                                       Index num_physical_experts, ReplicaChoice choice,
                                       DeviceView<std::int32_t, 2> physical_ids,
                                       OptDeviceView<std::int64_t, 1> expert_load, Index num_unpadded_tokens = -1,
                                       cudaStream_t stream = nullptr, bool checked = false) {
  using namespace ops_detail;
  const Index M = logical_ids.extent(0), k = logical_ids.extent(1);
  const Index L = logical_to_physical_map.extent(0), slots_per_expert = logical_to_physical_map.extent(1);
  MOE_RETURN_IF_ERROR(moe::detail::check_eplb_shapes(logical_ids, logical_to_physical_map, logical_replica_count,
                                                     num_physical_experts, physical_ids, expert_load));
  if (checked) {
    std::vector<std::int32_t> count, map;
    MOE_RETURN_IF_ERROR(copy_to_host(logical_replica_count, &count, stream));
    MOE_RETURN_IF_ERROR(copy_to_host(logical_to_physical_map, &map, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    MOE_RETURN_IF_ERROR(moe::detail::check_eplb_maps(HostView<const std::int32_t, 2>(map.data(), {L, slots_per_expert}),
                                                     HostView<const std::int32_t, 1>(count.data(), {L}),
                                                     num_physical_experts));
  }
  if (M * k == 0) return Status::ok();
  eplb_kernel<<<grid_for(M * k, kThreads), kThreads, 0, stream>>>(
      logical_ids.data(), logical_ids.stride(0), M, k, logical_to_physical_map.data(),
      logical_to_physical_map.stride(0), L, slots_per_expert, logical_replica_count.data(),
      logical_replica_count.stride(0), num_physical_experts, choice == ReplicaChoice::kTokenHash, physical_ids.data(),
      physical_ids.stride(0), expert_load ? expert_load->data() : nullptr, expert_load ? expert_load->stride(0) : 0,
      num_unpadded_tokens);
  MOE_CUDA_CHECK_LAUNCH();
  return Status::ok();
}

}  // namespace moe::cuda
