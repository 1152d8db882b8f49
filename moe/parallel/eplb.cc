#include "moe/parallel/eplb.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

namespace moe::parallel {
namespace {

// Packs items into `packs` bins of exactly items/packs each, heaviest item first into the lightest
// bin that has room (lower index on ties). pack[i], rank_in_pack[i] per item.
void balanced_packing(std::span<const double> weight, Index packs, std::vector<Index>* pack, std::vector<Index>* rank) {
  const auto n = static_cast<Index>(weight.size());
  const Index per_pack = n / packs;
  pack->assign(static_cast<std::size_t>(n), -1);
  rank->assign(static_cast<std::size_t>(n), 0);
  if (per_pack == 1) {
    std::iota(pack->begin(), pack->end(), Index{0});
    return;
  }
  std::vector<Index> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), Index{0});
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return weight[a] > weight[b]; });
  std::vector<double> load(static_cast<std::size_t>(packs), 0.0);
  std::vector<Index> items(static_cast<std::size_t>(packs), 0);
  for (Index item : order) {
    Index best = -1;
    for (Index p = 0; p < packs; ++p) {
      if (items[p] < per_pack && (best < 0 || load[p] < load[best])) best = p;
    }
    (*pack)[item] = best;
    (*rank)[item] = items[best]++;
    load[best] += weight[item];
  }
}

// Replicates `weight.size()` experts into `num_physical` (>= that) so the largest per-replica load
// is smallest: each extra replica goes to the expert of the largest load / count (lower id on ties).
void replicate_experts(std::span<const double> weight, Index num_physical, std::vector<Index>* phy2log,
                       std::vector<Index>* phyrank, std::vector<Index>* logcnt) {
  const auto L = static_cast<Index>(weight.size());
  phy2log->resize(static_cast<std::size_t>(num_physical));
  phyrank->assign(static_cast<std::size_t>(num_physical), 0);
  logcnt->assign(static_cast<std::size_t>(L), 1);
  std::iota(phy2log->begin(), phy2log->begin() + L, Index{0});
  for (Index p = L; p < num_physical; ++p) {
    Index best = 0;
    for (Index e = 1; e < L; ++e) {
      if (weight[e] / static_cast<double>((*logcnt)[e]) > weight[best] / static_cast<double>((*logcnt)[best])) best = e;
    }
    (*phy2log)[p] = best;
    (*phyrank)[p] = (*logcnt)[best]++;
  }
}

std::vector<Index> inverse(const std::vector<Index>& perm) {
  std::vector<Index> inv(perm.size());
  for (std::size_t i = 0; i < perm.size(); ++i) inv[static_cast<std::size_t>(perm[i])] = static_cast<Index>(i);
  return inv;
}

// The maps of a placement from physical_to_logical and each physical expert's replica rank.
void fill_maps(Index L, const std::vector<Index>& phy2log, const std::vector<Index>& phyrank, EplbPlacement* out) {
  const auto P = static_cast<Index>(phy2log.size());
  out->num_logical = L;
  out->num_physical = P;
  out->max_replicas = P - L + 1;
  out->physical_to_logical.assign(phy2log.begin(), phy2log.end());
  out->logical_to_physical.assign(static_cast<std::size_t>(L * out->max_replicas), -1);
  out->replica_count.assign(static_cast<std::size_t>(L), 0);
  for (Index p = 0; p < P; ++p) {
    out->logical_to_physical[static_cast<std::size_t>(phy2log[p] * out->max_replicas + phyrank[p])] = static_cast<std::int32_t>(p);
    ++out->replica_count[static_cast<std::size_t>(phy2log[p])];
  }
}

constexpr Index kMaxExperts = INT32_MAX / 2;

}  // namespace

