// The CUDA backend: moe::Kernel<Spec, moe::cuda::Sm80 | Sm90>. Include only from .cu files.
//
// Forward, per chunk of at most Options::chunk_tokens tokens, all stream-ordered, with no host
// synchronization and no allocation (the caller gives the workspace), so it can be captured in a
// CUDA graph. The stage types of moe/stages.h, each with its own workspace region:
//   cuda::RoutingStage<Routing>       (moe/cuda/routing_stage.cuh)
//   cuda::PrepareFinalizeStage<Spec>  prepare (moe/cuda/prepare_finalize_stage.cuh)
//   cuda::ExpertsStage                on the Arch tag's schedule (moe/cuda/experts_stage.cuh);
//                                     GEMM2's output over the gathered rows
//   cuda::PrepareFinalizeStage<Spec>  finalize: ascending slots, float sums, the output epilogue,
//                                     one rounding; the router weight here unless the experts
//                                     stage folded it into GEMM2 (the Sm80 schedule does)
// The row order within an expert is ascending slot, as on the CPU backend, so both compute the
// same sums up to floating-point association inside the GEMMs.
#pragma once

#include <algorithm>
#include <span>
#include <vector>

#include "moe/arguments.h"
#include "moe/cuda/arch.h"
#include "moe/cuda/check.h"
#include "moe/cuda/experts_stage.cuh"
#include "moe/cuda/prepare_finalize_stage.cuh"
#include "moe/cuda/routing_stage.cuh"
#include "moe/detail/workspace.h"
#include "moe/expert_map.h"
#include "moe/kernel.h"

namespace moe {

template <class Spec, cuda::ArchTag Arch>
class Kernel<Spec, Arch> {
 public:
  using Arguments = moe::Arguments<Spec, DeviceSpace>;
  using Routing = typename Spec::Routing;
  using PF = typename Spec::PrepareFinalize;
  using Activation = typename Spec::Activation;
  using IO = typename Spec::ElementIO;
  // The stages (moe/stages.h); the experts stage on the Arch tag's schedule.
  using RoutingStage = cuda::RoutingStage<Routing>;
  using PrepareFinalize = cuda::PrepareFinalizeStage<Spec>;
  using Stage = cuda::ExpertsStage<typename Spec::Experts, IO, Arch>;
  static constexpr bool kForcedSm90 = Stage::kForcedSm90;
  static constexpr bool kBatched = PF::kFormat == ActivationFormat::kBatchedExperts;

  explicit Kernel(cuda::Options options = {}) : options_(options), stage_(options) {}
  const cuda::Options& options() const { return options_; }

