// The stage interfaces both backends share (vLLM's modular kernel: routing -> prepare -> experts
// -> finalize). moe::Kernel<Spec, Backend>::run is that sequence of stage types, each with its own
// workspace region (the kernel's workspace is their sum):
//
//   RoutingStage<Routing>            a chunk's logits -> RoutedSlots (or the caller's precomputed
//                                    topk_ids / topk_weights passed through)
//   PrepareFinalizeStage<Spec>       prepare: RoutedSlots + hidden states -> rows grouped by local
//                                    expert (ExpertRows) and the handle finalize needs; finalize:
//                                    the experts' rows -> the weighted top-k sum -> the output
//                                    epilogue -> output. The built-in standard and batched formats.
//   ExpertsStage<Experts, IO>        GEMM1 -> activation -> GEMM2 on the rows
//
// on each backend (moe::cpu::, moe::cuda::). The experts stage is what a prepare/finalize written
// elsewhere (an all-to-all dispatcher, the simulated ranks in testing/ep/) calls: it hands the
// stage rows and gets rows back:
//
//   ExpertRows.input  [R, H]   rows grouped by local expert: expert e owns rows
//                              [seg_begin[e], seg_begin[e] + seg_count[e])
//   experts stage:      GEMM1 -> activation -> GEMM2, per row, with moe/epilogue.h's rounding points
//   ExpertRows.output [R, H]   row r = GEMM2's output of input row r, rounded to IO and unweighted;
//                              rows outside every segment are not written
//
// The finalize that follows weights and reduces (vLLM's TopKWeightAndReduce "contiguous"):
//   out[m] = IO( sum over slots j ascending of IO(w[m, j] * output[row(m, j)]) )   (float sums)
// which is what the built-in finalize computes, so a forward assembled from the stages gives the
// built-in forward's bits.
//
// The batched layout a dispatcher delivers ([E_local, capacity, H] with per-expert counts) is the
// special case seg_begin[e] = e * capacity.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "moe/detail/validate.h"
#include "moe/experts.h"
#include "moe/intermediate_epilogue.h"
#include "moe/prepare_finalize.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe {

// The routing stage's output for a chunk of C tokens, in the backend's memory: ids [C, top_k]
// (global expert ids) and weights [C, top_k], rows ld_ids / ld_weights elements apart.
struct RoutedSlots {
  const std::int32_t* ids = nullptr;
  Index ld_ids = 0;
  const float* weights = nullptr;
  Index ld_weights = 0;
};

// The workspace regions of a routing stage (offsets from an aligned base): the policy's scratch
// and the ids and weights of a chunk's `slots` slots. Both backends' RoutingStage::plan.
struct RoutingPlan {
  std::size_t scratch = 0, iscratch = 0, ids = 0, weights = 0, total = 0;
};
template <class Carver>
RoutingPlan plan_routing_regions(std::size_t scratch_floats, std::size_t scratch_ints, Index slots) {
  const std::size_t n = static_cast<std::size_t>(slots > 0 ? slots : 0);
  RoutingPlan l;
  Carver c;
  l.scratch = c.take(scratch_floats * sizeof(float));
  l.iscratch = c.take(scratch_ints * sizeof(std::int32_t));
  l.ids = c.take(n * sizeof(std::int32_t));
  l.weights = c.take(n * sizeof(float));
  l.total = c.total();
  return l;
}

// The prepare/finalize policies both backends' PrepareFinalizeStage implement, and the rows a
// chunk of `chunk` tokens takes in their format: one per slot, or E_local * capacity (batched).
template <class PF>
concept BuiltinPrepareFinalize = std::is_same_v<PF, StandardPrepareFinalize<PF::kApplyWeightOnInput>> ||
                                 std::is_same_v<PF, BatchedPrepareFinalize<PF::kApplyWeightOnInput>>;
template <BuiltinPrepareFinalize PF>
Index prepared_rows(Index chunk, int top_k, Index num_local_experts, const typename PF::Arguments& args) {
  if constexpr (PF::kFormat == ActivationFormat::kBatchedExperts) {
    return chunk == 0 ? 0 : num_local_experts * args.max_tokens_per_expert;
  } else {
    return chunk * top_k;
  }
}

// The weights of this rank's local experts, PyTorch Linear layout (K contiguous).
template <class Experts, class IO, class Space>
struct ExpertWeights {
  using W = typename Experts::Quant::WeightElement;
  TensorView<const W, 3, Space> w13;  // [E_local, 2*I (gated) or I, H / pack]
  TensorView<const W, 3, Space> w2;   // [E_local, H, I / pack] (pack: codes per element, quant::weight_pack_v)
  std::optional<TensorView<const IO, 2, Space>> w13_bias;  // [E_local, 2*I or I]
  std::optional<TensorView<const IO, 2, Space>> w2_bias;   // [E_local, H]
  typename Experts::Activation::Arguments activation{};
  typename Experts::Quant::template Arguments<Space> quant{};  // the scheme's scale tensors