Status EplbPlacement::from_physical_to_logical(Index num_logical, std::span<const std::int32_t> p2l, EplbPlacement* out) {
  const auto P = static_cast<Index>(p2l.size());
  if (num_logical < 1 || num_logical > kMaxExperts) return invalid_argument("num_logical: expected [1, ", kMaxExperts, "], got ", num_logical);
  if (P < num_logical || P > kMaxExperts) {
    return invalid_argument("physical_to_logical: expected [num_logical=", num_logical, ", ", kMaxExperts, "] entries, got ", P);
  }
  std::vector<Index> phy2log(static_cast<std::size_t>(P)), phyrank(static_cast<std::size_t>(P), 0);
  std::vector<Index> count(static_cast<std::size_t>(num_logical), 0);
  for (Index p = 0; p < P; ++p) {
    if (p2l[p] < 0 || p2l[p] >= num_logical) {
      return invalid_argument("physical_to_logical: entry ", p, " is ", p2l[p], "; expected a logical expert in [0, ", num_logical, ")");
    }
    phy2log[p] = p2l[p];
    phyrank[p] = count[static_cast<std::size_t>(p2l[p])]++;
  }
  for (Index e = 0; e < num_logical; ++e) {
    if (count[e] == 0) return invalid_argument("physical_to_logical: logical expert ", e, " has no physical expert");
  }
  EplbPlacement result;
  fill_maps(num_logical, phy2log, phyrank, &result);
  *out = std::move(result);
  return Status::ok();
}

Status EplbPlacement::initial(Index num_logical, Index num_physical, EplbPlacement* out) {
  if (num_physical < num_logical || num_physical > kMaxExperts) {
    return invalid_argument("num_physical: expected [num_logical=", num_logical, ", ", kMaxExperts, "], got ", num_physical);
  }
  std::vector<std::int32_t> p2l(static_cast<std::size_t>(std::max<Index>(num_physical, 0)));
  for (Index p = 0; p < num_physical; ++p) p2l[p] = static_cast<std::int32_t>(num_logical > 0 ? p % num_logical : 0);
  return from_physical_to_logical(num_logical, p2l, out);
}

Status rebalance_experts(std::span<const double> load, Index num_physical, Index num_groups, Index num_nodes, Index num_ranks,
                         EplbPlacement* out) {
  const auto L = static_cast<Index>(load.size());
  if (L < 1 || L > kMaxExperts) return invalid_argument("load: expected 1 to ", kMaxExperts, " logical experts, got ", L);
  for (Index e = 0; e < L; ++e) {
    if (!std::isfinite(load[e]) || load[e] < 0) return invalid_argument("load: entry ", e, " is ", load[e], "; expected a finite value >= 0");
  }
  if (num_ranks < 1 || num_ranks > kMaxExperts) return invalid_argument("num_ranks: expected >= 1, got ", num_ranks);
  if (num_nodes < 1 || num_ranks % num_nodes != 0) {
    return invalid_argument("num_nodes: expected a divisor of num_ranks=", num_ranks, ", got ", num_nodes);
  }
  if (num_physical < L || num_physical > kMaxExperts || num_physical % num_ranks != 0) {
    return invalid_argument("num_physical: expected a multiple of num_ranks=", num_ranks, " that is >= the ", L,
                            " logical experts, got ", num_physical);
  }
  if (num_groups < 1 || L % num_groups != 0) {
    return invalid_argument("num_groups: expected a divisor of the ", L, " logical experts, got ", num_groups);
  }
  if (num_groups % num_nodes != 0) num_groups = num_nodes = 1;  // vLLM's global policy
  const Index group_size = L / num_groups, groups_per_node = num_groups / num_nodes;
  const Index log_per_node = L / num_nodes, phy_per_node = num_physical / num_nodes;
  const Index ranks_per_node = num_ranks / num_nodes, phy_per_rank = num_physical / num_ranks;
  if (phy_per_node < log_per_node) {
    return invalid_argument("num_physical: ", num_physical, " over ", num_nodes, " nodes leaves fewer slots than the ",
                            log_per_node, " logical experts of a node");
  }

  // 1. Groups to nodes. mlog ("node-major logical") numbers experts node by node.
  std::vector<double> group_load(static_cast<std::size_t>(num_groups), 0.0);
  for (Index e = 0; e < L; ++e) group_load[static_cast<std::size_t>(e / group_size)] += load[e];
  std::vector<Index> group_pack, group_rank;
  balanced_packing(group_load, num_nodes, &group_pack, &group_rank);
  std::vector<Index> log2mlog(static_cast<std::size_t>(L));
  for (Index e = 0; e < L; ++e) {
    const Index g = e / group_size;
    log2mlog[e] = (group_pack[g] * groups_per_node + group_rank[g]) * group_size + e % group_size;
  }
  const std::vector<Index> mlog2log = inverse(log2mlog);

  // 2-3. Per node: replicas, then physical experts packed onto the node's ranks.
  std::vector<Index> phy2log(static_cast<std::size_t>(num_physical)), phyrank(static_cast<std::size_t>(num_physical));
  for (Index node = 0; node < num_nodes; ++node) {
    std::vector<double> node_load(static_cast<std::size_t>(log_per_node));
    for (Index i = 0; i < log_per_node; ++i) node_load[i] = load[mlog2log[node * log_per_node + i]];
    std::vector<Index> phy2mlog, rank_of_replica, mlogcnt;
    replicate_experts(node_load, phy_per_node, &phy2mlog, &rank_of_replica, &mlogcnt);
    std::vector<double> replica_load(static_cast<std::size_t>(phy_per_node));
    for (Index p = 0; p < phy_per_node; ++p) replica_load[p] = node_load[phy2mlog[p]] / static_cast<double>(mlogcnt[phy2mlog[p]]);
    std::vector<Index> pack, rank_in_pack;
    balanced_packing(replica_load, ranks_per_node, &pack, &rank_in_pack);
    for (Index p = 0; p < phy_per_node; ++p) {
      const Index slot = node * phy_per_node + pack[p] * phy_per_rank + rank_in_pack[p];
      phy2log[slot] = mlog2log[node * log_per_node + phy2mlog[p]];
      phyrank[slot] = rank_of_replica[p];
    }
  }
  EplbPlacement result;
  fill_maps(L, phy2log, phyrank, &result);
  *out = std::move(result);
  return Status::ok();
}

