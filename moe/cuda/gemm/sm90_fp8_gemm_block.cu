// CUTLASS 3 sm90 ptr-array grouped GEMM with blockwise-scaled FP8 operands (kBlock128), behind
// moe/cuda/gemm/sm90_fp8_gemm.h. Its one instantiation lives here.
//
// Per launch, as for the 16-bit grouped GEMM (sm90_grouped_gemm_impl.cuh): a one-thread-per-group
// kernel writes CUTLASS's per-group problem shapes, pointers, strides and scale layouts into our
// workspace from the device-side segments, then the persistent warp-specialized kernel walks the
// (group, tile) pairs. Both scale tensors are K-major (a row's K blocks are adjacent): the
// activation quantizer writes [rows, K blocks] and DeepSeek-V3's `weight_scale_inv` is
// [N blocks, K blocks] per expert, so one pointer per group addresses either.
#include "moe/cuda/gemm/sm90_fp8_gemm_impl.cuh"

#include "cutlass/detail/blockwise_scale_layout.hpp"

namespace moe::cuda::gemm {
namespace sm90_detail {
namespace {

template <int TM, int TN, int CN>
struct Fp8BlockGemmT {
  // One 128-wide K block per k-tile: one promotion per k-tile.
  using TileShape = cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::Int<CN>, cute::_1>;
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kFp8ScaleBlock, kFp8ScaleBlock,
                                                                cute::GMMA::Major::K, cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
  using Epilogue = Fp8Epilogue<TileShape, ClusterShape, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Fp8Code, cute::tuple<RowMajor*, LayoutSFA*>, kFp8AlignCodes,
      Fp8Code, cute::tuple<ColumnMajor*, LayoutSFB*>, kFp8AlignCodes, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// Of the tiles tried on the H200 (benchmarks/NOTES.md, "FP8 prefill"): 128x128 with clusters of
// two along N (each A tile multicast to both) was 1-6% faster than single-CTA clusters on the
// prefill rows; 64x128 ping-pong lost 5-25% at M >= 4096, 256x128 twice as slow (spills).
using Fp8BlockGemm = Fp8BlockGemmT<128, 128, 2>;

struct Fp8Descriptors {
  using G = Fp8BlockGemm;
  Fp8Operands<G> ops;
  const float** ptr_sfa;
  const float** ptr_sfb;
  G::LayoutSFA* layout_sfa;
  G::LayoutSFB* layout_sfb;
};

Fp8Descriptors carve_fp8(std::uintptr_t base, int groups, std::size_t* used) {
  DescriptorCarver c{base};
  Fp8Descriptors d;
  d.ops.carve(c, groups);
  d.ptr_sfa = c.take<const float*>(groups);
  d.ptr_sfb = c.take<const float*>(groups);
  d.layout_sfa = c.take<Fp8BlockGemm::LayoutSFA>(groups);
  d.layout_sfb = c.take<Fp8BlockGemm::LayoutSFB>(groups);
  *used = c.used;
  return d;
}

__global__ void describe_fp8_groups_kernel(Sm90Fp8GemmArgs a, Fp8Descriptors d) {
  using G = Fp8BlockGemm;
  const int g = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (g >= a.num_experts * a.halves) return;
  const Fp8Group grp = set_fp8_group<G>(a, g, d.ops);
  const Index k_blocks = (a.k + kFp8ScaleBlock - 1) / kFp8ScaleBlock;
  const Index n_blocks = (a.n + kFp8ScaleBlock - 1) / kFp8ScaleBlock;
  d.ptr_sfa[g] = a.a_scales + grp.begin * k_blocks;
  d.ptr_sfb[g] = a.w_scales + grp.expert * a.w_scales_expert_stride + grp.half * n_blocks * k_blocks;
  const auto shape = cute::make_shape(grp.rows, static_cast<int>(a.n), static_cast<int>(a.k), 1);
  d.layout_sfa[g] = G::ScaleConfig::tile_atom_to_shape_SFA(shape);
  d.layout_sfb[g] = G::ScaleConfig::tile_atom_to_shape_SFB(shape);
}

typename Fp8BlockGemm::Gemm::Arguments make_fp8_arguments(const Fp8Descriptors& d, int groups, int sm_count) {
  const auto& o = d.ops;
  return grouped_arguments<Fp8BlockGemm::Gemm>(
      groups, o.shapes, {o.ptr_a, o.stride_a, o.ptr_b, o.stride_b, d.ptr_sfa, d.layout_sfa, d.ptr_sfb, d.layout_sfb},
      o.ptr_d, o.stride_d, sm_count);
}

}  // namespace

std::size_t fp8_block_gemm_workspace_bytes(int num_groups, int sm_count) {
  std::size_t desc = 0;
  const Fp8Descriptors d = carve_fp8(0, num_groups, &desc);  // sizes only
  return desc + align256(Fp8BlockGemm::Gemm::get_workspace_size(make_fp8_arguments(d, num_groups, sm_count)));
}

Status fp8_block_gemm(const Sm90Fp8GemmArgs& a, std::span<std::byte> workspace, int sm_count, cudaStream_t stream) {
  const int groups = a.num_experts * a.halves;
  std::size_t desc_bytes = 0;
  const Fp8Descriptors d = carve_fp8(reinterpret_cast<std::uintptr_t>(workspace.data()), groups, &desc_bytes);
  auto args = make_fp8_arguments(d, groups, sm_count);
  const std::size_t need = desc_bytes + align256(Fp8BlockGemm::Gemm::get_workspace_size(args));
  if (workspace.size() < need) {
    return invalid_argument("workspace: ", workspace.size(), " bytes, the FP8 block-scaled grouped GEMM needs ", need);
  }
  describe_fp8_groups_kernel<<<(groups + 127) / 128, 128, 0, stream>>>(a, d);
  MOE_CUDA_CHECK_LAUNCH();
  return run_cutlass<Fp8BlockGemm::Gemm>(args, workspace.data() + desc_bytes, stream, "sm90_fp8_gemm (block-scaled)",
                                         a.n, a.k);
}

}  // namespace sm90_detail
}  // namespace moe::cuda::gemm
