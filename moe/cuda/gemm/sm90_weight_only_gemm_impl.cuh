// The mixed-input grouped GEMM of moe/cuda/gemm/sm90_weight_only_gemm.h, templated on the tile.
// Included by one translation unit per tile (sm90_weight_only_gemm_<codes>_<tile>.cu), each holding
// one CUTLASS instantiation, so that they compile in parallel.
//
// Per launch: (1) write_weight_only_scales (sm90_weight_only_gemm.cu) lays the scales and zero
// points out as the collective reads them ([E, groups, n] floats) in the workspace, (2) a
// one-thread-per-expert kernel writes CUTLASS's per-group problem shapes, pointers and strides from
// the device-side segments, (3) the persistent warp-specialized kernel walks the (expert, tile)
// pairs. The codes are read as stored: CUTLASS's uint4b_t packs element 0 in the low nibble, as
// moe/quant/weight_only.h does.
#pragma once

#include "moe/cuda/gemm/sm90_grouped_gemm_impl.cuh"  // CUTLASS's builders first
#include "cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "moe/cuda/gemm/sm90_weight_only_gemm.h"

namespace moe::cuda::gemm::sm90_detail {

// CUTLASS 4.2's ptr-array mixed-input collective, in its scale-and-zero mode, prepares only the
// zero points' TMA descriptor per SM and per group, never the scales' (its example 69 README:
// zero points are not supported in grouped GEMMs yet), so the scale loads would go through an
// uninitialized descriptor. This is that collective with the scales' descriptor set up the same
// way at each step the kernel calls: copied into shared memory, re-pointed and re-shaped per
// group, released and acquired.
template <class Base>
struct ScaledZeroedMixedInput : Base {
  using typename Base::Params;
  using typename Base::TensorMapStorage;
  static_assert(Base::KernelConversionMode == Base::ConversionMode::ConvertAndScaleWithZero);
  static_assert(!Base::SwapAB, "the quantized operand is A: the scales run along M");

  CUTLASS_DEVICE auto tensormaps_init(Params const& p, TensorMapStorage& maps, int32_t sm_count, int32_t sm_idx) {
    auto descriptors = Base::tensormaps_init(p, maps, sm_count, sm_idx);
    if (cute::elect_one_sync()) {
      auto from = cute::make_tensor(p.tma_load_scale.get_tma_descriptor(), cute::Int<1>{}, cute::Int<1>{});
      auto to = cute::make_tensor(cute::make_smem_ptr(&maps.smem_tensormap_scale), cute::Int<1>{}, cute::Int<1>{});
      cute::copy(cute::recast<cute::uint128_t>(from), cute::recast<cute::uint128_t>(to));
    }
    __syncwarp();
    return descriptors;
  }

  template <class... TMs, class ProblemShapeMNKL>
  CUTLASS_DEVICE void tensormaps_perform_update(TensorMapStorage& maps, Params const& p,
                                                cute::tuple<TMs...> const& descriptors, ProblemShapeMNKL shape,
                                                int32_t next_group) {
    Base::tensormaps_perform_update(maps, p, descriptors, shape, next_group);
    if (cute::elect_one_sync()) {
      cute::tma_descriptor_replace_addr_in_shared_mem(maps.smem_tensormap_scale, p.ptr_S[next_group]);
      // The scales' [rows of the quantized operand, K groups] extents and strides, as the zeros'.
      const uint32_t rows = cute::get<0>(shape), k = cute::get<2>(shape);
      const auto* no_data = static_cast<float const*>(nullptr);
      auto scales = cute::make_tensor(cutlass::gemm::collective::detail::get_logical_ptr(no_data),
                                      cute::make_shape(rows, cute::ceil_div(k, p.chunk_size), cute::Int<1>{}),
                                      p.dS[next_group]);
      cute::array<uint32_t, 5> extents = {1, 1, 1, 1, 1};
      cute::array<uint64_t, 5> strides = {0, 0, 0, 0, 0};
      cute::detail::fill_tma_gmem_shape_stride(p.tma_load_scale, scales, extents, strides);
      for (uint64_t& stride : strides) stride *= sizeof(float);  // TMA strides are in bytes
      cute::tma_descriptor_replace_dims_strides_in_shared_mem(maps.smem_tensormap_scale, extents, strides);
    }
  }