Index ExpertMoves::transfers() const {
  Index n = 0;
  for (std::size_t p = 0; p < source_rank.size(); ++p) n += source_rank[p] != static_cast<std::int32_t>(static_cast<Index>(p) / experts_per_rank);
  return n;
}

Status plan_expert_moves(std::span<const std::int32_t> old_p2l, std::span<const std::int32_t> new_p2l, Index ranks, ExpertMoves* out) {
  const auto P = static_cast<Index>(old_p2l.size());
  if (static_cast<Index>(new_p2l.size()) != P) {
    return invalid_argument("new_physical_to_logical: expected ", P, " entries (as the old placement), got ", new_p2l.size());
  }
  if (ranks < 1 || P % ranks != 0) return invalid_argument("ranks: expected a divisor of the ", P, " physical experts, got ", ranks);
  const Index n = P / ranks;
  // Where each logical expert is held now: its lowest (rank, slot), and on which ranks.
  Index L = 0;
  for (Index p = 0; p < P; ++p) {
    if (old_p2l[p] < 0 || new_p2l[p] < 0) {
      return invalid_argument("physical_to_logical: entry ", p, " is negative (old ", old_p2l[p], ", new ", new_p2l[p], ")");
    }
    L = std::max<Index>(L, Index{old_p2l[p]} + 1);
  }
  // Every logical expert is held at least once, so a valid placement names fewer than P + 1 ids.
  if (L > P || L > kMaxExperts) {
    return invalid_argument("physical_to_logical: logical id ", L - 1, " out of range for ", P, " physical experts");
  }
  std::vector<Index> first_holder(static_cast<std::size_t>(L), -1);
  for (Index p = P - 1; p >= 0; --p) first_holder[static_cast<std::size_t>(old_p2l[p])] = p;
  for (Index p = 0; p < P; ++p) {
    if (new_p2l[p] >= L || first_holder[static_cast<std::size_t>(new_p2l[p])] < 0) {
      return invalid_argument("new_physical_to_logical: entry ", p, " places logical expert ", new_p2l[p],
                              ", which no rank holds in the old placement");
    }
  }
  ExpertMoves m;
  m.ranks = ranks;
  m.experts_per_rank = n;
  m.source_rank.resize(static_cast<std::size_t>(P));
  m.source_slot.resize(static_cast<std::size_t>(P));
  for (Index p = 0; p < P; ++p) {
    const Index r = p / n;
    Index src = first_holder[static_cast<std::size_t>(new_p2l[p])];
    for (Index q = r * n; q < (r + 1) * n; ++q) {  // a copy on the same rank moves no bytes
      if (old_p2l[q] == new_p2l[p]) {
        src = q;
        break;
      }
    }
    m.source_rank[p] = static_cast<std::int32_t>(src / n);
    m.source_slot[p] = static_cast<std::int32_t>(src % n);
  }
  *out = std::move(m);
  return Status::ok();
}

