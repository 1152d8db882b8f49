// The layer over ep_size x tp_size ranks in one process, giving one full output: every rank loads
// its shard (MoeLayer's parallel layout: its experts under EP, its slice of the intermediate
// dimension under TP) and computes its partial sum on its own thread; an all-reduce over the
// group (moe/parallel/communicator.h: float sums in rank order, one rounding) adds the partials.
// What no rank splits (the shared expert under EP, GEMM2's bias under TP) is in rank 0's partial
// only, so it is counted once. This is vLLM's allgather/reduce-scatter EP and TP's final
// all-reduce, with the ranks as threads: the single-process multi-rank mode of `moe run`, and
// the reference the multi-GPU runs are compared against.
//
// Rank r = ep_rank * tp_size + tp_rank. Every rank routes all tokens (routing is replicated), so
// topk_ids and topk_weights are rank 0's. Not reentrant: one forward at a time.
//
// With an all-to-all dispatch (ParallelLayout::dispatch, tp_size 1) the tokens are dealt to the
// EP ranks instead, in contiguous shares as data-parallel ranks would hold them (rank r the r-th
// of ep_size nearly equal shares), each rank runs MoeLayer::forward_all_to_all on its share, and
// the shares' outputs, ids and weights are put back in token order: the same bits as one rank.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "moe/layer/moe_layer.h"
#include "moe/parallel/in_process_group.h"

namespace moe::layer {

// The sum over the ranks of `comm` of every rank's partial `output` (f32, bf16 or f16), in place:
// float sums in rank order, rounded once (moe/parallel/communicator.h's all_reduce_sum).
Status all_reduce_output(parallel::Communicator& comm, Buffer* output);

// The first token of rank r's share when M tokens are dealt to `ranks` ranks in contiguous,
// nearly equal shares (the all-to-all dispatch's data-parallel split): rank r holds
// [token_share_begin(M, ranks, r), token_share_begin(M, ranks, r + 1)), at most ceil(M / ranks).
inline Index token_share_begin(Index M, int ranks, int r) { return M / ranks * r + M % ranks * r / ranks; }

// Rows [m0, m1) of a contiguous [M, ...] tensor, as a view.
AnyTensor token_rows(const AnyTensor& t, Index m0, Index m1);

// The forward of one rank's share under an all-to-all dispatch, gathered: every rank calls it
// with its MoeLayer and the same full `hidden_states` (and logits) over `comm`, the EP group; each
// computes its own share (MoeLayer::forward_all_to_all) and every rank receives the whole result
// in token order, the bits of RankGroupLayer::forward's all-to-all mode.
Status forward_share_all_to_all(parallel::Communicator& comm, const MoeLayer& layer, const AnyTensor& hidden_states,
                                const std::optional<AnyTensor>& router_logits, MoeLayer::Result* out,
                                const cpu::Options& options = {}, MoeLayer::KernelFinder find = &find_kernel);

class RankGroupLayer {
 public:
  // `layout`'s sizes, placement and EPLB fields for every rank (its ranks are ignored).
  static Status load(const ModelConfig& config, const ParallelLayout& layout, DType dtype, const io::Checkpoint& checkpoint,
                     const std::string& prefix, RankGroupLayer* out);

  // As MoeLayer::forward, for the whole group. Each rank's CPU forward gets an equal share of
  // options.num_threads.
  Status forward(const AnyTensor& hidden_states, const std::optional<AnyTensor>& router_logits, MoeLayer::Result* out,
                 const cpu::Options& options = {}, MoeLayer::KernelFinder find = &find_kernel) const;
  // EPLB: a new placement from the load the forwards recorded (rebalance_experts, vLLM's default
  // policy; num_groups expert groups over num_nodes nodes), the experts moved between the EP ranks
  // of each TP rank, and the load reset. Refused for a layer loaded without EPLB.
  Status rebalance(Index num_groups = 1, Index num_nodes = 1);

  int size() const { return static_cast<int>(ranks_.size()); }
  const MoeLayer& rank(int r) const { return ranks_[static_cast<std::size_t>(r)]; }
  // To make a rank's weights resident on the device (make_layer_resident): the ranks share one GPU.
  MoeLayer* mutable_rank(int r) { return &ranks_[static_cast<std::size_t>(r)]; }

 private:
  Status forward_all_to_all(const AnyTensor& hidden_states, const std::optional<AnyTensor>& router_logits,
                            MoeLayer::Result* out, const cpu::Options& options, MoeLayer::KernelFinder find) const;

  std::vector<MoeLayer> ranks_;
  int ep_size_ = 1, tp_size_ = 1;
  std::unique_ptr<parallel::InProcessGroup> group_;                   // every rank
  std::vector<std::unique_ptr<parallel::InProcessGroup>> ep_groups_;  // the EP ranks of each TP rank
};

}  // namespace moe::layer
