// EPLB (expert-parallel load balancing): where the physical experts go, and moving them there.
//
//   rebalance_experts   vLLM's default policy (DeepSeek's EPLB, vllm/distributed/eplb/
//                       rebalance_algo.py): from the recorded load of each logical expert, choose
//                       how many replicas each gets and which rank holds each physical expert.
//                       Hierarchical when the expert groups divide evenly over the nodes (groups
//                       packed onto nodes, replicas made within a node, physical experts packed
//                       onto the node's ranks), else global (one node, one group).
//   plan_expert_moves / move_expert_weights
//                       the transfer from an old placement to a new one over a Communicator: every
//                       new slot is filled from a copy already on its rank when there is one, else
//                       from the lowest rank holding the expert, so each expert crosses the wire
//                       at most once per receiving slot.
//
// The maps are what the routing's eplb_logical_to_physical (moe/cpu/ops.h, moe/cuda/ops.cuh)
// reads: physical expert p lives on rank p / experts_per_rank in local slot p % experts_per_rank.
//
// Ties: vLLM sorts with numpy's unstable argsort and takes torch's max index; here every
// choice between equal loads goes to the lower index (expert, pack), so the placement is a
// function of the load alone. Loads are added in double (vLLM: float32), so two placements can
// differ where float32 rounding would break a near-tie differently.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moe/parallel/communicator.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::parallel {

struct EplbPlacement {
  Index num_logical = 0, num_physical = 0;
  Index max_replicas = 0;                        // num_physical - num_logical + 1
  std::vector<std::int32_t> physical_to_logical;  // [num_physical]
  std::vector<std::int32_t> logical_to_physical;  // [num_logical, max_replicas], -1 past a count
  std::vector<std::int32_t> replica_count;        // [num_logical], >= 1
  // vLLM's initial placement before any load is recorded: [0 .. L-1] then i % L for the redundant.
  static Status initial(Index num_logical, Index num_physical, EplbPlacement* out);
  // The maps of a given physical_to_logical: entries in [0, num_logical), every logical expert at
  // least once; replicas ranked in physical order.
  static Status from_physical_to_logical(Index num_logical, std::span<const std::int32_t> physical_to_logical,
                                         EplbPlacement* out);
};

// `load` [L]: tokens routed to each logical expert (any non-negative finite measure). The physical
// experts (a multiple of num_ranks) are split evenly over num_ranks ranks of num_nodes nodes.
Status rebalance_experts(std::span<const double> load, Index num_physical, Index num_groups, Index num_nodes, Index num_ranks,
                         EplbPlacement* out);

// Where each new local slot of each rank gets its expert: source rank and slot in the old placement.
struct ExpertMoves {
  Index ranks = 0, experts_per_rank = 0;
  std::vector<std::int32_t> source_rank;  // [ranks * experts_per_rank] by new physical id
  std::vector<std::int32_t> source_slot;  // [ranks * experts_per_rank]
  Index transfers() const;                // slots filled from another rank
};
Status plan_expert_moves(std::span<const std::int32_t> old_physical_to_logical,
                         std::span<const std::int32_t> new_physical_to_logical, Index ranks, ExpertMoves* out);

// Moves one weight tensor of this rank ([experts_per_rank, bytes_per_expert] bytes: w13, w2, a
// scale tensor...) from the old placement to the new, collective over `comm` (comm.size() ranks as
// in `moves`). `next` must not overlap `current`; it is written only when every rank succeeds.
Status move_expert_weights(Communicator& comm, const ExpertMoves& moves, std::size_t bytes_per_expert,
                           std::span<const std::byte> current, std::span<std::byte> next);

}  // namespace moe::parallel
