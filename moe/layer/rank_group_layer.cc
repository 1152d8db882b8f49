#include "moe/layer/rank_group_layer.h"

#include <algorithm>
#include <cstring>
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

AnyTensor token_rows(const AnyTensor& t, Index m0, Index m1) {
  AnyTensor v = t;
  Index row = 1;
  for (std::size_t d = 1; d < t.extents.size(); ++d) row *= t.extents[d];
  v.data = static_cast<std::byte*>(t.data) + static_cast<std::size_t>(m0 * row) * io::dtype_size(t.dtype);
  v.extents[0] = m1 - m0;
  return v;
}

namespace {

// The checks both all-to-all entries make on the full inputs before sharing them out.
Status check_full_inputs(const MoeLayer& layer, const AnyTensor& hidden_states, const std::optional<AnyTensor>& router_logits) {
  const Index H = layer.config().hidden, E = layer.config().num_experts + layer.config().num_zero_experts;
  if (hidden_states.extents.size() != 2 || hidden_states.extents[1] != H || !hidden_states.strides.empty()) {
    return invalid_argument("hidden_states: expected a contiguous tensor of shape [M, H=", H, "], got ",
                            detail::format_shape(hidden_states.extents));
  }
  if (router_logits && (router_logits->extents.size() != 2 || router_logits->extents[1] != E ||
                        router_logits->extents[0] != hidden_states.extents[0] || !router_logits->strides.empty())) {
    return invalid_argument("router_logits: expected a contiguous tensor of shape [M=", hidden_states.extents[0], ", E=", E,
                            "], got ", detail::format_shape(router_logits->extents));
  }
  return Status::ok();
}

// The shares' results, in rank order, as one result for all M tokens.
MoeLayer::Result concatenate(const std::vector<MoeLayer::Result>& shares, DType dtype, Index M, Index H) {
  MoeLayer::Result all;
  all.output = Buffer{dtype, {M, H}, {}};
  for (const MoeLayer::Result& r : shares) {
    all.output.bytes.insert(all.output.bytes.end(), r.output.bytes.begin(), r.output.bytes.end());
    all.topk_ids.insert(all.topk_ids.end(), r.topk_ids.begin(), r.topk_ids.end());
    all.topk_weights.insert(all.topk_weights.end(), r.topk_weights.begin(), r.topk_weights.end());
  }
  return all;
}

}  // namespace

Status RankGroupLayer::forward_all_to_all(const AnyTensor& hidden_states, const std::optional<AnyTensor>& router_logits,
                                          MoeLayer::Result* out, const cpu::Options& options, MoeLayer::KernelFinder find) const {
  const MoeLayer& first = ranks_[0];
  MOE_RETURN_IF_ERROR(check_full_inputs(first, hidden_states, router_logits));
  const Index M = hidden_states.extents[0];
  const int P = size();
  std::vector<MoeLayer::Result> results(ranks_.size());
  cpu::Options per_rank = options;
  per_rank.num_threads = std::max(1, options.num_threads / P);
  MOE_RETURN_IF_ERROR(group_->run([&](parallel::Communicator& comm) -> Status {
    const int r = comm.rank();
    const Index m0 = token_share_begin(M, P, r), m1 = token_share_begin(M, P, r + 1);
    std::optional<AnyTensor> logits;
    if (router_logits) logits = token_rows(*router_logits, m0, m1);
    return ranks_[static_cast<std::size_t>(r)].forward_all_to_all(comm, std::max<Index>((M + P - 1) / P, 1),
                                                                  token_rows(hidden_states, m0, m1), logits,
                                                                  &results[static_cast<std::size_t>(r)], per_rank, find);
  }));
  *out = concatenate(results, first.dtype(), M, first.config().hidden);
  return Status::ok();
}

Status forward_share_all_to_all(parallel::Communicator& comm, const MoeLayer& layer, const AnyTensor& hidden_states,
                                const std::optional<AnyTensor>& router_logits, MoeLayer::Result* out, const cpu::Options& options,
                                MoeLayer::KernelFinder find) {
  MOE_RETURN_IF_ERROR(check_full_inputs(layer, hidden_states, router_logits));
  const Index M = hidden_states.extents[0], H = layer.config().hidden, k = layer.config().top_k;
  const int P = comm.size(), me = comm.rank();
  const Index max_share = (M + P - 1) / P;
  const Index m0 = token_share_begin(M, P, me), m1 = token_share_begin(M, P, me + 1);
  std::optional<AnyTensor> logits;
  if (router_logits) logits = token_rows(*router_logits, m0, m1);
  MoeLayer::Result mine;
  MOE_RETURN_IF_ERROR(layer.forward_all_to_all(comm, std::max<Index>(max_share, 1), token_rows(hidden_states, m0, m1), logits, &mine,
                                               options, find));
  // One block per rank, each share padded to max_share tokens: [output | topk_ids | topk_weights].
  const std::size_t out_bytes = static_cast<std::size_t>(max_share * H) * io::dtype_size(layer.dtype()),
                    ids_bytes = static_cast<std::size_t>(max_share * k) * sizeof(std::int32_t),
                    block = out_bytes + 2 * ids_bytes;
  std::vector<std::byte> send(block), all(block * static_cast<std::size_t>(P));
  const auto put = [](std::byte* dst, const void* src, std::size_t bytes) {  // empty shares have no buffers
    if (bytes > 0) std::memcpy(dst, src, bytes);
  };
  put(send.data(), mine.output.bytes.data(), mine.output.bytes.size());
  put(send.data() + out_bytes, mine.topk_ids.data(), mine.topk_ids.size() * sizeof(std::int32_t));
  put(send.data() + out_bytes + ids_bytes, mine.topk_weights.data(), mine.topk_weights.size() * sizeof(float));
  MOE_RETURN_IF_ERROR(comm.all_gather(send, all));
  std::vector<MoeLayer::Result> shares(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r) {
    const Index rows = token_share_begin(M, P, r + 1) - token_share_begin(M, P, r);
    const std::byte* b = all.data() + block * static_cast<std::size_t>(r);
    MoeLayer::Result& s = shares[static_cast<std::size_t>(r)];
    s.output.bytes.assign(b, b + static_cast<std::size_t>(rows * H) * io::dtype_size(layer.dtype()));
    s.topk_ids.resize(static_cast<std::size_t>(rows * k));
    s.topk_weights.resize(static_cast<std::size_t>(rows * k));
    if (rows > 0) {
      std::memcpy(s.topk_ids.data(), b + out_bytes, s.topk_ids.size() * sizeof(std::int32_t));
      std::memcpy(s.topk_weights.data(), b + out_bytes + ids_bytes, s.topk_weights.size() * sizeof(float));
    }
  }
  *out = concatenate(shares, layer.dtype(), M, H);
  return Status::ok();
}

}  // namespace moe::layer
