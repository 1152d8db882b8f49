// CUTLASS 3 sm90 ptr-array grouped GEMM on FP8 codes with per-tensor scales (kPerTensor), behind
// moe/cuda/gemm/sm90_fp8_gemm.h: the sums stay in the tensor cores' FP8 accumulator across K
// (no per-block promotion: no scale varies along K), and one alpha per group, the activation
// scale times the expert's weight scale, scales the accumulators in the epilogue.
#include "moe/cuda/gemm/sm90_fp8_gemm_impl.cuh"

#include <algorithm>
#include <type_traits>

namespace moe::cuda::gemm {
namespace sm90_detail {
namespace {

// One CUTLASS kernel type per tile: TM x TN x 128 tiles in clusters of CN along N; the two consumer
// warpgroups share each tile (cooperative) or own one each (ping-pong: one's epilogue runs under
// the other's mainloop).
template <int TM, int TN, int CN, bool Pingpong>
struct Fp8TensorGemmT {
  using TileShape = cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::Int<CN>, cute::_1>;
  using EpilogueSchedule = std::conditional_t<Pingpong, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                                              cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
  using KernelSchedule =
      std::conditional_t<Pingpong, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8FastAccum,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8FastAccum>;
  using Epilogue = Fp8Epilogue<TileShape, ClusterShape, EpilogueSchedule>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Fp8Code, RowMajor*, kFp8AlignCodes, Fp8Code, ColumnMajor*,
      kFp8AlignCodes, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

template <class G>
struct TensorDescriptors {
  Fp8Operands<G> ops;
  float* alpha;  // per group: activation scale x the expert's weight scale
};

template <class G>
TensorDescriptors<G> carve_tensor(std::uintptr_t base, int groups, std::size_t* used) {
  DescriptorCarver c{base};
  TensorDescriptors<G> d;
  d.ops.carve(c, groups);
  d.alpha = c.take<float>(groups);
  *used = c.used;
  return d;
}

template <class G>
__global__ void describe_tensor_groups_kernel(Sm90Fp8GemmArgs a, TensorDescriptors<G> d) {
  const int g = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (g >= a.num_experts * a.halves) return;
  const Fp8Group grp = set_fp8_group<G>(a, g, d.ops);
  d.alpha[g] = a.a_scales[0] * a.w_scales[grp.expert * a.w_scales_expert_stride];
}

template <class G>
typename G::Gemm::Arguments make_tensor_arguments(const TensorDescriptors<G>& d, int groups, int sm_count) {
  const auto& o = d.ops;
  auto args = grouped_arguments<typename G::Gemm>(groups, o.shapes, {o.ptr_a, o.stride_a, o.ptr_b, o.stride_b}, o.ptr_d,
                                                  o.stride_d, sm_count);
  args.epilogue.thread.alpha_ptr = d.alpha;  // alpha_ptr[group]: a stride of one along L
  args.epilogue.thread.dAlpha = {cute::_0{}, cute::_0{}, 1};
  return args;
}

template <class G>
std::size_t workspace_of(int groups, int sm_count) {
  std::size_t desc = 0;
  const auto d = carve_tensor<G>(0, groups, &desc);  // sizes only
  return desc + align256(G::Gemm::get_workspace_size(make_tensor_arguments(d, groups, sm_count)));
}

template <class G>
Status run_tensor(const Sm90Fp8GemmArgs& a, std::span<std::byte> workspace, int sm_count, cudaStream_t stream) {
  const int groups = a.num_experts * a.halves;
  std::size_t desc_bytes = 0;
  const auto d = carve_tensor<G>(reinterpret_cast<std::uintptr_t>(workspace.data()), groups, &desc_bytes);
  auto args = make_tensor_arguments(d, groups, sm_count);
  const std::size_t need = desc_bytes + align256(G::Gemm::get_workspace_size(args));
  if (workspace.size() < need) {
    return invalid_argument("workspace: ", workspace.size(), " bytes, the FP8 per-tensor grouped GEMM needs ", need);
  }
  describe_tensor_groups_kernel<G><<<(groups + 127) / 128, 128, 0, stream>>>(a, d);
  MOE_CUDA_CHECK_LAUNCH();
  return run_cutlass<typename G::Gemm>(args, workspace.data() + desc_bytes, stream, "sm90_fp8_gemm (per-tensor)", a.n,
                                       a.k);
}

// The two tiles of fp8_tensor_tile_for (sm90_fp8_gemm.h), single-CTA clusters. Of the
// configurations tried on the H200 (benchmarks/NOTES.md, "FP8 per-tensor prefill" and "FP8
// per-tensor prefill tiles"): the cooperative 128x256 tile without clusters was as fast as or
// 1-6% faster than in clusters of two along N on 9 of 12 prefill rows; 128x128 ping-pong (with and
// without clusters) won no row by more than the noise; 256x128 in clusters of two along M was up to
// 2.4x slower.
using Fp8TensorCooperative = Fp8TensorGemmT<128, 256, 1, false>;
using Fp8TensorPingpong = Fp8TensorGemmT<64, 256, 1, true>;

}  // namespace

std::size_t fp8_tensor_gemm_workspace_bytes(int num_groups, int sm_count) {
  return std::max(workspace_of<Fp8TensorCooperative>(num_groups, sm_count),
                  workspace_of<Fp8TensorPingpong>(num_groups, sm_count));
}

Status fp8_tensor_gemm(const Sm90Fp8GemmArgs& a, std::span<std::byte> workspace, int sm_count, cudaStream_t stream) {
  return a.tile == Fp8Tile::kPingpong64x256 ? run_tensor<Fp8TensorPingpong>(a, workspace, sm_count, stream)
                                            : run_tensor<Fp8TensorCooperative>(a, workspace, sm_count, stream);
}

}  // namespace sm90_detail
}  // namespace moe::cuda::gemm