  template <class... TMs>
  CUTLASS_DEVICE void tensormaps_cp_fence_release(TensorMapStorage& maps, cute::tuple<TMs...> const& descriptors) {
    Base::tensormaps_cp_fence_release(maps, descriptors);
    cute::tma_descriptor_cp_fence_release(cute::get<2>(descriptors), maps.smem_tensormap_scale);
  }

  template <class... TMs>
  CUTLASS_DEVICE void tensormaps_fence_acquire(cute::tuple<TMs...> const& descriptors) {
    Base::tensormaps_fence_acquire(descriptors);
    cute::tma_descriptor_fence_acquire(cute::get<2>(descriptors));
  }
};

// The weights are the wgmma's register operand (A: the collective dequantizes them there), so the
// product is computed transposed, D^T = W * X^T, as the swap tiles of the 16-bit GEMM: weight rows
// on M (128, two consumer warpgroups), token rows on N, D column-major = row-major [rows, n].
//
// Two conversions, both giving the reference's bits:
//  - offset codes with zero points (kOffset): uint4 codes, fp32 scales s and zeros z' = -z * s;
//    q * s + z' is exact in fp32 and rounded once to bf16;
//  - two's-complement codes (kTwosComplement): int4 codes become bf16 exactly (one prmt, lop3 and
//    subtraction per pair), times the bf16 scale rounds once; half the registers and shared
//    memory per scale, no zeros, and about half the conversion instructions or less.
// (MXFP4 cannot run here: the collective takes one scale per row and K tile, and its K tile is at
// least 64, two E8M0 groups.)
// The epilogue adds the expert's bias row (a column of D^T; -0.0 where there is none, so that
// sums of -0.0 stay -0.0 as the reference's) to the fp32 sums and rounds once.
//
// The tile is TM weight rows x TN tokens x 64 K (128 bytes of bf16 per token row); kClusterM CTAs
// on neighbouring weight tiles share each token tile through TMA multicast, which halves the token
// rows' traffic from L2 (at TN = 256 a stage holds 32 KB of tokens against 4 KB of codes).
template <int TM, int TN, int kClusterM, Sm90WeightOnlyCodes kCodes>
struct WeightOnlyGemmT {
  static constexpr bool kZeroPoints = kCodes == Sm90WeightOnlyCodes::kOffset;
  using Mma = cutlass::bfloat16_t;
  using Codes = std::conditional_t<kZeroPoints, cutlass::uint4b_t, cutlass::int4b_t>;
  using Scale = std::conditional_t<kZeroPoints, float, cutlass::bfloat16_t>;
  using TileShape = cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::Int<64>>;
  using ClusterShape = cute::Shape<cute::Int<kClusterM>, cute::_1, cute::_1>;
  static constexpr int kAlignCodes = 32;  // 16 bytes of 4-bit codes
  static constexpr int kAlignRows = 8;    // 16 bytes of bf16