  // With Options::check_device_inputs the data checks read device memory ordered on `stream`.
  Status can_implement(const Arguments& a, cudaStream_t stream = nullptr) const {
    if (options_.chunk_tokens < 1) return invalid_argument("options.chunk_tokens: expected >= 1, got ", options_.chunk_tokens);
    MOE_RETURN_IF_ERROR(validate_shapes(a));
    int device = 0, major = 0, minor = 0;
    MOE_CUDA_TRY(cudaGetDevice(&device));
    MOE_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    MOE_CUDA_TRY(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    if (10 * major + minor < Arch::kMinComputeCapability) {
      return unsupported("device: ", Arch::kName, " needs compute capability >= ", Arch::kMinComputeCapability,
                         ", device ", device, " has ", major, ".", minor);
    }
    const Problem p = Problem::from(a);
    if (p.num_tokens * p.top_k > INT32_MAX) {
      return invalid_argument("hidden_states: M*top_k = ", p.num_tokens * p.top_k, " exceeds the int32 slot range");
    }
    if constexpr (kForcedSm90) {
      if (const char* why = sm90_refusal(a)) return unsupported("schedule Sm90TmaWarpSpecialized: ", why);
    }
    if constexpr (Stage::kQuantized) {  // the 8-bit GEMMs have no other schedule to fall back on
      if (const char* why = sm90_refusal(a)) return unsupported("experts (", Spec::Quant::kName, "): ", why);
    }
    if constexpr (Stage::kWeightOnly) {
      if (const char* why = stage_.weight_only_refusal(weights_of(a))) {
        return unsupported("experts (", Spec::Quant::kName, "): ", why);
      }
    }
    if (options_.check_device_inputs) MOE_RETURN_IF_ERROR(check_device_inputs(a, p, stream));
    return Status::ok();
  }

  std::size_t workspace_bytes(const Arguments& a) const { return layout(Problem::from(a), a).total; }

  Status run(const Arguments& a, std::span<std::byte> workspace, cudaStream_t stream = nullptr) const {
    MOE_RETURN_IF_ERROR(can_implement(a, stream));
    const Problem p = Problem::from(a);
    const Layout l = layout(p, a);
    MOE_RETURN_IF_ERROR(check_workspace(workspace.size(), l.total));
    if (p.num_tokens == 0) {
      if constexpr (kBatched) {
        if (a.prepare_finalize.dropped_slots) {
          MOE_CUDA_TRY(cudaMemsetAsync(a.prepare_finalize.dropped_slots, 0, sizeof(std::int64_t), stream));
        }
      }
      return Status::ok();
    }
    std::byte* base = Carver::aligned_base(workspace.data());
    for (Index m0 = 0; m0 < p.num_tokens; m0 += l.chunk) {
      const Index m1 = std::min(p.num_tokens, m0 + l.chunk);
      MOE_RETURN_IF_ERROR(run_chunk(a, l, base, m0, m1, stream));
    }
    return Status::ok();
  }

 private:
  using Carver = detail::WorkspaceCarver<256>;  // the workspace: 256-byte aligned regions

  // Each stage's plan and the offset of its region in the workspace.
  struct Layout {
    Index chunk = 0;
    typename RoutingStage::Plan routing;
    typename PrepareFinalize::Plan pf;
    typename Stage::Plan experts;
    std::size_t routing_ws = 0, pf_ws = 0, experts_ws = 0, total = 0;
  };
  // Programmatic dependent launch (moe/cuda/launch.h) for the stage kernels that keep its
  // contract, as the experts stage decides it for this forward's plan.
  bool programmatic_launch(const Layout& l) const { return stage_.programmatic_launch(l.experts); }

  Layout layout(const Problem& p, const Arguments& a) const {
    Layout l;
    l.chunk = std::max<Index>(0, std::min(p.num_tokens, options_.chunk_tokens));
    l.routing = RoutingStage::template plan<Carver>(l.chunk, p.top_k, p.num_experts);
    l.pf = PrepareFinalize::template plan<Carver>(p, l.chunk, a.prepare_finalize);
    l.experts = stage_.plan(weights_of(a), l.pf.rows, l.pf.slots, PrepareFinalize::finalize_allows_sm90(a));
    Carver carver;
    l.routing_ws = carver.take(l.routing.total);
    l.pf_ws = carver.take(l.pf.total);
    l.experts_ws = carver.take(l.experts.total);
    l.total = carver.total();
    return l;
  }

  typename Stage::Weights weights_of(const Arguments& a) const {
    return {a.w13, a.w2, a.w13_bias, a.w2_bias, a.activation, a.quant};
  }
  // Why the Hopper schedule cannot run this forward, or nullptr when it can (decided from shapes,
  // strides and alignment alone, so workspace_bytes and run agree).
  const char* sm90_refusal(const Arguments& a) const {
    if (const char* why = stage_.sm90_refusal(weights_of(a))) return why;
    if (!PrepareFinalize::finalize_allows_sm90(a)) return "output needs 16-byte aligned rows";
    return nullptr;
  }

  Status run_chunk(const Arguments& a, const Layout& l, std::byte* base, Index m0, Index m1, cudaStream_t stream) const {
    const Index C = m1 - m0;
    const bool pdl = programmatic_launch(l);
    RoutedSlots slots;
    MOE_RETURN_IF_ERROR(RoutingStage::run(l.routing, a, m0, C, base + l.routing_ws, stream, &slots));
    const typename PrepareFinalize::Handle h = PrepareFinalize::carve(l.pf, base + l.pf_ws);
    // The W8A8 stages quantize each token once straight into its slots' rows (no gathered copy
    // to write and read back) where the token rows allow 16-byte loads and the router weight is
    // not applied on the input.
    const IO* hidden = a.hidden_states.data() + m0 * a.hidden_states.stride(0);
    const bool from_tokens = Stage::takes_tokens(l.experts) && !PF::kApplyWeightOnInput &&
                             reinterpret_cast<std::uintptr_t>(a.hidden_states.data()) % 16 == 0 &&
                             a.hidden_states.stride(0) % 8 == 0 && a.hidden_states.stride(1) == 1;
    MOE_RETURN_IF_ERROR(PrepareFinalize::prepare(l.pf, h, a, slots, m0, C, pdl, stream, !from_tokens));
    const typename Stage::TokenRows tokens{hidden, a.hidden_states.stride(0), C, a.top_k, h.slot_row};
    // GEMM2's outputs overwrite the gathered rows: the input is dead after GEMM1.
    const typename Stage::Segments segments{h.seg_begin, h.seg_count, h.tiles, h.slot_row, C * a.top_k};
    bool weighted = false;
    MOE_RETURN_IF_ERROR(stage_.run_planned(l.experts, weights_of(a), h.rows, h.rows, segments,
                                           PrepareFinalize::row_weight(h),
                                           std::span<std::byte>(base + l.experts_ws, l.experts.total), stream, &weighted,
                                           from_tokens ? &tokens : nullptr));
    return PrepareFinalize::finalize(h, a, h.rows, m0, C, weighted, l.experts.stores_raw_gemm2(), pdl, stream);
  }

  // Checked mode: copies the expert map and precomputed ids to the host on `stream` (then
  // synchronizes it) and validates them as the CPU backend does.
  Status check_device_inputs(const Arguments& a, const Problem& p, cudaStream_t stream) const {
    if (a.expert_map) {
      std::vector<std::int32_t> map(static_cast<std::size_t>(p.num_experts));
      MOE_CUDA_TRY(cudaMemcpyAsync(map.data(), a.expert_map->data(), map.size() * 4, cudaMemcpyDeviceToHost, stream));
      MOE_CUDA_TRY(cudaStreamSynchronize(stream));
      MOE_RETURN_IF_ERROR(validate_expert_map(HostView<const std::int32_t, 1>(map.data(), {p.num_experts}), p.num_local_experts));
    }
    if constexpr (!Routing::kUsesLogits) {
      std::vector<std::int32_t> ids(static_cast<std::size_t>(p.num_tokens * p.top_k));
      const Index ld = a.topk_ids->stride(0);
      if (!ids.empty() && ld >= p.top_k) {
        MOE_CUDA_TRY(cudaMemcpy2DAsync(ids.data(), p.top_k * 4, a.topk_ids->data(), ld * 4, p.top_k * 4, p.num_tokens,
                                       cudaMemcpyDeviceToHost, stream));
      } else {  // rows closer than top_k apart (a valid view, e.g. M == 1 with any stride)
        for (Index m = 0; m < p.num_tokens; ++m) {
          MOE_CUDA_TRY(cudaMemcpyAsync(ids.data() + m * p.top_k, a.topk_ids->data() + m * ld, p.top_k * 4,
                                       cudaMemcpyDeviceToHost, stream));
        }
      }
      MOE_CUDA_TRY(cudaStreamSynchronize(stream));
      for (std::size_t s = 0; s < ids.size(); ++s) {
        if (ids[s] < 0 || ids[s] >= p.num_experts) {
          return invalid_argument("topk_ids: entry [", s / p.top_k, ", ", s % p.top_k, "] is ", ids[s],
                                  "; expected an expert id in [0, ", p.num_experts, ")");
        }
      }
    }
    return Status::ok();
  }

  cuda::Options options_;
  Stage stage_;
};

}  // namespace moe
