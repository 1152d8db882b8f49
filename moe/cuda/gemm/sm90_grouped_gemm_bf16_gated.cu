// bf16 instantiations of the Hopper grouped GEMM with GEMM1's gated activation in the epilogue
// (sm90_gated_epilogue.cuh): a target of its own (moe/cuda:sm90_gated_gemm), built beside the
// other CUTLASS units.
#include "moe/cuda/gemm/sm90_gated_epilogue.cuh"
#include "moe/cuda/gemm/sm90_grouped_gemm_impl.cuh"

namespace moe::cuda::gemm::sm90_detail {

// GEMM1 with its gated activation in the epilogue, on the prefill tiles of the table (bf16 only;
// instantiated in this file).
struct GatedTiles {
  using T = cutlass::bfloat16_t;
  using Normal128x256 = GemmType<T, 128, 256, 64, false, 1, 1, false, GatedActivationCollective<SiluAndMul>>;
  using Pingpong64x256 = GemmType<T, 64, 256, 64, false, 1, 1, true, GatedActivationCollective<SiluAndMul>>;
  using Pingpong128x128 = GemmType<T, 128, 128, 64, false, 1, 2, true, GatedActivationCollective<SiluAndMul>>;

  static Status dispatch(const Sm90GroupedGemmArgs& a, Sm90Tile tile, std::span<std::byte> ws, cudaStream_t s) {
    if (a.gated != GatedEpilogue::kSiluAndMul) return unsupported("gated epilogue: SiluAndMul only");
    switch (tile) {
      case Sm90Tile::kNormal128x256: return run<Normal128x256, false>(a, ws, s);
      case Sm90Tile::kPingpong64x256: return run<Pingpong64x256, false>(a, ws, s);
      case Sm90Tile::kPingpong128x128: return run<Pingpong128x128, false>(a, ws, s);
      default: break;
    }
    return invalid_argument("tile: ", name(tile), " has no gated epilogue (prefill tiles only)");
  }
  static std::size_t workspace(int groups, int sm_count) {
    return std::max({workspace_bytes<Normal128x256, false>(groups, sm_count),
                     workspace_bytes<Pingpong64x256, false>(groups, sm_count),
                     workspace_bytes<Pingpong128x128, false>(groups, sm_count)});
  }
};

Status dispatch_bf16_gated(const Sm90GroupedGemmArgs& a, Sm90Tile tile, std::span<std::byte> ws, cudaStream_t s) {
  return GatedTiles::dispatch(a, tile, ws, s);
}
std::size_t workspace_bf16_gated(int groups, int sm_count) { return GatedTiles::workspace(groups, sm_count); }
}  // namespace moe::cuda::gemm::sm90_detail
