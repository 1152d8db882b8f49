// The checks of the standalone ops (moe/cpu/ops.h, moe/cuda/ops.cuh), written once for both
// backends: shape checks templated on the memory space, and the checks of entries on host views
// (the CUDA ops run them on host copies in checked mode). Same messages on both backends.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>

#include "moe/detail/validate.h"
#include "moe/expert_map.h"
#include "moe/op_sizes.h"
#include "moe/routing.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::detail {

template <class T, int R, class Space>
using OptTensor = std::optional<TensorView<T, R, Space>>;

// select_experts: router logits [M, E] -> topk_ids [M, k], topk_weights [M, k].
template <class Routing, class Space>
Status check_select_experts(TensorView<const float, 2, Space> router_logits, int top_k,
                            const typename Routing::Arguments& args, const OptTensor<const float, 1, Space>& correction_bias,
                            TensorView<std::int32_t, 2, Space> topk_ids, TensorView<float, 2, Space> topk_weights) {
  const Index M = router_logits.extent(0), E = router_logits.extent(1);
  if (E < 1) return invalid_argument("router_logits: expected at least one expert (dimension 1), got shape ", format_shape(router_logits.extents()));
  MOE_RETURN_IF_ERROR(expect_shape(router_logits, "router_logits", std::array<Dim, 2>{{{"M", M}, {"E", E}}}));
  if (top_k < 1 || top_k > E) return invalid_argument("top_k: expected 1 <= top_k <= num_experts=", E, ", got ", top_k);
  MOE_RETURN_IF_ERROR(expect_shape(topk_ids, "topk_ids", std::array<Dim, 2>{{{"M", M}, {"top_k", top_k}}}));
  MOE_RETURN_IF_ERROR(expect_shape(topk_weights, "topk_weights", std::array<Dim, 2>{{{"M", M}, {"top_k", top_k}}}));
  if (correction_bias) {
    if constexpr (!Routing::kAcceptsCorrectionBias) {
      return invalid_argument("correction_bias: routing policy ", Routing::kName, " does not use an e_score_correction_bias");
    } else {
      MOE_RETURN_IF_ERROR(expect_shape(*correction_bias, "correction_bias", std::array<Dim, 1>{{{"E", E}}}));
    }
  }
  return Routing::can_implement(args, static_cast<int>(E), top_k);
}

// moe_permute's shapes (`Out`: the backend's PermuteOutputs); *rows = R. The expert map's entries
// are the caller's (validate_expert_map).
template <class T, class Space, class Out>
Status check_permute_shapes(TensorView<const T, 2, Space> hidden, const OptTensor<const float, 2, Space>& scales,
                            TensorView<const std::int32_t, 2, Space> topk_ids, Index num_experts, Index num_local_experts,
                            const OptTensor<const std::int32_t, 1, Space>& expert_map, Index align_block_size,
                            const Out& out, Index* rows) {
  const Index M = hidden.extent(0), H = hidden.extent(1), k = topk_ids.extent(1);
  if (num_experts < 1) return invalid_argument("num_experts: expected >= 1, got ", num_experts);
  if (num_local_experts < 1 || num_local_experts > num_experts) {
    return invalid_argument("num_local_experts: expected 1 <= num_local_experts <= num_experts=", num_experts, ", got ", num_local_experts);
  }
  if (!expert_map && num_local_experts != num_experts) {
    return invalid_argument("expert_map: required when num_local_experts (", num_local_experts, ") != num_experts (", num_experts, ")");
  }
  if (align_block_size < 0) return invalid_argument("align_block_size: expected >= 0 (0: no alignment), got ", align_block_size);
  if (k < 1) return invalid_argument("topk_ids: expected top_k >= 1 columns, got shape ", format_shape(topk_ids.extents()));
  if (M * k > INT32_MAX) return invalid_argument("topk_ids: M*top_k = ", M * k, " exceeds the int32 index range");
  const Index R = moe_permute_rows(M, static_cast<int>(k), num_local_experts, align_block_size);
  MOE_RETURN_IF_ERROR(expect_shape(hidden, "hidden_states", std::array<Dim, 2>{{{"M", M}, {"H", H}}}));
  MOE_RETURN_IF_ERROR(expect_shape(topk_ids, "topk_ids", std::array<Dim, 2>{{{"M", M}, {"top_k", k}}}));
  if (expert_map) MOE_RETURN_IF_ERROR(expect_shape(*expert_map, "expert_map", std::array<Dim, 1>{{{"E", num_experts}}}));
  MOE_RETURN_IF_ERROR(expect_shape(out.permuted_hidden, "permuted_hidden_states", std::array<Dim, 2>{{{"R", R}, {"H", H}}}));
  MOE_RETURN_IF_ERROR(expect_shape(out.expert_first_token_offset, "expert_first_token_offset", std::array<Dim, 1>{{{"E_local+1", num_local_experts + 1}}}));
  MOE_RETURN_IF_ERROR(expect_shape(out.inv_permuted_idx, "inv_permuted_idx", std::array<Dim, 1>{{{"M*top_k", M * k}}}));
  MOE_RETURN_IF_ERROR(expect_shape(out.permuted_idx, "permuted_idx", std::array<Dim, 1>{{{"R", R}}}));
  MOE_RETURN_IF_ERROR(expect_shape(out.m_indices, "m_indices", std::array<Dim, 1>{{{"R", R}}}));
  if (scales) {
    MOE_RETURN_IF_ERROR(expect_shape(*scales, "a1q_scale", std::array<Dim, 2>{{{"M", M}, {"S", scales->extent(1)}}}));
    if (!out.permuted_scales) return invalid_argument("permuted_scales: required when a1q_scale is given");
    MOE_RETURN_IF_ERROR(expect_shape(*out.permuted_scales, "permuted_scales", std::array<Dim, 2>{{{"R", R}, {"S", scales->extent(1)}}}));
  }
  *rows = R;
  return Status::ok();
}

