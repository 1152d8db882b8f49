// CUTLASS 3 sm90 ptr-array grouped GEMM behind moe/cuda/gemm/sm90_grouped_gemm.h. Included by the
// per-element-type translation units only (sm90_grouped_gemm_bf16.cu, _f16.cu): every CUTLASS
// instantiation of the library lives there.
//
// Per launch: a one-thread-per-group kernel turns the device-side segments (seg_begin, seg_count)
// into CUTLASS's per-group problem shapes, pointers and strides inside our workspace, then the
// persistent warp-specialized kernel walks the (group, tile) pairs. Problem shapes stay on the
// device (no host copy), so the tile scheduler reads them there.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "moe/cuda/check.h"
#include "moe/cuda/gemm/sm90_grouped_gemm.h"

namespace moe::cuda::gemm::sm90_detail {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

// One CUTLASS kernel type per (element, tile, orientation, cluster, schedule). Swap computes
// D^T = W * X^T: A is the expert's weights, B the token rows, D written column-major, i.e.
// row-major [rows, n]. A cluster of CM x CN CTAs multicasts each operand tile to the CTAs that
// share it; Pingpong gives each consumer warpgroup its own tile (one's epilogue overlaps the
// other's mainloop) where Cooperative splits one tile between the two.
template <class T, int TM, int TN, int TK, bool Swap, int CM = 1, int CN = 1, bool Pingpong = false>
struct GemmType {
  using TileShape = cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::Int<TK>>;
  using ClusterShape = cute::Shape<cute::Int<CM>, cute::Int<CN>, cute::_1>;
  using LayoutA = RowMajor;                                   // both orientations: K contiguous
  using LayoutB = ColumnMajor;                                // [N, K] with K contiguous
  using LayoutD = std::conditional_t<Swap, ColumnMajor, RowMajor>;
  static constexpr int kAlign = 8;                            // 16 bytes of 16-bit elements
  using KernelSchedule = std::conditional_t<Pingpong, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                                            cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>;
  using EpilogueSchedule = std::conditional_t<Pingpong, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                                              cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlign, T, LayoutD*, kAlign,
      EpilogueSchedule, cutlass::epilogue::fusion::LinearCombination<T, float, void>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, LayoutA*, kAlign, T, LayoutB*, kAlign, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// A stride whose one dynamic mode is the leading dimension `ld` (the other modes are static).
template <class Stride>
__device__ __forceinline__ Stride ld_stride(std::int64_t ld) {
  Stride s{};
  if constexpr (cute::is_static<cute::remove_cvref_t<decltype(cute::get<0>(s))>>::value) {
    cute::get<1>(s) = ld;
  } else {
    cute::get<0>(s) = ld;
  }
  return s;
}

inline std::size_t align256(std::size_t v) { return (v + 255) / 256 * 256; }

// Consecutive 256-byte aligned arrays in a workspace at `base` (an address; 0 to size them only).
struct DescriptorCarver {
  std::uintptr_t base = 0;
  std::size_t used = 0;
  template <class T>
  T* take(int count) {
    auto* p = reinterpret_cast<T*>(base + used);
    used += align256(static_cast<std::size_t>(count) * sizeof(T));
    return p;
  }
};

// The per-group operands every ptr-array grouped GEMM of the library takes, as arrays inside the
// workspace: problem shapes, A/B/D pointers and strides (the FP8 GEMMs carve their scales after
// them). Written on the device from the segments, one thread per group.
template <class G, class ElementA, class ElementB, class ElementD>
struct GroupOperands {
  typename ProblemShape::UnderlyingProblemShape* shapes;
  const ElementA** ptr_a;
  const ElementB** ptr_b;
  ElementD** ptr_d;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;

