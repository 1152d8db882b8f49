// Backend tags of the CUDA backend. Host-compilable: naming a tag needs no nvcc; running the
// backend needs moe/cuda/kernel.cuh in a .cu file.
#pragma once

#include <optional>
#include <string_view>

#include "moe/cuda/gemm/schedule.h"
#include "moe/tensor.h"

namespace moe::cuda {

// An architecture tag names the least compute capability the kernel runs on and the schedule of
// its expert GEMMs (moe/cuda/gemm/schedule.h). cuda::Sm90 picks per problem (ScheduleAuto);
// cuda::Sm90WithSchedule<gemm::Sm80CpAsync> pins the portable mainloop (tests compare both).
template <class GemmSchedule = gemm::ScheduleAuto>
struct Sm80WithSchedule {
  static_assert(!std::is_base_of_v<gemm::Sm90TmaWarpSpecialized, GemmSchedule> &&
                    !std::is_same_v<gemm::Sm90TmaWarpSpecialized, GemmSchedule>,
                "moe::cuda::Sm80WithSchedule: an Sm90 schedule (wgmma, TMA) needs the Sm90 tag: "
                "sm_80 devices lack those instructions");
  using Space = DeviceSpace;
  using Schedule = GemmSchedule;
  static constexpr std::string_view kName = "cuda_sm80";
  static constexpr int kMinComputeCapability = 80;
};

template <class GemmSchedule = gemm::ScheduleAuto>
struct Sm90WithSchedule {
  static_assert(gemm::Schedule<GemmSchedule>, "moe::cuda::Sm90WithSchedule: not a schedule of moe/cuda/gemm/schedule.h");
  using Space = DeviceSpace;
  using Schedule = GemmSchedule;
  static constexpr std::string_view kName = "cuda_sm90";
  static constexpr int kMinComputeCapability = 90;
};

using Sm80 = Sm80WithSchedule<>;
using Sm90 = Sm90WithSchedule<>;

template <class A>
concept ArchTag = requires {
  { A::kMinComputeCapability } -> std::convertible_to<int>;
  typename A::Schedule;
} && std::is_same_v<typename A::Space, DeviceSpace>;

// Where the forward uses programmatic dependent launch.
enum class ProgrammaticLaunch {
  kOff,            // plain stream order everywhere
  kFusedSwapOnly,  // the decode schedule (our fused swap mainloop), whose kernels all take part
  kEverySchedule,  // also the CUTLASS schedule's stage kernels (its GEMMs launch plainly)
};

// Which GEMM runs the weight-only schemes' experts.
enum class WeightOnlyGemm {
  kAuto,              // the mixed-input wgmma GEMM where it applies and the experts average at least
                      // weight_only_wgmma_rows_per_expert rows (prefill), else the swap GEMM where it
                      // applies (decode), else the register GEMM
  kRegisters,         // our mma.sync GEMM, codes dequantized in registers (moe/cuda/gemm/weight_only_gemm.cuh)
  kMixedInputWgmma,   // CUTLASS's mixed-input wgmma GEMM (moe/cuda/gemm/sm90_weight_only_gemm.h) where it
                      // applies (sm_90a, bf16 rows, 4-bit codes, no expert biases), else the register GEMM
  kSwapWgmma,         // our TMA + register-sourced wgmma swap GEMM (moe/cuda/gemm/sm90_weight_only_swap.cuh)
                      // where it applies (sm_90a, bf16 rows, 4-bit codes without zero points, [gate; up]
                      // or ungated w13, no expert biases), else the register GEMM
};

// Options of the CUDA forward.
struct Options {
  Index chunk_tokens = 16384;  // tokens per chunk; bounds the workspace
  // Checked mode: before the forward, copy ids and the expert map to the host (on the forward's
  // stream, then a synchronization) and report out-of-range ids and malformed maps as errors.
  // Off by default: unchecked, such ids contribute zero and never form an address. In the batched
  // format, slots beyond max_tokens_per_expert are dropped in both modes (the counts are only
  // known on the device).
  bool check_device_inputs = false;
  // The Hopper schedule's tile for every forward, instead of the table's choice (tuning, tests).
  std::optional<gemm::Sm90Tile> sm90_tile;
  // Most K splits of the Hopper swap mainloop (decode GEMMs with fewer tiles than SMs); 1: none.
  int max_k_splits = 8;
  // Sm90 tags: which forwards launch their stage kernels with programmatic dependent launch, so
  // each starts during the previous one's tail (moe/cuda/launch.h). Every choice gives the same
  // bits; kOff is plain stream order. See ProgrammaticLaunch for the default's reason.
  ProgrammaticLaunch programmatic_launch = ProgrammaticLaunch::kEverySchedule;
  WeightOnlyGemm weight_only_gemm = WeightOnlyGemm::kAuto;
};

// kAuto's switch from the register GEMM to the mixed-input one, in rows per local expert (a
// host-side average: slots / local experts), by code layout. From the H200 runs in
// benchmarks/NOTES.md: offset codes (the fp32 scale-and-zero conversion) win from ~16 rows and
// lose at 8 ("W4A16 prefill on the mixed-input wgmma GEMM"); two's-complement codes (bf16 scales)
// win from 8 rows (gpt-oss and DeepSeek M = 256: 1191 vs 1418 and 3940 vs 4536 µs) and lose at 4
// (qwen3 M = 64: 313 vs 267) ("W4A16 prefill: two's-complement codes and bf16 scales").
// Where the swap GEMM applies (moe/cuda/gemm/sm90_weight_only_swap.cuh) it replaces the register
// GEMM below the switch, and the switch moves to weight_only_swap_rows_per_expert: on the H200
// (2026-12-03, RESULTS.md "W4A16 decode: the swap GEMM's per-stage overhead", one process, µs,
// swap vs mixed-input) it wins at 8 rows per expert (gpt-oss and DeepSeek M = 256: 714 vs 1202
// and 2239 vs 3993), at 16 (mixtral M = 64: 330 vs 525, qwen3 M = 256: 233 vs 321) and, with
// 32-token tiles, at 32 (gpt-oss M = 1024: 1183 vs 1711, DeepSeek M = 1024: 3996 vs 5567), and
// loses at 64 (qwen3 M = 1024: 572 vs 450, mixtral M = 256: 811 vs 743). The switch sits at 40,
// between the two measured points.
inline constexpr double weight_only_wgmma_rows_per_expert(bool signed_codes) { return signed_codes ? 6.0 : 12.0; }
inline constexpr double weight_only_swap_rows_per_expert = 40.0;

}  // namespace moe::cuda