// moe_align_block_size's shapes.
template <class Space>
Status check_align_shapes(TensorView<const std::int32_t, 2, Space> topk_ids, Index block_size, Index num_experts,
                          const OptTensor<const std::int32_t, 1, Space>& expert_map, bool pad_sorted_ids,
                          TensorView<std::int32_t, 1, Space> sorted_token_ids, TensorView<std::int32_t, 1, Space> expert_ids,
                          TensorView<std::int32_t, 1, Space> num_tokens_post_padded) {
  const Index M = topk_ids.extent(0), k = topk_ids.extent(1);
  if (block_size < 1) return invalid_argument("block_size: expected >= 1, got ", block_size);
  if (num_experts < 1) return invalid_argument("num_experts: expected >= 1, got ", num_experts);
  MOE_RETURN_IF_ERROR(expect_shape(topk_ids, "topk_ids", std::array<Dim, 2>{{{"M", M}, {"top_k", k}}}));
  const Index numel = M * k;
  if (numel > INT32_MAX) return invalid_argument("topk_ids: M*top_k = ", numel, " exceeds the int32 index range");
  const AlignSizes sz = moe_align_block_size_sizes(numel, num_experts, block_size, pad_sorted_ids);
  MOE_RETURN_IF_ERROR(expect_shape(sorted_token_ids, "sorted_token_ids", std::array<Dim, 1>{{{"max_num_tokens_padded", sz.max_num_tokens_padded}}}));
  MOE_RETURN_IF_ERROR(expect_shape(expert_ids, "expert_ids", std::array<Dim, 1>{{{"num_blocks", sz.num_blocks}}}));
  MOE_RETURN_IF_ERROR(expect_shape(num_tokens_post_padded, "num_tokens_post_padded", std::array<Dim, 1>{{{"1", 1}}}));
  if (expert_map) MOE_RETURN_IF_ERROR(expect_shape(*expert_map, "expert_map", std::array<Dim, 1>{{{"E", num_experts}}}));
  return Status::ok();
}

// moe_align_block_size's expert map entries: -1 or a local id below num_experts (a rank never owns
// more experts than exist), each local id owned once.
inline Status check_align_expert_map(HostView<const std::int32_t, 1> expert_map, Index num_experts) {
  Index max_local = 0;
  for (Index g = 0; g < num_experts; ++g) {
    const std::int32_t l = expert_map(g);
    if (l < -1 || l >= num_experts) {
      return invalid_argument("expert_map: entry ", g, " is ", l, "; expected -1 or a local expert id in [0, ", num_experts, ")");
    }
    max_local = std::max<Index>(max_local, Index{l} + 1);
  }
  return validate_expert_map(expert_map, std::max<Index>(max_local, 1));
}