  void carve(DescriptorCarver& c, int groups) {
    shapes = c.take<typename ProblemShape::UnderlyingProblemShape>(groups);
    ptr_a = c.take<const ElementA*>(groups);
    ptr_b = c.take<const ElementB*>(groups);
    ptr_d = c.take<ElementD*>(groups);
    stride_a = c.take<typename G::StrideA>(groups);
    stride_b = c.take<typename G::StrideB>(groups);
    stride_d = c.take<typename G::StrideD>(groups);
  }
  // Group g: D (m x n, leading dimension ldd) = A (m x k) x B (n x k)^T, A and B K-major.
  __device__ void set(int g, int m, int n, int k, const ElementA* a, Index lda, const ElementB* b, Index ldb,
                      ElementD* d, Index ldd) const {
    shapes[g] = {m, n, k};
    ptr_a[g] = a;
    ptr_b[g] = b;
    ptr_d[g] = d;
    stride_a[g] = ld_stride<typename G::StrideA>(lda);
    stride_b[g] = ld_stride<typename G::StrideB>(ldb);
    stride_d[g] = ld_stride<typename G::StrideD>(ldd);
  }
};

// The 16-bit grouped GEMM's descriptors: one element type for every operand.
template <class G>
using Descriptors = GroupOperands<G, typename G::Gemm::ElementA, typename G::Gemm::ElementA, typename G::Gemm::ElementA>;

// The descriptors' places in a workspace at `base` and the bytes they take.
template <class G>
Descriptors<G> carve(std::uintptr_t base, int groups, std::size_t* used) {
  DescriptorCarver c{base};
  Descriptors<G> d;
  d.carve(c, groups);
  *used = c.used;
  return d;
}

template <class G, bool Swap>
__global__ void describe_groups_kernel(Sm90GroupedGemmArgs args, Descriptors<G> d) {
  using T = typename G::Gemm::ElementA;
  const int g = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (g >= args.num_groups) return;
  const Index begin = args.seg_begin[g];
  const int rows = static_cast<int>(args.seg_count[g]);
  const T* x = static_cast<const T*>(args.a) + begin * args.lda;
  const T* w = static_cast<const T*>(args.w) + static_cast<Index>(g) * args.w_group_stride;
  T* out = static_cast<T*>(args.d) + begin * args.ldd;
  const int n = static_cast<int>(args.n), k = static_cast<int>(args.k);
  if constexpr (Swap) {  // D^T = W X^T, written column-major
    d.set(g, n, rows, k, w, args.ldw, x, args.lda, out, args.ldd);
  } else {
    d.set(g, rows, n, k, x, args.lda, w, args.ldw, out, args.ldd);
  }
}

inline int sm_count_of_current_device() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  return sms;
}

// The arguments of every grouped GEMM of the library: device-side problem shapes, D = the
// accumulators (alpha 1, no C), the mainloop's own operands.
template <class Gemm, class Shapes, class PtrD, class StrideD>
typename Gemm::Arguments grouped_arguments(int groups, Shapes* shapes,
                                           const typename Gemm::GemmKernel::MainloopArguments& mainloop, PtrD ptr_d,
                                           StrideD* stride_d, int sm_count) {
  typename Gemm::Arguments args;
  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = sm_count;
  decltype(args.epilogue.thread) fusion;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  args = typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                                  {groups, shapes, nullptr},
                                  mainloop,
                                  {fusion, nullptr, stride_d, ptr_d, stride_d},
                                  hw};
  return args;
}

template <class G, bool Swap>
typename G::Gemm::Arguments make_arguments(const Descriptors<G>& d, int groups, int sm_count) {
  return grouped_arguments<typename G::Gemm>(groups, d.shapes, {d.ptr_a, d.stride_a, d.ptr_b, d.stride_b}, d.ptr_d,
                                             d.stride_d, sm_count);
}

template <class G, bool Swap>
std::size_t workspace_bytes(int groups, int sm_count) {
  std::size_t desc = 0;
  const Descriptors<G> d = carve<G>(0, groups, &desc);  // sizes only, nothing written
  return desc + align256(G::Gemm::get_workspace_size(make_arguments<G, Swap>(d, groups, sm_count)));
}

// CUTLASS's checks, initialize and launch of one grouped GEMM whose descriptors are written.
template <class Gemm>
Status run_cutlass(const typename Gemm::Arguments& args, std::byte* cutlass_workspace, cudaStream_t stream,
                   const char* name, Index n, Index k) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
    return unsupported(name, ": CUTLASS cannot run n=", n, " k=", k);
  }
  if (gemm.initialize(args, cutlass_workspace, stream) != cutlass::Status::kSuccess) {
    return make_status(StatusCode::kCudaError, name, ": CUTLASS initialize failed");
  }
  if (gemm.run(stream) != cutlass::Status::kSuccess) {
    return make_status(StatusCode::kCudaError, name, ": CUTLASS launch failed: ", cudaGetErrorString(cudaGetLastError()));
  }
  MOE_CUDA_CHECK_LAUNCH();
  return Status::ok();
}