  // D = bf16(acc + bias[e, m]): the bias is a column of D^T, one row of [E, n] per group (the
  // ptr-array epilogue's L coordinate is the group).
  using BiasColumn = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, Mma, float,
                                                                 cute::Stride<cute::_1, cute::_0, int64_t>>;
  using BiasAdd = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, Mma, float, cutlass::FloatRoundStyle::round_to_nearest>,
      cutlass::epilogue::fusion::Sm90AccFetch, BiasColumn>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, ColumnMajor*, kAlignRows, Mma, ColumnMajor*,
      kAlignRows, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, BiasAdd>::CollectiveOp;
  using Operand = std::conditional_t<kZeroPoints, cute::tuple<Codes, Scale, Scale>, cute::tuple<Codes, Scale>>;
  using Collective = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Operand, RowMajor*, kAlignCodes, Mma, ColumnMajor*,
      kAlignRows, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Mainloop = std::conditional_t<kZeroPoints, ScaledZeroedMixedInput<Collective>, Collective>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using StrideScale = typename Mainloop::StrideScale;
};

inline Index weight_only_groups(Index k, Index group_size) { return group_size > 0 ? (k + group_size - 1) / group_size : 1; }
// K elements per scale, as the collective's chunk_size: one group over K where group_size is 0 or
// at least K.
inline int weight_only_chunk(Index k, Index group_size) {
  return static_cast<int>(group_size > 0 && group_size < k ? group_size : k);
}

// Lays scale[e, c, g] (rounded to bf16) and its zero point out as [e, g, c]: float scales and
// -z * scale, or (two's-complement codes, `zeros` null) bf16 scales (sm90_weight_only_gemm.cu).
Status write_weight_only_scales(const Sm90WeightOnlyGemmArgs& a, Index groups, float* scales, float* zeros,
                                cudaStream_t stream);
Status write_weight_only_scales(const Sm90WeightOnlyGemmArgs& a, Index groups, cutlass::bfloat16_t* scales,
                                std::nullptr_t zeros, cudaStream_t stream);

template <class G>
struct WeightOnlyDescriptors {
  typename ProblemShape::UnderlyingProblemShape* shapes;
  const typename G::Codes** ptr_w;
  const typename G::Mma** ptr_x;
  typename G::Mma** ptr_d;
  typename G::StrideA* stride_w;
  typename G::StrideB* stride_x;
  typename G::StrideD* stride_d;
  const typename G::Scale** ptr_scale;
  const typename G::Scale** ptr_zero;  // offset codes only
  typename G::StrideScale* stride_scale;
  typename G::Scale* scales;  // [E, groups, n]
  std::conditional_t<G::kZeroPoints, float*, std::nullptr_t> zeros;  // [E, groups, n]
};

template <class G>
WeightOnlyDescriptors<G> carve_weight_only(std::uintptr_t base, int experts, Index n, Index groups, std::size_t* used) {
  DescriptorCarver c{base};
  WeightOnlyDescriptors<G> d;
  d.shapes = c.take<std::remove_pointer_t<decltype(d.shapes)>>(experts);
  d.ptr_w = c.take<const typename G::Codes*>(experts);
  d.ptr_x = c.take<const typename G::Mma*>(experts);
  d.ptr_d = c.take<typename G::Mma*>(experts);
  d.stride_w = c.take<typename G::StrideA>(experts);
  d.stride_x = c.take<typename G::StrideB>(experts);
  d.stride_d = c.take<typename G::StrideD>(experts);
  d.ptr_scale = c.take<const typename G::Scale*>(experts);
  d.stride_scale = c.take<typename G::StrideScale>(experts);
  const int per_expert = static_cast<int>(groups * n);  // the refusal keeps E * n * groups in int32
  d.scales = c.take<typename G::Scale>(experts * per_expert);
  if constexpr (G::kZeroPoints) {
    d.ptr_zero = c.take<const float*>(experts);
    d.zeros = c.take<float>(experts * per_expert);
  } else {
    d.ptr_zero = nullptr;
    d.zeros = nullptr;
  }
  *used = c.used;
  return d;
}

template <class G>
__global__ void describe_weight_only_groups_kernel(Sm90WeightOnlyGemmArgs a, int groups, WeightOnlyDescriptors<G> d) {
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e >= a.num_experts) return;
  const Index begin = a.seg_begin[e];
  const int rows = static_cast<int>(a.seg_count[e]);
  const int n = static_cast<int>(a.n), k = static_cast<int>(a.k);
  d.shapes[e] = {n, rows, k};
  // uint4b_t pointers address bytes; the strides count codes.
  d.ptr_w[e] = reinterpret_cast<const typename G::Codes*>(a.w + e * a.w_expert_stride);
  d.ptr_x[e] = static_cast<const typename G::Mma*>(a.a) + begin * a.lda;
  d.ptr_d[e] = static_cast<typename G::Mma*>(a.d) + begin * a.ldd;
  d.stride_w[e] = ld_stride<typename G::StrideA>(2 * a.ldw);
  d.stride_x[e] = ld_stride<typename G::StrideB>(a.lda);
  d.stride_d[e] = ld_stride<typename G::StrideD>(a.ldd);
  const Index per_expert = static_cast<Index>(groups) * a.n;
  d.ptr_scale[e] = d.scales + e * per_expert;
  if constexpr (G::kZeroPoints) d.ptr_zero[e] = d.zeros + e * per_expert;
  typename G::StrideScale s{};
  cute::get<1>(s) = a.n;  // [groups, n]: n contiguous
  cute::get<2>(s) = per_expert;
  d.stride_scale[e] = s;
}