// moe_fused_mul_sum's shapes.
template <class T, class Space>
Status check_fused_mul_sum_shapes(TensorView<const T, 3, Space> inputs, TensorView<const float, 2, Space> topk_weights,
                                  TensorView<T, 2, Space> out, const OptTensor<const std::int32_t, 2, Space>& topk_ids,
                                  const OptTensor<const std::int32_t, 1, Space>& expert_map) {
  const Index M = inputs.extent(0), k = inputs.extent(1), H = inputs.extent(2);
  MOE_RETURN_IF_ERROR(expect_shape(inputs, "inputs", std::array<Dim, 3>{{{"M", M}, {"top_k", k}, {"H", H}}}));
  MOE_RETURN_IF_ERROR(expect_shape(topk_weights, "topk_weights", std::array<Dim, 2>{{{"M", M}, {"top_k", k}}}));
  MOE_RETURN_IF_ERROR(expect_shape(out, "output", std::array<Dim, 2>{{{"M", M}, {"H", H}}}));
  if (expert_map && !topk_ids) return invalid_argument("topk_ids: required when expert_map is given");
  MOE_RETURN_IF_ERROR(expect_shape(topk_ids, "topk_ids", std::array<Dim, 2>{{{"M", M}, {"top_k", k}}}));
  if (expert_map) MOE_RETURN_IF_ERROR(expect_shape(*expert_map, "expert_map", std::array<Dim, 1>{{{"E", expert_map->extent(0)}}}));
  return Status::ok();
}

// eplb_logical_to_physical's shapes.
template <class Space>
Status check_eplb_shapes(TensorView<const std::int32_t, 2, Space> logical_ids,
                         TensorView<const std::int32_t, 2, Space> logical_to_physical_map,
                         TensorView<const std::int32_t, 1, Space> logical_replica_count, Index num_physical_experts,
                         TensorView<std::int32_t, 2, Space> physical_ids, const OptTensor<std::int64_t, 1, Space>& expert_load) {
  const Index M = logical_ids.extent(0), k = logical_ids.extent(1);
  const Index L = logical_to_physical_map.extent(0), slots_per_expert = logical_to_physical_map.extent(1);
  MOE_RETURN_IF_ERROR(expect_shape(logical_ids, "topk_ids", std::array<Dim, 2>{{{"M", M}, {"top_k", k}}}));
  MOE_RETURN_IF_ERROR(expect_shape(logical_to_physical_map, "logical_to_physical_map", std::array<Dim, 2>{{{"L", L}, {"max_replicas", slots_per_expert}}}));
  MOE_RETURN_IF_ERROR(expect_shape(logical_replica_count, "logical_replica_count", std::array<Dim, 1>{{{"L", L}}}));
  MOE_RETURN_IF_ERROR(expect_shape(physical_ids, "physical_ids", std::array<Dim, 2>{{{"M", M}, {"top_k", k}}}));
  if (num_physical_experts < 1) return invalid_argument("num_physical_experts: expected >= 1, got ", num_physical_experts);
  return expect_shape(expert_load, "expert_load", std::array<Dim, 1>{{{"P", num_physical_experts}}});
}

// eplb_logical_to_physical's map entries: every logical expert has 1..max_replicas replicas, each
// a physical id in [0, P).
inline Status check_eplb_maps(HostView<const std::int32_t, 2> logical_to_physical_map,
                              HostView<const std::int32_t, 1> logical_replica_count, Index num_physical_experts) {
  const Index L = logical_to_physical_map.extent(0), slots_per_expert = logical_to_physical_map.extent(1);
  for (Index e = 0; e < L; ++e) {
    const std::int32_t c = logical_replica_count(e);
    if (c < 1 || c > slots_per_expert) {
      return invalid_argument("logical_replica_count: entry ", e, " is ", c, "; expected 1 <= count <= max_replicas=", slots_per_expert);
    }
    for (std::int32_t r = 0; r < c; ++r) {
      const std::int32_t p = logical_to_physical_map(e, r);
      if (p < 0 || p >= num_physical_experts) {
        return invalid_argument("logical_to_physical_map: entry [", e, ", ", r, "] is ", p, "; expected a physical id in [0, ", num_physical_experts, ")");
      }
    }
  }
  return Status::ok();
}

}  // namespace moe::detail
