// CUTLASS 3 sm90 ptr-array grouped GEMM with blockwise-scaled FP8 operands, behind
// moe/cuda/gemm/sm90_fp8_block_gemm.h. Its one instantiation lives here.
//
// Per launch, as for the 16-bit grouped GEMM (sm90_grouped_gemm_impl.cuh): a one-thread-per-group
// kernel writes CUTLASS's per-group problem shapes, pointers, strides and scale layouts into our
// workspace from the device-side segments, then the persistent warp-specialized kernel walks the
// (group, tile) pairs. Both scale tensors are K-major (a row's K blocks are adjacent): the
// activation quantizer writes [rows, K blocks] and DeepSeek-V3's `weight_scale_inv` is
// [N blocks, K blocks] per expert, so one pointer per group addresses either.
#include "moe/cuda/gemm/sm90_fp8_block_gemm.h"

#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "moe/cuda/gemm/sm90_grouped_gemm_impl.cuh"

namespace moe::cuda::gemm {
namespace sm90_detail {
namespace {

template <int TM, int TN, int CN>
struct Fp8BlockGemmT {
  using E4M3 = cutlass::float_e4m3_t;
  using Out = cutlass::bfloat16_t;
  // One 128-wide K block per k-tile: one promotion per k-tile.
  using TileShape = cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::Int<CN>, cute::_1>;
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kFp8ScaleBlock, kFp8ScaleBlock,
                                                                cute::GMMA::Major::K, cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
  static constexpr int kAlignCodes = 16;  // 16 bytes of 8-bit codes
  static constexpr int kAlignOut = 8;     // 16 bytes of bf16

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, RowMajor*, kAlignOut, Out, RowMajor*,
      kAlignOut, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<Out, float, void>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E4M3, cute::tuple<RowMajor*, LayoutSFA*>, kAlignCodes, E4M3,
      cute::tuple<ColumnMajor*, LayoutSFB*>, kAlignCodes, float, TileShape, ClusterShape,
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
  typename ProblemShape::UnderlyingProblemShape* shapes;
  const G::E4M3** ptr_a;
  const G::E4M3** ptr_b;
  G::Out** ptr_d;
  G::StrideA* stride_a;
  G::StrideB* stride_b;
  G::StrideD* stride_d;
  const float** ptr_sfa;
  const float** ptr_sfb;
  G::LayoutSFA* layout_sfa;
  G::LayoutSFB* layout_sfb;
};

Fp8Descriptors carve_fp8(std::uintptr_t base, int groups, std::size_t* used) {
  DescriptorCarver c{base};
  Fp8Descriptors d;
  d.shapes = c.take<std::remove_pointer_t<decltype(d.shapes)>>(groups);
  d.ptr_a = c.take<const Fp8BlockGemm::E4M3*>(groups);
  d.ptr_b = c.take<const Fp8BlockGemm::E4M3*>(groups);
  d.ptr_d = c.take<Fp8BlockGemm::Out*>(groups);
  d.stride_a = c.take<Fp8BlockGemm::StrideA>(groups);
  d.stride_b = c.take<Fp8BlockGemm::StrideB>(groups);
  d.stride_d = c.take<Fp8BlockGemm::StrideD>(groups);
  d.ptr_sfa = c.take<const float*>(groups);
  d.ptr_sfb = c.take<const float*>(groups);
  d.layout_sfa = c.take<Fp8BlockGemm::LayoutSFA>(groups);
  d.layout_sfb = c.take<Fp8BlockGemm::LayoutSFB>(groups);
  *used = c.used;
  return d;
}

__global__ void describe_fp8_groups_kernel(Sm90Fp8BlockGemmArgs a, Fp8Descriptors d) {
  using G = Fp8BlockGemm;
  const int g = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (g >= a.num_experts * a.halves) return;
  const int e = g / a.halves, h = g % a.halves;
  const Index begin = a.seg_begin[e];
  const int rows = static_cast<int>(a.seg_count[e]);
  const int n = static_cast<int>(a.n), k = static_cast<int>(a.k);
  const Index k_blocks = (a.k + kFp8ScaleBlock - 1) / kFp8ScaleBlock;
  const Index n_blocks = (a.n + kFp8ScaleBlock - 1) / kFp8ScaleBlock;
  d.shapes[g] = {rows, n, k};
  d.ptr_a[g] = static_cast<const G::E4M3*>(a.a) + begin * a.lda;
  d.ptr_b[g] = static_cast<const G::E4M3*>(a.w) + e * a.w_expert_stride + h * a.n * a.ldw;
  d.ptr_d[g] = static_cast<G::Out*>(a.d) + begin * a.ldd + h * a.n;
  d.stride_a[g] = ld_stride<G::StrideA>(a.lda);
  d.stride_b[g] = ld_stride<G::StrideB>(a.ldw);
  d.stride_d[g] = ld_stride<G::StrideD>(a.ldd);
  d.ptr_sfa[g] = a.a_scales + begin * k_blocks;
  d.ptr_sfb[g] = a.w_scales + e * a.w_scales_expert_stride + h * n_blocks * k_blocks;
  d.layout_sfa[g] = G::ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(rows, n, k, 1));
  d.layout_sfb[g] = G::ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(rows, n, k, 1));
}

typename Fp8BlockGemm::Gemm::Arguments make_fp8_arguments(const Fp8Descriptors& d, int groups, int sm_count) {
  return grouped_arguments<Fp8BlockGemm::Gemm>(
      groups, d.shapes, {d.ptr_a, d.stride_a, d.ptr_b, d.stride_b, d.ptr_sfa, d.layout_sfa, d.ptr_sfb, d.layout_sfb},
      d.ptr_d, d.stride_d, sm_count);
}

}  // namespace
}  // namespace sm90_detail