// CUTLASS's arguments: device-side problem shapes, the mainloop's operands, and the epilogue's bias
// (a row of [E, n] per group; null: -0.0, which leaves every sum as it is).
template <class G>
typename G::Gemm::Arguments make_weight_only_arguments(const WeightOnlyDescriptors<G>& d, int experts, int chunk,
                                                       const void* bias, Index n, int sm_count) {
  using Arguments = typename G::Gemm::Arguments;
  const auto mainloop = [&]() -> typename G::Gemm::GemmKernel::MainloopArguments {
    if constexpr (G::kZeroPoints) {
      return {d.ptr_w, d.stride_w, d.ptr_x, d.stride_x, d.ptr_scale, d.stride_scale, chunk, d.ptr_zero};
    } else {
      return {d.ptr_w, d.stride_w, d.ptr_x, d.stride_x, d.ptr_scale, d.stride_scale, chunk};
    }
  }();
  decltype(Arguments{}.epilogue.thread) fusion{};
  fusion.op_1 = {static_cast<const typename G::Mma*>(bias), typename G::Mma(-0.0f),
                          {cute::_1{}, cute::_0{}, static_cast<int64_t>(n)}};
  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = sm_count;
  return Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                   {experts, d.shapes, nullptr},
                   mainloop,
                   {fusion, nullptr, d.stride_d, d.ptr_d, d.stride_d},
                   hw};
}

template <int TM, int TN, int CM, Sm90WeightOnlyCodes kCodes>
std::size_t weight_only_tile_workspace(int experts, Index n, Index k, Index group_size) {
  using G = WeightOnlyGemmT<TM, TN, CM, kCodes>;
  const int sms = std::max(1, sm_count_of_current_device());
  std::size_t desc = 0;
  const auto d = carve_weight_only<G>(0, experts, n, weight_only_groups(k, group_size), &desc);  // sizes only
  return desc + align256(G::Gemm::get_workspace_size(
                    make_weight_only_arguments(d, experts, weight_only_chunk(k, group_size), nullptr, n, sms)));
}

template <int TM, int TN, int CM, Sm90WeightOnlyCodes kCodes>
Status run_weight_only_tile(const Sm90WeightOnlyGemmArgs& a, std::span<std::byte> workspace, cudaStream_t stream) {
  using G = WeightOnlyGemmT<TM, TN, CM, kCodes>;
  const int sm_count = sm_count_of_current_device();
  if (sm_count <= 0) return make_status(StatusCode::kCudaError, "sm90_weight_only_gemm: no device multiprocessor count");
  const Index groups = weight_only_groups(a.k, a.group_size);
  std::size_t desc_bytes = 0;
  const auto d = carve_weight_only<G>(reinterpret_cast<std::uintptr_t>(workspace.data()), a.num_experts, a.n, groups,
                                      &desc_bytes);
  auto args = make_weight_only_arguments(d, a.num_experts, weight_only_chunk(a.k, a.group_size), a.bias, a.n, sm_count);
  const std::size_t need = desc_bytes + align256(G::Gemm::get_workspace_size(args));
  if (workspace.size() < need) {
    return invalid_argument("workspace: ", workspace.size(), " bytes, the weight-only grouped GEMM needs ", need);
  }
  MOE_RETURN_IF_ERROR(write_weight_only_scales(a, groups, d.scales, d.zeros, stream));
  describe_weight_only_groups_kernel<G><<<(a.num_experts + 127) / 128, 128, 0, stream>>>(a, static_cast<int>(groups), d);
  MOE_CUDA_CHECK_LAUNCH();
  return run_cutlass<typename G::Gemm>(args, workspace.data() + desc_bytes, stream, "sm90_weight_only_gemm", a.n, a.k);
}

// One translation unit per tile (weight rows x tokens, cluster) and code layout instantiates these
// (sm90_weight_only_gemm_<codes>_<tile>.cu).
#define MOE_SM90_WEIGHT_ONLY_TILE(TM, TN, CM, CODES)                                                             \
  template std::size_t weight_only_tile_workspace<TM, TN, CM, Sm90WeightOnlyCodes::CODES>(int, Index, Index, Index); \
  template Status run_weight_only_tile<TM, TN, CM, Sm90WeightOnlyCodes::CODES>(const Sm90WeightOnlyGemmArgs&,        \
                                                                             std::span<std::byte>, cudaStream_t);

}  // namespace moe::cuda::gemm::sm90_detail
