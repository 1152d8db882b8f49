// EPLB logical-to-physical expert ids on the GPU (moe/cuda/ops.cuh documents every op's contract).
#pragma once

#include "moe/cuda/ops/common.cuh"

namespace moe::cuda {
namespace ops_detail {

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