const char* sm90_fp8_block_gemm_refusal(const Sm90Fp8BlockGemmArgs& a) {
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  if (a.halves != 1 && a.halves != 2) return "halves must be 1 or 2";
  if (a.num_experts <= 0 || a.num_experts > (1 << 20)) return "the expert count must be in [1, 2^20]";
  if (a.n <= 0 || a.k <= 0 || a.n > INT32_MAX / 2 || a.k > INT32_MAX) return "n and k must be positive int32 extents";
  if (!a.a || !a.w || !a.d || !a.a_scales || !a.w_scales || !a.seg_begin || !a.seg_count) return "a null operand";
  if (!aligned(a.a) || !aligned(a.w) || !aligned(a.d)) return "codes and output need 16-byte aligned bases (TMA)";
  if (a.k % 16 != 0 || a.lda % 16 != 0 || a.ldw % 16 != 0 || a.w_expert_stride % 16 != 0) {
    return "k and the code strides must be multiples of 16 (16-byte rows of FP8 codes)";
  }
  if (a.n % 8 != 0 || a.ldd % 8 != 0) return "n and ldd must be multiples of 8 (16-byte rows of bf16)";
  return nullptr;
}

std::size_t sm90_fp8_block_gemm_workspace_bytes(int num_groups) {
  using namespace sm90_detail;
  const int sms = std::max(1, sm_count_of_current_device());
  std::size_t desc = 0;
  const Fp8Descriptors d = carve_fp8(0, num_groups, &desc);  // sizes only
  return desc + align256(Fp8BlockGemm::Gemm::get_workspace_size(make_fp8_arguments(d, num_groups, sms)));
}

Status sm90_fp8_block_gemm(const Sm90Fp8BlockGemmArgs& a, std::span<std::byte> workspace, cudaStream_t stream) {
  using namespace sm90_detail;
  if (const char* why = sm90_fp8_block_gemm_refusal(a)) return invalid_argument("sm90_fp8_block_gemm: ", why);
  const int sm_count = sm_count_of_current_device();
  if (sm_count <= 0) return make_status(StatusCode::kCudaError, "sm90_fp8_block_gemm: no device multiprocessor count");
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
  return run_cutlass<Fp8BlockGemm::Gemm>(args, workspace.data() + desc_bytes, stream, "sm90_fp8_block_gemm", a.n,
                                         a.k);
}

}  // namespace moe::cuda::gemm