Status move_expert_weights(Communicator& comm, const ExpertMoves& moves, std::size_t bytes_per_expert,
                           std::span<const std::byte> current, std::span<std::byte> next) {
  const int me = comm.rank(), R = comm.size();
  if (moves.ranks != R) return invalid_argument("moves: planned for ", moves.ranks, " ranks; the communicator has ", R);
  const Index n = moves.experts_per_rank;
  if (n > 0 && bytes_per_expert > SIZE_MAX / static_cast<std::size_t>(n)) {
    return invalid_argument("bytes_per_expert: ", bytes_per_expert, " x ", n, " experts overflows");
  }
  const std::size_t local_bytes = static_cast<std::size_t>(n) * bytes_per_expert;
  if (current.size() != local_bytes || next.size() != local_bytes) {
    return invalid_argument("current, next: expected ", n, " experts x ", bytes_per_expert, " bytes = ", local_bytes,
                            " bytes each, got ", current.size(), " and ", next.size());
  }
  if (!current.empty() && current.data() < next.data() + next.size() && next.data() < current.data() + current.size()) {
    return invalid_argument("next: expected a buffer apart from current; they overlap");
  }
  if (moves.source_rank.size() != static_cast<std::size_t>(R * n) || moves.source_slot.size() != moves.source_rank.size()) {
    return invalid_argument("moves: expected ", R * n, " sources (ranks x experts_per_rank), got ", moves.source_rank.size());
  }
  for (std::size_t q = 0; q < moves.source_rank.size(); ++q) {
    if (moves.source_rank[q] < 0 || moves.source_rank[q] >= R || moves.source_slot[q] < 0 || moves.source_slot[q] >= n) {
      return invalid_argument("moves: physical expert ", q, " comes from rank ", moves.source_rank[q], " slot ",
                              moves.source_slot[q], "; expected a rank in [0, ", R, ") and a slot in [0, ", n, ")");
    }
  }
  // Send to each rank, in its slot order, the experts it takes from this rank; receive likewise.
  std::vector<Index> send_counts(static_cast<std::size_t>(R), 0), recv_counts(static_cast<std::size_t>(R), 0);
  std::vector<std::byte> send;
  for (int d = 0; d < R; ++d) {
    for (Index q = d * n; q < (d + 1) * n; ++q) {
      if (moves.source_rank[q] != me || d == me) continue;
      const auto* src = current.data() + static_cast<std::size_t>(moves.source_slot[q]) * bytes_per_expert;
      send.insert(send.end(), src, src + bytes_per_expert);
      ++send_counts[d];
    }
  }
  for (Index q = me * n; q < (me + 1) * n; ++q) {
    if (moves.source_rank[q] != me) ++recv_counts[static_cast<std::size_t>(moves.source_rank[q])];
  }
  std::vector<std::byte> recv(static_cast<std::size_t>(std::accumulate(recv_counts.begin(), recv_counts.end(), Index{0})) *
                              bytes_per_expert);
  MOE_RETURN_IF_ERROR(all_to_all_rows<std::byte>(comm, send, send_counts, recv, recv_counts,
                                                 static_cast<Index>(bytes_per_expert), "expert weights"));
  // Received blocks arrive by source rank, each in this rank's slot order.
  std::vector<std::size_t> block(static_cast<std::size_t>(R) + 1, 0);
  for (int r = 0; r < R; ++r) block[r + 1] = block[r] + static_cast<std::size_t>(recv_counts[r]) * bytes_per_expert;
  for (Index q = me * n; q < (me + 1) * n; ++q) {
    const std::int32_t r = moves.source_rank[q];
    std::byte* dst = next.data() + static_cast<std::size_t>(q - me * n) * bytes_per_expert;
    const std::byte* src = r == me ? current.data() + static_cast<std::size_t>(moves.source_slot[q]) * bytes_per_expert
                                   : recv.data() + block[static_cast<std::size_t>(r)];
    if (r != me) block[static_cast<std::size_t>(r)] += bytes_per_expert;
    std::memcpy(dst, src, bytes_per_expert);
  }
  return Status::ok();
}

}  // namespace moe::parallel
