// Prepare/finalize policies: how tokens reach the experts and how expert outputs come back
// (vLLM's FusedMoEPrepareAndFinalize).
//
//  * StandardPrepareFinalize: the experts see rows grouped by expert in one contiguous buffer
//    ([sum of tokens per expert, H]); finalize sums each token's k weighted expert outputs.
//  * BatchedPrepareFinalize: the experts see [E_local, max_tokens_per_expert, H] plus
//    expert_num_tokens [E_local] (the layout of DeepEP low-latency / pplx dispatch). A token count
//    above max_tokens_per_expert is an error on the CPU and a reported drop on the GPU
//    (Arguments::dropped_slots).
//
// ApplyWeightOnInput multiplies each token's input by its router weight before GEMM1 and leaves
// GEMM2's output unweighted (Llama-4); it is defined only for top_k == 1.
//
// Expert parallelism (expert_map) and the future all-to-all dispatchers hang off this policy:
// an all-to-all P/F will declare kOutputIsReduced and its own Arguments (communicator, buffers).
#pragma once

#include <concepts>
#include <cstdint>
#include <string_view>

namespace moe {

enum class ActivationFormat { kStandard, kBatchedExperts };

template <bool ApplyWeightOnInput = false>
struct StandardPrepareFinalize {
  static constexpr std::string_view kName = ApplyWeightOnInput ? "standard_weight_on_input" : "standard";
  static constexpr ActivationFormat kFormat = ActivationFormat::kStandard;
  static constexpr bool kApplyWeightOnInput = ApplyWeightOnInput;
  static constexpr bool kOutputIsReduced = false;
  struct Arguments {};
};

template <bool ApplyWeightOnInput = false>
struct BatchedPrepareFinalize {
  static constexpr std::string_view kName = ApplyWeightOnInput ? "batched_weight_on_input" : "batched";
  static constexpr ActivationFormat kFormat = ActivationFormat::kBatchedExperts;
  static constexpr bool kApplyWeightOnInput = ApplyWeightOnInput;
  static constexpr bool kOutputIsReduced = false;
  struct Arguments {
    std::int64_t max_tokens_per_expert = 0;  // capacity of each expert's batch (> 0)
    // Optional, in the backend's memory (device memory for CUDA): after a forward, the number of
    // slots that found their expert's batch full. The CUDA backend computes counts on the device
    // only, so it drops such slots (they contribute nothing) and reports them here, written in the
    // forward's stream order without a synchronization; the CPU backend refuses the forward
    // instead (an error before any output is written) and writes 0 on success.
    std::int64_t* dropped_slots = nullptr;
  };
};

template <class P>
concept PrepareFinalizePolicy = requires {
  { P::kName } -> std::convertible_to<std::string_view>;
  { P::kFormat } -> std::convertible_to<ActivationFormat>;
  { P::kApplyWeightOnInput } -> std::convertible_to<bool>;
  { P::kOutputIsReduced } -> std::convertible_to<bool>;
  typename P::Arguments;
};

static_assert(PrepareFinalizePolicy<StandardPrepareFinalize<>>);
static_assert(PrepareFinalizePolicy<BatchedPrepareFinalize<>>);

}  // namespace moe
