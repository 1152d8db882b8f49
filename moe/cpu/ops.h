// Standalone MoE ops on the CPU, with vLLM's semantics (see README.md, "Standalone ops"):
// select_experts, moe_permute / moe_unpermute, moe_align_block_size, moe_fused_mul_sum and the
// EPLB logical-to-physical mapping. Every op validates all of its inputs (shapes and the data
// that decides addresses) before it writes any output; outputs are caller-allocated views.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "moe/cpu/routing_stage.h"
#include "moe/detail/op_checks.h"
#include "moe/detail/validate.h"
#include "moe/expert_map.h"
#include "moe/op_sizes.h"
#include "moe/quant/numeric.h"
#include "moe/routing.h"
#include "moe/tensor.h"

namespace moe::cpu {

using detail::Dim;
using ::moe::AlignSizes;
using ::moe::moe_align_block_size_sizes;
using ::moe::moe_permute_rows;
using ::moe::ReplicaChoice;
using ::moe::round_up;
template <class T, int R>
using OptView = std::optional<HostView<T, R>>;


// ---------------------------------------------------------------------------------------------
// select_experts: router logits [M, E] -> topk_ids [M, k], topk_weights [M, k].
template <class Routing>
Status select_experts(HostView<const float, 2> router_logits, int top_k, const typename Routing::Arguments& args,
                      OptView<const float, 1> correction_bias, HostView<std::int32_t, 2> topk_ids,
                      HostView<float, 2> topk_weights) {
  static_assert(Routing::kUsesLogits, "moe::cpu::select_experts: the routing policy must route from logits");
  MOE_RETURN_IF_ERROR(detail::check_select_experts<Routing>(router_logits, top_k, args, correction_bias, topk_ids, topk_weights));
  const Index M = router_logits.extent(0), E = router_logits.extent(1);
  std::vector<float> scratch(RoutingStage<Routing>::scratch_floats(E));
  std::vector<std::int32_t> iscratch(RoutingStage<Routing>::scratch_ints(E));
  std::vector<std::int32_t> ids(static_cast<std::size_t>(top_k));
  std::vector<float> w(static_cast<std::size_t>(top_k));
  for (Index m = 0; m < M; ++m) {
    RoutingStage<Routing>::route(args, router_logits, correction_bias ? correction_bias->data() : nullptr, m, m + 1, top_k,
                              scratch.data(), iscratch.data(), ids.data(), w.data());
    for (int j = 0; j < top_k; ++j) {
      topk_ids(m, j) = ids[j];
      topk_weights(m, j) = w[j];
    }
  }
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------
// moe_permute / moe_unpermute (vLLM's moe_permute_unpermute op).
//
// Slots are the flattened (token, slot) pairs s = m*k + j. Local slots (id in [0, E) mapping to a
// local expert) are grouped by local expert, ascending s within an expert (a stable sort).
// Without alignment, the remaining slots follow in the same sort: ordered by global id, then ids
// outside [0, E), each in ascending s; with align_block_size > 0 each expert's segment starts at
// a multiple of it and every non-local slot's inv_permuted_idx is the aligned total (vLLM).
// Rows that hold no local slot (padding, non-local) get hidden = 0, permuted_idx = M*k and
// m_indices = fill_invalid_expert; m_indices of padding rows inside an expert's aligned segment
// is that expert (DeepGEMM's contiguous layout).

template <class T>
struct PermuteOutputs {
  HostView<T, 2> permuted_hidden;                      // [R, H]
  OptView<float, 2> permuted_scales;                   // [R, S] when scales are given
  HostView<std::int64_t, 1> expert_first_token_offset; // [E_local + 1]
  HostView<std::int32_t, 1> inv_permuted_idx;          // [M * k]
  HostView<std::int32_t, 1> permuted_idx;              // [R]
  OptView<std::int32_t, 1> m_indices;                  // [R]
};

template <class T>
Status moe_permute(HostView<const T, 2> hidden, OptView<const float, 2> scales, HostView<const std::int32_t, 2> topk_ids,
                   Index num_experts, Index num_local_experts, OptView<const std::int32_t, 1> expert_map,
                   Index align_block_size, std::int32_t fill_invalid_expert, const PermuteOutputs<T>& out) {
  Index R = 0;
  MOE_RETURN_IF_ERROR(detail::check_permute_shapes(hidden, scales, topk_ids, num_experts, num_local_experts, expert_map,
                                                   align_block_size, out, &R));
  if (expert_map) MOE_RETURN_IF_ERROR(validate_expert_map(*expert_map, num_local_experts));
  const Index M = hidden.extent(0), H = hidden.extent(1), k = topk_ids.extent(1);

  const Index slots = M * k;
  const std::int32_t* map = expert_map ? expert_map->data() : nullptr;
  // Sort key: local id, then E_local + global id (non-local), then E_local + E (out of range).
  auto key_of = [&](Index s) -> Index {
    const std::int32_t id = topk_ids(s / k, s % k);
    const std::int32_t l = local_expert_id(id, map, num_experts);
    if (l >= 0) return l;
    return num_local_experts + ((id >= 0 && id < num_experts) ? id : num_experts);
  };
  std::vector<Index> count(static_cast<std::size_t>(num_local_experts + num_experts + 1), 0);
  for (Index s = 0; s < slots; ++s) ++count[key_of(s)];
  std::vector<Index> start(count.size(), 0);
  Index next = 0;
  for (Index e = 0; e < num_local_experts; ++e) {
    start[e] = next;
    next += align_block_size > 0 ? round_up(count[e], align_block_size) : count[e];
    out.expert_first_token_offset(e) = start[e];
  }
  const Index local_total = next;
  out.expert_first_token_offset(num_local_experts) = local_total;
  for (std::size_t key = num_local_experts; key < count.size(); ++key) {
    start[key] = next;
    next += count[key];
  }

  for (Index r = 0; r < R; ++r) {
    out.permuted_idx(r) = static_cast<std::int32_t>(slots);
    for (Index c = 0; c < H; ++c) out.permuted_hidden(r, c) = from_float<T>(0.0f);
    if (out.m_indices) (*out.m_indices)(r) = fill_invalid_expert;
  }
  if (out.m_indices) {
    for (Index e = 0; e < num_local_experts; ++e) {
      const Index seg = align_block_size > 0 ? round_up(count[e], align_block_size) : count[e];
      for (Index r = start[e]; r < start[e] + seg; ++r) (*out.m_indices)(r) = static_cast<std::int32_t>(e);
    }
  }
  std::vector<Index> cursor = start;
  for (Index s = 0; s < slots; ++s) {
    const Index key = key_of(s);
    const Index dest = cursor[key]++;
    if (key < num_local_experts) {
      out.inv_permuted_idx(s) = static_cast<std::int32_t>(dest);
      out.permuted_idx(dest) = static_cast<std::int32_t>(s);
      for (Index c = 0; c < H; ++c) out.permuted_hidden(dest, c) = hidden(s / k, c);
    } else {
      out.inv_permuted_idx(s) = static_cast<std::int32_t>(align_block_size > 0 ? local_total : dest);
    }
  }
  if (scales) {  // vLLM: a1q_scale[permuted_idx.clamp(max=M*k-1) // k]
    for (Index r = 0; r < R; ++r) {
      const Index token = slots == 0 ? 0 : std::min<Index>(out.permuted_idx(r), slots - 1) / k;
      for (Index c = 0; c < scales->extent(1); ++c) (*out.permuted_scales)(r, c) = M == 0 ? 0.0f : (*scales)(token, c);
    }
  }
  return Status::ok();
}

// out[m] = sum_j topk_weights[m, j] * permuted[inv_permuted_idx[m*k + j]] in float, ascending j,
// rounded once. With expert_first_token_offset, slots whose row is >= its last entry (non-local
// experts) are skipped.
template <class T>
Status moe_unpermute(HostView<const T, 2> permuted, HostView<const float, 2> topk_weights,
                     HostView<const std::int32_t, 1> inv_permuted_idx, OptView<const std::int64_t, 1> expert_first_token_offset,
                     HostView<T, 2> out) {
  const Index M = topk_weights.extent(0), k = topk_weights.extent(1), R = permuted.extent(0), H = permuted.extent(1);
  MOE_RETURN_IF_ERROR(detail::expect_shape(permuted, "permuted_hidden_states", std::array<Dim, 2>{{{"R", R}, {"H", H}}}));
  MOE_RETURN_IF_ERROR(detail::expect_shape(topk_weights, "topk_weights", std::array<Dim, 2>{{{"M", M}, {"top_k", k}}}));
  MOE_RETURN_IF_ERROR(detail::expect_shape(inv_permuted_idx, "inv_permuted_idx", std::array<Dim, 1>{{{"M*top_k", M * k}}}));
  MOE_RETURN_IF_ERROR(detail::expect_shape(out, "output", std::array<Dim, 2>{{{"M", M}, {"H", H}}}));
  Index valid = R;
  if (expert_first_token_offset) {
    const Index n = expert_first_token_offset->extent(0);
    if (n < 1) return invalid_argument("expert_first_token_offset: expected E_local+1 >= 1 entries, got 0");
    MOE_RETURN_IF_ERROR(detail::expect_shape(*expert_first_token_offset, "expert_first_token_offset", std::array<Dim, 1>{{{"E_local+1", n}}}));
    valid = (*expert_first_token_offset)(n - 1);
    if (valid < 0 || valid > R) {
      return invalid_argument("expert_first_token_offset: last entry ", valid, " must be in [0, R=", R, "]");
    }
  }
  for (Index s = 0; s < M * k; ++s) {
    const std::int32_t r = inv_permuted_idx(s);
    const bool skipped = expert_first_token_offset && r >= valid;
    if (!skipped && (r < 0 || r >= R)) {
      return invalid_argument("inv_permuted_idx: entry ", s, " is ", r, "; expected a row in [0, ", R, ")");
    }
  }
  std::vector<float> acc(static_cast<std::size_t>(H));
  for (Index m = 0; m < M; ++m) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (Index j = 0; j < k; ++j) {
      const std::int32_t r = inv_permuted_idx(m * k + j);
      if (expert_first_token_offset && r >= valid) continue;
      const float w = topk_weights(m, j);
      for (Index c = 0; c < H; ++c) acc[c] += w * to_float(permuted(r, c));
    }
    for (Index c = 0; c < H; ++c) out(m, c) = from_float<T>(acc[c]);
  }
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------
// moe_align_block_size: slots grouped by expert, each expert's run padded to a multiple of
// block_size, for block-tiled grouped GEMMs.
//   sorted_token_ids [max_padded] int32: flattened slot indices, ascending within an expert
//     (vLLM's order there is atomic-dependent; ours is deterministic); every other entry, including
//     those past num_tokens_post_padded, is the sentinel M*k.
//   expert_ids [ceil(max_padded / block_size)] int32: the expert of each block; blocks past the
//     used ones are -1.
//   num_tokens_post_padded [1] int32 = sum_e round_up(count_e, block_size).
// ignore_invalid_experts = false: slots are counted per global expert (ids outside [0, E) are
// dropped) and expert_ids hold expert_map[global] (-1 for experts on other ranks: such blocks
// must produce zeros). ignore_invalid_experts = true: slots whose expert is not local are dropped
// and expert_ids hold local ids.

inline Status moe_align_block_size(HostView<const std::int32_t, 2> topk_ids, Index block_size, Index num_experts,
                                   OptView<const std::int32_t, 1> expert_map, bool pad_sorted_ids,
                                   bool ignore_invalid_experts, HostView<std::int32_t, 1> sorted_token_ids,
                                   HostView<std::int32_t, 1> expert_ids, HostView<std::int32_t, 1> num_tokens_post_padded) {
  MOE_RETURN_IF_ERROR(detail::check_align_shapes(topk_ids, block_size, num_experts, expert_map, pad_sorted_ids,
                                                 sorted_token_ids, expert_ids, num_tokens_post_padded));
  const Index M = topk_ids.extent(0), k = topk_ids.extent(1);
  const Index numel = M * k;
  const AlignSizes sz = moe_align_block_size_sizes(numel, num_experts, block_size, pad_sorted_ids);
  const std::int32_t* map = nullptr;
  if (expert_map) {
    MOE_RETURN_IF_ERROR(detail::check_align_expert_map(*expert_map, num_experts));
    map = expert_map->data();
  }
  // Bucket of each slot: -1 when dropped.
  auto bucket = [&](Index s) -> Index {
    const std::int32_t id = topk_ids(s / k, s % k);
    if (ignore_invalid_experts) return local_expert_id(id, map, num_experts);
    return (id >= 0 && id < num_experts) ? id : -1;
  };
  std::vector<Index> count(static_cast<std::size_t>(num_experts), 0);
  for (Index s = 0; s < numel; ++s) {
    const Index b = bucket(s);
    if (b >= 0) ++count[b];
  }
  std::vector<Index> start(static_cast<std::size_t>(num_experts), 0);
  Index total = 0;
  for (Index e = 0; e < num_experts; ++e) {
    start[e] = total;
    total += round_up(count[e], block_size);
  }
  if (total > sz.max_num_tokens_padded) {
    return make_status(StatusCode::kInternal, "moe_align_block_size: padded total ", total, " exceeds buffer size ", sz.max_num_tokens_padded);
  }
  for (Index i = 0; i < sz.max_num_tokens_padded; ++i) sorted_token_ids(i) = static_cast<std::int32_t>(numel);
  for (Index b = 0; b < sz.num_blocks; ++b) expert_ids(b) = -1;
  for (Index e = 0; e < num_experts; ++e) {
    const std::int32_t label = (!ignore_invalid_experts && map) ? map[e] : static_cast<std::int32_t>(e);
    for (Index b = start[e] / block_size; b < (start[e] + round_up(count[e], block_size)) / block_size; ++b) expert_ids(b) = label;
  }
  std::vector<Index> cursor = start;
  for (Index s = 0; s < numel; ++s) {
    const Index b = bucket(s);
    if (b >= 0) sorted_token_ids(cursor[b]++) = static_cast<std::int32_t>(s);
  }
  num_tokens_post_padded(0) = static_cast<std::int32_t>(total);
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------
// moe_fused_mul_sum: out[m] = sum_j topk_weights[m, j] * inputs[m, j] in float, ascending j,
// rounded once. With an expert_map, slots whose id is outside [0, E) or maps to -1 are skipped.
template <class T>
Status moe_fused_mul_sum(HostView<const T, 3> inputs, HostView<const float, 2> topk_weights, HostView<T, 2> out,
                         OptView<const std::int32_t, 2> topk_ids, OptView<const std::int32_t, 1> expert_map) {
  MOE_RETURN_IF_ERROR(detail::check_fused_mul_sum_shapes(inputs, topk_weights, out, topk_ids, expert_map));
  const Index M = inputs.extent(0), k = inputs.extent(1), H = inputs.extent(2);
  std::vector<float> acc(static_cast<std::size_t>(H));
  for (Index m = 0; m < M; ++m) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (Index j = 0; j < k; ++j) {
      if (expert_map && local_expert_id((*topk_ids)(m, j), expert_map->data(), expert_map->extent(0)) < 0) continue;
      const float w = topk_weights(m, j);
      for (Index c = 0; c < H; ++c) acc[c] += w * to_float(inputs(m, j, c));
    }
    for (Index c = 0; c < H; ++c) out(m, c) = from_float<T>(acc[c]);
  }
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------
// EPLB: logical expert ids -> physical expert ids, choosing among each logical expert's
// replicas, and optionally counting the tokens each physical expert receives.
inline Status eplb_logical_to_physical(HostView<const std::int32_t, 2> logical_ids,
                                       HostView<const std::int32_t, 2> logical_to_physical_map,
                                       HostView<const std::int32_t, 1> logical_replica_count, Index num_physical_experts,
                                       ReplicaChoice choice, HostView<std::int32_t, 2> physical_ids,
                                       OptView<std::int64_t, 1> expert_load, Index num_unpadded_tokens = -1) {
  const Index M = logical_ids.extent(0), k = logical_ids.extent(1);
  const Index L = logical_to_physical_map.extent(0);
  MOE_RETURN_IF_ERROR(detail::check_eplb_shapes(logical_ids, logical_to_physical_map, logical_replica_count,
                                                num_physical_experts, physical_ids, expert_load));
  MOE_RETURN_IF_ERROR(detail::check_eplb_maps(logical_to_physical_map, logical_replica_count, num_physical_experts));
  for (Index m = 0; m < M; ++m) {
    for (Index j = 0; j < k; ++j) {
      const std::int32_t id = logical_ids(m, j);
      std::int32_t phys = -1;
      if (id >= 0 && id < L) {
        const std::uint32_t count = static_cast<std::uint32_t>(logical_replica_count(id));
        const std::uint32_t replica = choice == ReplicaChoice::kTokenHash
                                          ? static_cast<std::uint32_t>(static_cast<std::uint64_t>(m) * 2654435769ull) % count
                                          : static_cast<std::uint32_t>((m * k + j) % count);
        phys = logical_to_physical_map(id, replica);
      }
      physical_ids(m, j) = phys;
      const bool counted = num_unpadded_tokens < 0 || m < num_unpadded_tokens;
      if (expert_load && phys >= 0 && counted) ++(*expert_load)(phys);
    }
  }
  return Status::ok();
}

}  // namespace moe::cpu
