// Expert parallelism: which global experts live on this rank (vLLM's determine_expert_map).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "moe/config.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe {

enum class ExpertPlacement {
  kLinear,      // rank r owns a contiguous range; the first E % P ranks own one extra expert
  kRoundRobin,  // rank r owns r, r + P, r + 2P, ...
};

struct ExpertMap {
  Index num_local_experts = 0;
  // [E_global]: local index of each global expert, -1 for experts on other ranks. Empty when
  // ep_size == 1 (every expert is local), as vLLM returns None.
  std::vector<std::int32_t> map;
};

// vLLM's determine_expert_map: base = E / P, the first E % P ranks get base + 1 experts.
inline Status determine_expert_map(int ep_size, int ep_rank, Index num_experts, ExpertPlacement placement,
                                   ExpertMap* out) {
  if (ep_size < 1) return invalid_argument("ep_size: expected >= 1, got ", ep_size);
  if (ep_rank < 0 || ep_rank >= ep_size) {
    return invalid_argument("ep_rank: expected 0 <= ep_rank < ep_size=", ep_size, ", got ", ep_rank);
  }
  if (num_experts < ep_size) {
    return invalid_argument("num_experts: expected >= ep_size=", ep_size, " so every rank owns an expert, got ",
                            num_experts);
  }
  ExpertMap result;
  if (ep_size == 1) {
    result.num_local_experts = num_experts;
    *out = std::move(result);
    return Status::ok();
  }
  const Index base = num_experts / ep_size;
  const Index rem = num_experts % ep_size;
  result.num_local_experts = base + (ep_rank < rem ? 1 : 0);
  result.map.assign(static_cast<std::size_t>(num_experts), -1);
  if (placement == ExpertPlacement::kLinear) {
    const Index start = ep_rank * base + (ep_rank < rem ? ep_rank : rem);
    for (Index i = 0; i < result.num_local_experts; ++i) result.map[start + i] = static_cast<std::int32_t>(i);
  } else {
    Index local = 0;
    for (Index g = ep_rank; g < num_experts; g += ep_size) result.map[g] = static_cast<std::int32_t>(local++);
  }
  *out = std::move(result);
  return Status::ok();
}

// The local id of global expert `id`, or -1 when it is out of range or not on this rank.
// Bounds are checked against the table actually indexed (E_global), never the local count.
MOE_HOST_DEVICE std::int32_t local_expert_id(std::int64_t id, const std::int32_t* expert_map, std::int64_t num_experts) {
  if (id < 0 || id >= num_experts) return -1;
  return expert_map ? expert_map[id] : static_cast<std::int32_t>(id);
}

// Checks a host-resident expert map: entries in [-1, E_local), each local id used at most once.
inline Status validate_expert_map(HostView<const std::int32_t, 1> map, Index num_local_experts) {
  std::vector<Index> owner(static_cast<std::size_t>(num_local_experts), -1);
  for (Index g = 0; g < map.extent(0); ++g) {
    const std::int32_t l = map(g);
    if (l < -1 || l >= num_local_experts) {
      return invalid_argument("expert_map: entry ", g, " is ", l, "; expected -1 or a local expert id in [0, ",
                              num_local_experts, ")");
    }
    if (l >= 0) {
      if (owner[l] >= 0) {
        return invalid_argument("expert_map: local expert ", l, " is assigned to global experts ", owner[l], " and ", g,
                                "; expected each local id at most once");
      }
      owner[l] = g;
    }
  }
  return Status::ok();
}

}  // namespace moe