template <class G, bool Swap>
Status run(const Sm90GroupedGemmArgs& a, std::span<std::byte> workspace, cudaStream_t stream) {
  const int sm_count = sm_count_of_current_device();
  if (sm_count <= 0) return make_status(StatusCode::kCudaError, "sm90_grouped_gemm: no device multiprocessor count");
  std::size_t desc_bytes = 0;
  const Descriptors<G> d = carve<G>(reinterpret_cast<std::uintptr_t>(workspace.data()), a.num_groups, &desc_bytes);
  auto args = make_arguments<G, Swap>(d, a.num_groups, sm_count);
  const std::size_t need = desc_bytes + align256(G::Gemm::get_workspace_size(args));
  if (workspace.size() < need) {
    return invalid_argument("workspace: ", workspace.size(), " bytes, the sm90 grouped GEMM needs ", need);
  }
  describe_groups_kernel<G, Swap><<<(a.num_groups + 127) / 128, 128, 0, stream>>>(a, d);
  MOE_CUDA_CHECK_LAUNCH();
  return run_cutlass<typename G::Gemm>(args, workspace.data() + desc_bytes, stream, "sm90_grouped_gemm", a.n, a.k);
}

// The tile table of schedule.h, for one element type.
template <class T>
struct Tiles {
  using Normal128x256 = GemmType<T, 128, 256, 64, false>;
  using Swap128x64 = GemmType<T, 128, 64, 64, true>;
  using Swap128x32 = GemmType<T, 128, 32, 128, true>;
  using Swap128x16 = GemmType<T, 128, 16, 128, true>;
  // The ping-pong tiles are instantiated for bf16 only (two fewer heavy instantiations in CI's
  // cold build); f16 runs the cooperative 128x256 tile where the table picks them.
  static constexpr bool kPingpong = std::is_same_v<T, cutlass::bfloat16_t>;
  using Pingpong64x256 = GemmType<T, 64, 256, 64, false, 1, 1, true>;
  using Pingpong128x128 = GemmType<T, 128, 128, 64, false, 1, 2, true>;

  static Status dispatch(const Sm90GroupedGemmArgs& a, Sm90Tile tile, std::span<std::byte> ws, cudaStream_t s) {
    switch (tile) {
      case Sm90Tile::kNormal128x256: return run<Normal128x256, false>(a, ws, s);
      case Sm90Tile::kSwap128x64: return run<Swap128x64, true>(a, ws, s);
      case Sm90Tile::kSwap128x32: return run<Swap128x32, true>(a, ws, s);
      case Sm90Tile::kSwap128x16: return run<Swap128x16, true>(a, ws, s);
      case Sm90Tile::kPingpong64x256:
        if constexpr (kPingpong) return run<Pingpong64x256, false>(a, ws, s);
        else return run<Normal128x256, false>(a, ws, s);
      case Sm90Tile::kPingpong128x128:
        if constexpr (kPingpong) return run<Pingpong128x128, false>(a, ws, s);
        else return run<Normal128x256, false>(a, ws, s);
      default: break;
    }
    return invalid_argument("tile: unknown Sm90Tile ", static_cast<int>(tile));
  }
  static std::size_t workspace(int groups, int sm_count) {
    std::size_t pingpong = 0;
    if constexpr (kPingpong) {
      pingpong = std::max(workspace_bytes<Pingpong64x256, false>(groups, sm_count),
                          workspace_bytes<Pingpong128x128, false>(groups, sm_count));
    }
    return std::max({pingpong, workspace_bytes<Normal128x256, false>(groups, sm_count),
                     workspace_bytes<Swap128x64, true>(groups, sm_count),
                     workspace_bytes<Swap128x32, true>(groups, sm_count),
                     workspace_bytes<Swap128x16, true>(groups, sm_count)});
  }
};

}  // namespace moe::cuda::gemm::sm90_detail
