// A runtime MoE layer: built from a Hugging Face config and checkpoint, it owns the expert
// weights (converted to the compute dtype and sharded for this rank), the router, shared
// experts and the parallel layout, and runs the forward through the registry's prebuilt
// kernels on the CPU backend.
//
// Parallel layout: tp_size/tp_rank split every expert's intermediate dimension (and the shared
// expert's); ep_size/ep_rank keep only this rank's experts (expert_map, linear or round-robin).
// A rank's output is its partial sum: routed experts of this rank only; what is not split (the
// shared expert under EP, the second GEMM's bias under TP) is added on rank 0 only, so the outputs
// of all ranks add up to the full layer.
//
// EPLB (ParallelLayout::redundant_experts or physical_to_logical): the experts become
// num_experts + redundant_experts physical experts, split evenly over the EP ranks (linear, as vLLM
// requires); rank r holds physical experts [r * n, (r + 1) * n), each a copy of its logical
// expert. The routing maps each token's logical ids to physical ones (eplb_logical_to_physical,
// token-hash replica choice within a chunk of tokens) and counts the tokens per physical expert
// (expert_load()); topk_ids still report logical ids. RankGroupLayer::rebalance moves the
// experts to a placement computed from that load.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "moe/expert_map.h"
#include "moe/io/safetensors.h"
#include "moe/layer/model_config.h"
#include "moe/layer/registry.h"
#include "moe/parallel/communicator.h"
#include "moe/parallel/eplb.h"

namespace moe::layer {

// How the EP ranks share the tokens: vLLM's all2all backends.
enum class EpDispatch {
  // Every rank routes every token and returns its partial sum (its experts only; the shared
  // expert on EP rank 0); the partials are added (vLLM's naive and allgather/reduce-scatter
  // backends). MoeLayer::forward.
  kPartialSums,
  // Each rank holds its own tokens; their rows go to the ranks holding the chosen experts and
  // come back weighted (moe/parallel/ep_all_to_all.h): DeepEP's normal mode, and its low-latency
  // mode with fixed blocks. Every rank computes the shared expert for its own tokens, and its
  // output is the full layer's for them. MoeLayer::forward_all_to_all.
  kAllToAll,
  kAllToAllLowLatency,
};

struct ParallelLayout {
  int tp_size = 1, tp_rank = 0;
  int ep_size = 1, ep_rank = 0;
  ExpertPlacement placement = ExpertPlacement::kLinear;
  // All-to-all needs tp_size 1 and rank r owning experts [r * n, (r + 1) * n): linear placement
  // with num_experts divisible by ep_size, or EPLB.
  EpDispatch dispatch = EpDispatch::kPartialSums;
  // EPLB: extra physical experts (replicas), and where each physical expert's logical expert is
  // ([num_experts + redundant_experts]; empty: vLLM's initial placement, i then i % E).
  Index redundant_experts = 0;
  std::vector<std::int32_t> physical_to_logical;
  bool eplb() const { return redundant_experts != 0 || !physical_to_logical.empty(); }
};

// Row-major storage of one dtype.
struct Buffer {
  DType dtype = DType::kF32;
  std::vector<Index> shape;
  std::vector<std::byte> bytes;
  AnyTensor tensor() const { return AnyTensor{const_cast<std::byte*>(bytes.data()), dtype, shape, {}}; }
};

class MoeLayer {
 public:
  // A quantized scheme's tensors as held (SchemeTensors' members, moe/layer/registry.h), in its
  // layouts (moe/quant/w8a8.h, weight_only.h); a member the scheme does not use has no shape.
  struct SchemeBuffers {
    Buffer w13_scale, w2_scale, a13_scale, a2_scale, w13_zero, w2_zero, w13_k_order;
    // Views of the held members; `group_size` and `signed_codes` the weight-only schemes'.
    SchemeTensors tensors(Index group_size, bool signed_codes) const;
    template <class Self, class F>
    static void each(Self& self, F&& f) {  // in SchemeTensors::each's order
      for (auto* b : {&self.w13_scale, &self.w2_scale, &self.a13_scale, &self.a2_scale, &self.w13_zero, &self.w2_zero,
                      &self.w13_k_order}) {
        f(*b);
      }
    }
  };

  // `prefix` names the decoder layer ("model.layers.3") or the MoE block itself
  // ("model.layers.3.mlp"); the block's module name is appended when the tensors live there.
  static Status load(const ModelConfig& config, const ParallelLayout& parallel, DType dtype,
                     const io::Checkpoint& checkpoint, const std::string& prefix, MoeLayer* out);

  struct Result {
    Buffer output;                       // [M, H] in dtype()
    std::vector<std::int32_t> topk_ids;  // [M, top_k] global expert ids
    std::vector<float> topk_weights;     // [M, top_k] weights applied (routed_scaling_factor included)
  };
  // hidden_states: [M, H] f32, bf16 or f16. router_logits: optional final logits [M, E] f32
  // (any router bias included); when absent, logits = hidden . router^T (+ bias) in fp32.
  // `find` picks the backend: the CPU registry (find_kernel) or the CUDA one (find_cuda_kernel).
  using KernelFinder = Status (*)(const KernelKey&, ForwardFn*);
  Status forward(const AnyTensor& hidden_states, const std::optional<AnyTensor>& router_logits, Result* out,
                 const cpu::Options& options = {}, KernelFinder find = &find_kernel) const;

