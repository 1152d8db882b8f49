#include "moe/layer/rank_group_layer.h"

#include <algorithm>
#include <span>

#include "moe/parallel/communicator.h"

namespace moe::layer {
namespace {

template <class T>
Status all_reduce_bytes(parallel::Communicator& comm, std::vector<std::byte>& bytes) {
  return parallel::all_reduce_sum<T>(comm, std::span<T>(reinterpret_cast<T*>(bytes.data()), bytes.size() / sizeof(T)));
}

}  // namespace

Status all_reduce_output(parallel::Communicator& comm, Buffer* output) {
  switch (output->dtype) {
    case DType::kF32: return all_reduce_bytes<float>(comm, output->bytes);
    case DType::kBF16: return all_reduce_bytes<bfloat16>(comm, output->bytes);
    case DType::kF16: return all_reduce_bytes<half>(comm, output->bytes);
    default: return invalid_argument("output dtype ", to_string(output->dtype), ": expected f32, bf16 or f16");
  }
}

Status RankGroupLayer::load(const ModelConfig& config, const ParallelLayout& layout, DType dtype, const io::Checkpoint& checkpoint,
                            const std::string& prefix, RankGroupLayer* out) {
  const int ep_size = layout.ep_size, tp_size = layout.tp_size;
  if (ep_size < 1 || tp_size < 1 || ep_size > parallel::InProcessGroup::kMaxRanks / tp_size) {
    return invalid_argument("ep_size x tp_size: expected 1 to ", parallel::InProcessGroup::kMaxRanks, " ranks, got ", ep_size,
                            " x ", tp_size);
  }
  RankGroupLayer g;
  g.ep_size_ = ep_size;
  g.tp_size_ = tp_size;
  MOE_RETURN_IF_ERROR(parallel::InProcessGroup::create(ep_size * tp_size, &g.group_));
  g.ep_groups_.resize(static_cast<std::size_t>(tp_size));
  for (auto& ep_group : g.ep_groups_) MOE_RETURN_IF_ERROR(parallel::InProcessGroup::create(ep_size, &ep_group));
  g.ranks_.resize(static_cast<std::size_t>(ep_size * tp_size));
  for (int e = 0; e < ep_size; ++e) {
    for (int t = 0; t < tp_size; ++t) {
      ParallelLayout rank_layout = layout;
      rank_layout.ep_rank = e;
      rank_layout.tp_rank = t;
      MOE_RETURN_IF_ERROR(MoeLayer::load(config, rank_layout, dtype, checkpoint, prefix, &g.ranks_[e * tp_size + t]));
    }
  }
  *out = std::move(g);
  return Status::ok();
}

Status RankGroupLayer::rebalance(Index num_groups, Index num_nodes) {
  if (ranks_.empty() || !ranks_[0].has_eplb()) {
    return invalid_argument("rebalance: the layer was loaded without EPLB (ParallelLayout::redundant_experts)");
  }
  // Per logical expert. Partial sums: every rank routes every token, so rank 0's count is the
  // group's; all-to-all: each rank counted its own tokens.
  const parallel::EplbPlacement& now = *ranks_[0].eplb_placement();
  const bool all_to_all = ranks_[0].parallel().dispatch != EpDispatch::kPartialSums;
  std::vector<double> load(static_cast<std::size_t>(now.num_logical), 0.0);
  for (std::size_t r = 0; r < (all_to_all ? ranks_.size() : 1); ++r) {
    const std::vector<std::int64_t> physical_load = ranks_[r].expert_load();
    for (Index p = 0; p < now.num_physical; ++p) load[now.physical_to_logical[p]] += static_cast<double>(physical_load[p]);
  }
  parallel::EplbPlacement next;
  MOE_RETURN_IF_ERROR(parallel::rebalance_experts(load, now.num_physical, num_groups, num_nodes, ep_size_, &next));
  parallel::ExpertMoves moves;
  MOE_RETURN_IF_ERROR(parallel::plan_expert_moves(now.physical_to_logical, next.physical_to_logical, ep_size_, &moves));
  for (int t = 0; t < tp_size_; ++t) {
    MOE_RETURN_IF_ERROR(ep_groups_[static_cast<std::size_t>(t)]->run([&](parallel::Communicator& comm) {
      return ranks_[static_cast<std::size_t>(comm.rank() * tp_size_ + t)].move_experts(comm, moves, next);
    }));
  }
  return Status::ok();
}

Status RankGroupLayer::forward(const AnyTensor& hidden_states, const std::optional<AnyTensor>& router_logits,
                               MoeLayer::Result* out, const cpu::Options& options, MoeLayer::KernelFinder find) const {
  if (ranks_.empty() || !group_) return invalid_argument("RankGroupLayer: not loaded");
  if (ranks_[0].parallel().dispatch != EpDispatch::kPartialSums) {
    return forward_all_to_all(hidden_states, router_logits, out, options, find);
  }
  std::vector<MoeLayer::Result> results(ranks_.size());
  cpu::Options per_rank = options;
  per_rank.num_threads = std::max(1, options.num_threads / size());
  MOE_RETURN_IF_ERROR(group_->run([&](parallel::Communicator& comm) -> Status {
    MoeLayer::Result& r = results[static_cast<std::size_t>(comm.rank())];
    // A rank whose forward fails leaves the group: the others are released from the all-reduce
    // and the failing rank's error is the group's.
    const Status forward = ranks_[static_cast<std::size_t>(comm.rank())].forward(hidden_states, router_logits, &r, per_rank, find);
    if (!forward.is_ok()) return forward;
    return all_reduce_output(comm, &r.output);
  }));
  *out = std::move(results[0]);
  return Status::ok();
}

Status RankGroupLayer::forward_all_to_all(const AnyTensor& hidden_states, const std::optional<AnyTensor>& router_logits,
                                          MoeLayer::Result* out, const cpu::Options& options, MoeLayer::KernelFinder find) const {
  const MoeLayer& first = ranks_[0];
  const Index H = first.config().hidden, E = first.config().num_experts + first.config().num_zero_experts;
  const int k = first.config().top_k;
  if (hidden_states.extents.size() != 2 || hidden_states.extents[1] != H || !hidden_states.strides.empty()) {
    return invalid_argument("hidden_states: expected a contiguous tensor of shape [M, H=", H, "], got ",
                            detail::format_shape(hidden_states.extents));
  }
  if (router_logits && (router_logits->extents.size() != 2 || router_logits->extents[1] != E ||
                        router_logits->extents[0] != hidden_states.extents[0] || !router_logits->strides.empty())) {
    return invalid_argument("router_logits: expected a contiguous tensor of shape [M=", hidden_states.extents[0], ", E=", E,
                            "], got ", detail::format_shape(router_logits->extents));
  }
  const Index M = hidden_states.extents[0];
  const int P = size();
  // Rank r's share: tokens [M * r / P, M * (r + 1) / P).
  const auto share_begin = [&](int r) { return M / P * r + M % P * r / P; };
  const Index max_share = (M + P - 1) / P;
  const auto rows_of = [](const AnyTensor& t, Index m0, Index m1) {
    AnyTensor v = t;
    v.data = static_cast<std::byte*>(t.data) + static_cast<std::size_t>(m0 * t.extents[1]) * io::dtype_size(t.dtype);
    v.extents[0] = m1 - m0;
    return v;
  };
  std::vector<MoeLayer::Result> results(ranks_.size());
  cpu::Options per_rank = options;
  per_rank.num_threads = std::max(1, options.num_threads / P);
  MOE_RETURN_IF_ERROR(group_->run([&](parallel::Communicator& comm) -> Status {
    const int r = comm.rank();
    const Index m0 = share_begin(r), m1 = share_begin(r + 1);
    std::optional<AnyTensor> logits;
    if (router_logits) logits = rows_of(*router_logits, m0, m1);
    return ranks_[static_cast<std::size_t>(r)].forward_all_to_all(comm, std::max<Index>(max_share, 1), rows_of(hidden_states, m0, m1),
                                                                  logits, &results[static_cast<std::size_t>(r)], per_rank, find);
  }));
  MoeLayer::Result all;
  all.output = Buffer{first.dtype(), {M, H}, {}};
  for (const MoeLayer::Result& r : results) {
    all.output.bytes.insert(all.output.bytes.end(), r.output.bytes.begin(), r.output.bytes.end());
    all.topk_ids.insert(all.topk_ids.end(), r.topk_ids.begin(), r.topk_ids.end());
    all.topk_weights.insert(all.topk_weights.end(), r.topk_weights.begin(), r.topk_weights.end());
  }
  if (all.topk_ids.size() != static_cast<std::size_t>(M * k)) {
    return make_status(StatusCode::kInternal, "RankGroupLayer: the ranks returned ", all.topk_ids.size(), " ids for ", M, " tokens");
  }
  *out = std::move(all);
  return Status::ok();
}

}  // namespace moe::layer
