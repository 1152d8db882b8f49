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

Status RankGroupLayer::load(const ModelConfig& config, int ep_size, int tp_size, ExpertPlacement placement, DType dtype,
                            const io::Checkpoint& checkpoint, const std::string& prefix, RankGroupLayer* out) {
  if (ep_size < 1 || tp_size < 1 || ep_size > parallel::InProcessGroup::kMaxRanks / tp_size) {
    return invalid_argument("ep_size x tp_size: expected 1 to ", parallel::InProcessGroup::kMaxRanks, " ranks, got ", ep_size,
                            " x ", tp_size);
  }
  RankGroupLayer g;
  MOE_RETURN_IF_ERROR(parallel::InProcessGroup::create(ep_size * tp_size, &g.group_));
  g.ranks_.resize(static_cast<std::size_t>(ep_size * tp_size));
  for (int e = 0; e < ep_size; ++e) {
    for (int t = 0; t < tp_size; ++t) {
      ParallelLayout layout;
      layout.ep_size = ep_size;
      layout.ep_rank = e;
      layout.tp_size = tp_size;
      layout.tp_rank = t;
      layout.placement = placement;
      MOE_RETURN_IF_ERROR(MoeLayer::load(config, layout, dtype, checkpoint, prefix, &g.ranks_[e * tp_size + t]));
    }
  }
  *out = std::move(g);
  return Status::ok();
}

Status RankGroupLayer::forward(const AnyTensor& hidden_states, const std::optional<AnyTensor>& router_logits,
                               MoeLayer::Result* out, const cpu::Options& options, MoeLayer::KernelFinder find) const {
  if (ranks_.empty() || !group_) return invalid_argument("RankGroupLayer: not loaded");
  std::vector<MoeLayer::Result> results(ranks_.size());
  cpu::Options per_rank = options;
  per_rank.num_threads = std::max(1, options.num_threads / size());
  MOE_RETURN_IF_ERROR(group_->run([&](parallel::Communicator& comm) -> Status {
    MoeLayer::Result& r = results[static_cast<std::size_t>(comm.rank())];
    // A rank whose forward fails leaves the group: the others are released from the all-reduce
    // and the failing rank's error is the group's.
    const Status forward = ranks_[static_cast<std::size_t>(comm.rank())].forward(hidden_states, router_logits, &r, per_rank, find);
    if (!forward.is_ok()) return forward;
    switch (r.output.dtype) {
      case DType::kF32: return all_reduce_bytes<float>(comm, r.output.bytes);
      case DType::kBF16: return all_reduce_bytes<bfloat16>(comm, r.output.bytes);
      case DType::kF16: return all_reduce_bytes<half>(comm, r.output.bytes);
      default: return invalid_argument("output dtype ", to_string(r.output.dtype), ": expected f32, bf16 or f16");
    }
  }));
  *out = std::move(results[0]);
  return Status::ok();
}

}  // namespace moe::layer