  Index num_local_experts() const { return w13.extent(0); }
  Index hidden() const { return w2.extent(1); }
  Index intermediate() const { return w2.extent(2) * quant::weight_pack_v<typename Experts::Quant>; }
};

// Rows grouped by local expert, in the backend's memory (device memory for CUDA, including the
// segment arrays). Segments must be disjoint; the backends clamp them to [0, R), so a bad segment
// gives wrong rows, never an out-of-bounds access.
template <class IO, class Space>
struct ExpertRows {
  TensorView<const IO, 2, Space> input;  // [R, H], rows contiguous
  TensorView<IO, 2, Space> output;       // [R, H], rows contiguous; may be input's memory
  TensorView<const Index, 1, Space> seg_begin;  // [E_local]
  TensorView<const Index, 1, Space> seg_count;  // [E_local]
  // A bound on the rows of any one expert, known on the host (the batched capacity, or the
  // tokens a rank can receive); it picks the GEMM tiles. 0: R.
  Index max_rows_per_expert = 0;
};

// The checks that shapes alone decide, with messages naming the argument.
template <class Experts, class IO, class Space>
Status validate_expert_rows(const ExpertWeights<Experts, IO, Space>& w, const ExpertRows<IO, Space>& r) {
  using detail::Dim;
  const Index E = w.num_local_experts(), H = w.hidden(), I = w.intermediate();
  const Index N1 = Experts::kGated ? 2 * I : I;
  if (E < 1) return invalid_argument("w13: expected at least one local expert, got shape ", detail::format_shape(w.w13.extents()));
  if (H < 1 || I < 1) return invalid_argument("w2: expected H >= 1 and I >= 1, got shape ", detail::format_shape(w.w2.extents()));
  constexpr Index kPack = quant::weight_pack_v<typename Experts::Quant>;
  if (H % kPack != 0) {
    return invalid_argument("w2: expected a hidden size H divisible by ", kPack, " (", Experts::Quant::kName,
                            " packs ", kPack, " codes per byte along K), got shape ", detail::format_shape(w.w2.extents()));
  }
  MOE_RETURN_IF_ERROR(detail::expect_shape(w.w13, Experts::kGated ? "w13 (gated activation: 2*I rows)" : "w13 (ungated activation: I rows)",
                                           std::array<Dim, 3>{{{"E_local", E}, {Experts::kGated ? "2*I" : "I", N1},
                                                               {kPack == 1 ? "H" : "H/pack", H / kPack}}}));
  MOE_RETURN_IF_ERROR(detail::expect_shape(w.w13_bias, "w13_bias", std::array<Dim, 2>{{{"E_local", E}, {Experts::kGated ? "2*I" : "I", N1}}}));
  MOE_RETURN_IF_ERROR(detail::expect_shape(w.w2_bias, "w2_bias", std::array<Dim, 2>{{{"E_local", E}, {"H", H}}}));
  const Index R = r.input.extent(0);
  MOE_RETURN_IF_ERROR(detail::expect_shape(r.input, "rows.input", std::array<Dim, 2>{{{"R", R}, {"H", H}}}));
  MOE_RETURN_IF_ERROR(detail::expect_shape(r.output, "rows.output", std::array<Dim, 2>{{{"R", R}, {"H", H}}}));
  if (R > 0 && (r.input.stride(0) != H || r.input.stride(1) != 1)) {
    return invalid_argument("rows.input: expected contiguous rows (strides [H=", H, ", 1]), got strides [", r.input.stride(0),
                            ", ", r.input.stride(1), "]");
  }
  if (R > 0 && (r.output.stride(0) != H || r.output.stride(1) != 1)) {
    return invalid_argument("rows.output: expected contiguous rows (strides [H=", H, ", 1]), got strides [",
                            r.output.stride(0), ", ", r.output.stride(1), "]");
  }
  MOE_RETURN_IF_ERROR(detail::expect_shape(r.seg_begin, "rows.seg_begin", std::array<Dim, 1>{{{"E_local", E}}}));
  MOE_RETURN_IF_ERROR(detail::expect_shape(r.seg_count, "rows.seg_count", std::array<Dim, 1>{{{"E_local", E}}}));
  MOE_RETURN_IF_ERROR(w.quant.validate(E, N1, H, I));
  MOE_RETURN_IF_ERROR(detail::validate_intermediate_epilogue<typename Experts::Activation>(w.activation, I));
  if (r.max_rows_per_expert < 0 || r.max_rows_per_expert > R) {
    return invalid_argument("rows.max_rows_per_expert: expected 0 (unknown) or a bound in [1, R=", R, "], got ",
                            r.max_rows_per_expert);
  }
  return Status::ok();
}

}  // namespace moe