  // The forward of this rank's own tokens for a layout with an all-to-all dispatch
  // (EpDispatch::kAllToAll*): collective over `comm`, the EP ranks in EP rank order, which all
  // pass the same max_tokens_per_rank (>= every rank's token count; the low-latency mode's
  // fixed blocks). `out` is the full layer's output for these tokens, bit for bit what one rank
  // holding every expert gives. The tokens go in one piece: options.chunk_tokens does not apply.
  // With apply_router_weight_on_input (Llama 4, top_k 1) the token's rank scales its row before
  // dispatch, as vLLM's DeepEP and pplx prepare do.
  Status forward_all_to_all(parallel::Communicator& comm, Index max_tokens_per_rank, const AnyTensor& hidden_states,
                            const std::optional<AnyTensor>& router_logits, Result* out, const cpu::Options& options = {},
                            KernelFinder find = &find_kernel) const;

  // Copies the weights once with `upload` (device memory, freed with the layer; quantized codes
  // with their scales) and runs every later forward through `device_find` (the CUDA registry) with
  // weights_on_device set; refused with device_find's reason where it has no kernel for the layer.
  // See moe/layer/cuda_registry.h's make_layer_resident.
  using UploadFn = Status (*)(const void* host, std::size_t bytes, std::shared_ptr<void>* device);
  Status make_resident(UploadFn upload, KernelFinder device_find);
  bool is_resident() const { return resident_ != nullptr; }

  // EPLB (ParallelLayout::eplb()): the placement in use, and the tokens routed to each physical
  // expert by the forwards since the last reset (partial sums: every rank routes all tokens and
  // counts the same; all-to-all: each rank counts its own tokens, and the group's load is the sum).
  // Not synchronized: one forward of a layer at a time.
  bool has_eplb() const { return eplb_.has_value(); }
  const parallel::EplbPlacement* eplb_placement() const { return eplb_ ? &eplb_->placement : nullptr; }
  std::vector<std::int64_t> expert_load() const { return eplb_ ? eplb_->load : std::vector<std::int64_t>{}; }
  void reset_expert_load() {
    if (eplb_) std::fill(eplb_->load.begin(), eplb_->load.end(), 0);
  }
  // Moves this rank's physical experts (weights, biases, scale tensors) to `next`, collective over
  // `comm`: the EP ranks of one TP rank, in EP rank order (RankGroupLayer::rebalance). Refused for
  // resident weights and static activation scales (a maximum over the rank's experts).
  Status move_experts(parallel::Communicator& comm, const parallel::ExpertMoves& moves, const parallel::EplbPlacement& next);

  const ModelConfig& config() const { return config_; }
  const ParallelLayout& parallel() const { return parallel_; }
  DType dtype() const { return dtype_; }
  // How the expert weights are stored: "none" (in dtype()) or a scheme_key (built_policies.h).
  const std::string& weight_scheme() const { return weight_scheme_; }
  Index num_local_experts() const { return local_experts_; }
  // Policies, shapes and layout, for `moe info`.
  std::string describe() const;
  // Bytes of the routed and shared expert weights as held (quantized: codes, scales).
  std::size_t weight_bytes() const;

 private:
  friend class DeviceLayer;  // reads the loaded weights to upload them
  Index routed_experts_total() const { return config_.num_experts + config_.num_zero_experts; }
  // The routed experts of one chunk: x [M, H] in dtype(), the ids the kernel sees (logical, or
  // physical under EPLB; [M, top_k]) and the weights, into y [M, H]: this rank's experts on the
  // chunk (forward) or the all-to-all over the EP group (forward_all_to_all).
  using RoutedExperts = std::function<Status(const Buffer& x, const std::int32_t* ids, const float* weights, Buffer* y)>;
  Status forward_chunk(const AnyTensor& hidden, const HostView<const float, 2>* logits, Index m0, Index m1, Result* r,
                       const cpu::Options& options, KernelFinder find, const RoutedExperts* routed_override = nullptr) const;
  // A request for this rank's routed experts with their weights (resident or held) bound;
  // `map_storage` keeps the expert map alive (with_expert_map: the kernel sees global ids).
  void bind_routed_weights(ForwardRequest* req, std::vector<std::int32_t>* map_storage, bool with_expert_map) const;

  ModelConfig config_;
  ParallelLayout parallel_;
  DType dtype_ = DType::kBF16;
  std::string block_prefix_;
  Index local_experts_ = 0, intermediate_tp_ = 0, shared_tp_ = 0;
  std::vector<std::int32_t> expert_map_;  // [E] (EPLB: [physical]); empty when every expert is local
  struct Eplb {
    parallel::EplbPlacement placement;
    mutable std::vector<std::int64_t> load;  // [num_physical]
  };
  std::optional<Eplb> eplb_;
  std::vector<float> router_;             // [E, H]
  std::vector<float> router_bias_;        // [E] or empty
  std::vector<float> correction_bias_;    // [E] or empty
  Buffer w13_, w2_, w13_bias_, w2_bias_;  // biases empty (no shape) when absent
  Buffer shared_w13_, shared_w2_;         // [1, 2*S, H], [1, H, S]
  // Quantized weights (weight_scheme_ != "none"): w13_ / w2_ (and the shared ones) hold codes and
  // routed_quant_ / shared_quant_ the scheme's tensors (SchemeBuffers).
  std::string weight_scheme_ = "none";
  SchemeBuffers routed_quant_, shared_quant_;
  Index group_size_ = 0;        // weight-only schemes
  bool signed_codes_ = false;   // their codes stored two's complement (the layers without zero points)
  std::vector<float> shared_gate_;        // [H] or empty

  // Device copies of the weights (make_resident): tensors whose data are device pointers.
  struct Resident {
    std::vector<std::shared_ptr<void>> memory;
    AnyTensor w13, w2, shared_w13, shared_w2;
    std::optional<AnyTensor> w13_bias, w2_bias, expert_map;
    SchemeTensors quant, shared_quant;  // quantized schemes: the tensors beside the codes
    KernelFinder find = nullptr;
  };
  std::shared_ptr<const Resident> resident_;
};

}  // namespace moe::layer
