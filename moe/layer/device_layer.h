// The MoE layer on the GPU end to end: what an inference engine calls.
//
// Built once from a loaded MoeLayer, a DeviceLayer keeps every weight resident (routed experts,
// shared experts, the fp32 router and its biases) and owns a workspace sized for `max_tokens`
// tokens. Its forward takes device tensors and the caller's stream and runs, with no host
// synchronization and no allocation (so it can be captured in a CUDA graph and replayed):
//
//   router GEMM (fp32, as the CPU layer) -> routing (built-in policies, one warp per token) ->
//   experts (moe::Kernel<Spec, cuda::Sm90>), shared experts fused in as always-selected extra
//   experts where their width is a multiple of the routed experts' (else their own expert pass on
//   a second stream, overlapped with the routed experts) -> combine (zero experts, an unfused
//   shared expert), only where there is something to add.
//
// The sum of routed and fused shared experts is one float sum rounded once; the CPU layer rounds
// the routed and the shared outputs before adding them, so the two backends agree within the
// differential tolerance rather than bit for bit. Inputs in the layer's dtype (as Hugging Face
// feeds the router: the hidden states of the model's dtype).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <optional>

#include "moe/any_tensor.h"
#include "moe/layer/moe_layer.h"

namespace moe::cuda {
class NcclCommunicator;  // moe/cuda/parallel/nccl_communicator.h
}  // namespace moe::cuda

namespace moe::layer {

// True when a Hopper GPU (compute capability 9.x) is present: the build carries machine code for
// sm_90a and sm_80 and no PTX.
bool cuda_device_available();

// Device memory holding a copy of `bytes` bytes of `host`, freed when the last holder goes.
Status upload_to_device(const void* host, std::size_t bytes, std::shared_ptr<void>* device);

class DeviceLayer {
 public:
  struct Options {
    Index max_tokens = 4096;           // tokens per internal chunk; bounds the workspace
    bool fuse_shared_experts = true;   // shared experts as extra experts of the grouped GEMM (false:
                                       // their own pass on a second stream; measured in RESULTS.md)
  };

  // Uploads the layer's weights and allocates the workspace (the only allocations it makes).
  // Errors when the layer cannot run on the device (no Hopper GPU, a routing the device paths do
  // not cover: more than 1024 router experts or 32 expert groups).
  static Status create(const MoeLayer& layer, const Options& options, std::unique_ptr<DeviceLayer>* out);
  // A layer of `config`'s shapes with random weights generated on the device (benchmarks at model
  // sizes without a checkpoint): weights N(0, 0.02^2), router N(0, 1/H), one rank.
  static Status create_random(const ModelConfig& config, DType dtype, const Options& options, std::uint64_t seed,
                              std::unique_ptr<DeviceLayer>* out);
  ~DeviceLayer();
  DeviceLayer(const DeviceLayer&) = delete;
  DeviceLayer& operator=(const DeviceLayer&) = delete;

  // hidden_states: device [M, H] in dtype(), contiguous; output: device [M, H] in dtype(),
  // contiguous, not overlapping the input. topk_ids / topk_weights (optional, device, [M, top_k]
  // i32 / f32): the routing, as MoeLayer::Result reports it. Stream-ordered on `stream`.
  Status forward(const AnyTensor& hidden_states, const AnyTensor& output, cudaStream_t stream,
                 const std::optional<AnyTensor>& topk_ids = std::nullopt,
                 const std::optional<AnyTensor>& topk_weights = std::nullopt) const;

  // All-to-all expert parallelism (a layer loaded with ParallelLayout::dispatch kAllToAll or
  // kAllToAllLowLatency): this rank's tokens (at most options.max_tokens) are routed here, their
  // rows dispatched over `comm`, the EP group in EP rank order (moe/cuda/parallel/ep_all_to_all.cuh),
  // run by the ranks holding their experts and combined back; the shared and zero experts of
  // these tokens are added here, so `output` is the full layer's for them. Collective: every rank
  // calls it. The normal mode waits for the host once (NCCL needs the block sizes); the
  // low-latency mode does not and can be captured in a CUDA graph. Refused for
  // apply_router_weight_on_input (the per-call path takes it). A rank whose arguments or own
  // steps fail still takes part in the collectives with no tokens, then returns its error, so
  // its peers finish with correct results for their own tokens.
  // options.max_tokens sizes every rank's blocks: ranks x max_tokens x top_k rows of H each way
  // (and experts_per_rank x ranks x max_tokens in the low-latency mode), so set it to the
  // tokens a rank really holds.
  Status forward_all_to_all(cuda::NcclCommunicator& comm, const AnyTensor& hidden_states, const AnyTensor& output,
                            cudaStream_t stream, const std::optional<AnyTensor>& topk_ids = std::nullopt,
                            const std::optional<AnyTensor>& topk_weights = std::nullopt) const;

  // The host-tensor convenience call for the tool: copies in, forward, copies out (synchronizes).
  Status forward_host(const AnyTensor& hidden_states, MoeLayer::Result* out) const;

  // Timing of the layer forward against its experts stage alone (moe bench): `tokens` random
  // hidden states N(0, 1), each replayed from a CUDA graph `iterations` times after a 256 MiB L2
  // flush, median of CUDA-event times. The experts stage runs on the routing the layer computed
  // (routed slots and fused shared experts), so the difference is what the layer adds: router,
  // routing, an unfused shared expert and the combine pass.
  struct Timing {
    double layer_us = 0, experts_us = 0;
    Index experts_hit = 0;  // distinct routed experts the tokens chose (zero experts excluded)
  };
  Status time_forward(Index tokens, int iterations, Timing* out) const;

  // EPLB (a layer loaded with ParallelLayout::redundant_experts): the tokens routed to each
  // physical expert by the forwards since creation or the last reset (time_forward's replays are
  // not counted). The replica is a hash of the token's index within its chunk of
  // options.max_tokens, so the counts equal MoeLayer::expert_load's where both chunk alike (M up
  // to both chunk sizes). Both synchronize the device; errors for a layer without EPLB.
  Status expert_load(std::vector<std::int64_t>* out) const;
  Status reset_expert_load();

  DType dtype() const;
  Index hidden_size() const;
  int top_k() const;
  bool shared_experts_fused() const;
  std::size_t workspace_bytes() const;

  struct Impl;

 private:
  explicit DeviceLayer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe::layer
