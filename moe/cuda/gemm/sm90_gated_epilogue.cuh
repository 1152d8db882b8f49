// GEMM1's gated activation in the Hopper grouped GEMM's epilogue, for w13 rows interleaved
// (gate row 2c, up row 2c + 1).
//
// Why that layout: a wgmma accumulator fragment gives each thread the columns 8j + 2q and
// 8j + 2q + 1 of its rows (q = lane % 4), so with interleaved rows every thread holds the gate and
// the up value of the same intermediate column side by side, for any tile width. The epilogue
// evaluates the library's GEMM1 tree (moe/epilogue.h: both rounded to the storage type, activated,
// rounded again) on each pair and stores the one value at column n / 2: GEMM1's raw [rows, 2I]
// output is never written and the activation pass never runs (benchmarks/NOTES.md).
//
// The class has the interface of CUTLASS's DefaultEpilogueArray (a register epilogue of the
// ptr-array kernels, no shared memory) and is wrapped in Sm90TmaWarpSpecializedAdapter, as
// CUTLASS's builder wraps that one. Included by sm90_grouped_gemm_impl.cuh only.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "moe/activation.h"
#include "moe/cuda/gemm/sm90_grouped_gemm.h"
#include "moe/epilogue.h"

namespace moe::cuda::gemm::sm90_detail {

// The library's GEMM1 tree for activation A over one (gate, up) accumulator pair.
template <class A>
CUTLASS_DEVICE float gemm1_tree(float gate, float up, const typename A::Arguments& args) {
  epilogue::ElementContext<A> ctx;
  ctx.args = args;
  ctx.acc[1] = gate;
  ctx.acc[2] = up;
  return epilogue::Gemm1Epilogue<A, bfloat16, false>::eval(ctx);
}

// A the activation (compile time: inlined at each of a tile's outputs, with the instruction-level
// parallelism a call per output lacked).
template <class A>
class GatedActivationEpilogue {
 public:
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  using ElementD = cutlass::bfloat16_t;
  using ElementC = void;
  using ElementOutput = ElementD;
  using ElementAccumulator = float;
  // Named by CUTLASS's device adapter only (its EpilogueOutputOp alias); never evaluated.
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<ElementD, 1, float, float>;
  using InternalStrideD = cute::Stride<std::int64_t, cute::Int<1>, cute::Int<0>>;  // row-major [rows, n / 2]
  using StrideD = InternalStrideD*;
  using InternalStrideC = InternalStrideD;
  using StrideC = StrideD;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;

  struct Arguments {
    ElementD** ptr_d = nullptr;
    InternalStrideD* stride_d = nullptr;
    GatedEpilogue activation = GatedEpilogue::kSiluAndMul;
    SwigluOai::Arguments swiglu{};
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(const ProblemShape&, const Arguments& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static std::size_t get_workspace_size(const ProblemShape&, const Arguments&, int) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(const ProblemShape&, const Arguments&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(const ProblemShape&, const Arguments& args) {
    return args.activation != GatedEpilogue::kNone;
  }

  CUTLASS_HOST_DEVICE explicit GatedActivationEpilogue(const Params& p) : params_(p) {}
  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl, const cute::Tensor<FrgEngine, FrgLayout>& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    static_assert(is_static<FrgLayout>::value, "moe gated epilogue: the accumulator layout must be static");
    // The fragment is (V, MMA_M, MMA_N) with V = (2 columns, 2 rows, J column groups of 8): the
    // wgmma accumulator layout. Thread q = lane % 4 holds columns 8j + 2q and 8j + 2q + 1.
    constexpr int kV = size<0>(FrgLayout{});
    constexpr int kJ = kV / 4;
    constexpr int kMmaM = size<1>(FrgLayout{}), kMmaN = size<2>(FrgLayout{});
    static_assert(kV % 16 == 0, "moe gated epilogue: column groups come in fours (wgmma N >= 32)");
    const int m_size = static_cast<int>(get<0>(problem_shape_mnkl));
    const int n_size = static_cast<int>(get<1>(problem_shape_mnkl));
    const int out_cols = n_size / 2;
    const auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    // Each accumulator's (row, column) within the group's [m, n] problem.
    const Tensor tile = local_tile(make_identity_tensor(make_shape(m_size, n_size)), take<0, 2>(blk_shape_mnk),
                                   make_coord(m_coord, n_coord));
    const Tensor coords = tiled_mma.get_thread_slice(thread_idx).partition_C(tile);
    CUTE_STATIC_ASSERT_V(size(coords) == size(accumulators));
    auto* d = reinterpret_cast<std::uint16_t*>(params_.ptr_d[l_coord]);
    const std::int64_t ldd = get<0>(params_.stride_d[l_coord]);
    const int q = thread_idx % 4;
    // Per row of the fragment: activate the J pairs (gate 8j + 2q, up 8j + 2q + 1 -> output
    // column 4j + q), then two butterfly exchanges in the quad (lanes ^ 1, ^ 2) so that each
    // thread holds four consecutive outputs, 16kk + 4q .. + 3: one 8-byte store, and the quad's
    // four stores fill one 32-byte sector of the row (2-byte stores of single outputs ran the
    // forward at half speed: partial-sector writes).
    CUTLASS_PRAGMA_UNROLL
    for (int nn = 0; nn < kMmaN; ++nn) {
      CUTLASS_PRAGMA_UNROLL
      for (int mm = 0; mm < kMmaM; ++mm) {
        CUTLASS_PRAGMA_UNROLL
        for (int half = 0; half < 2; ++half) {  // rows g and g + 8
          const int base = kV * (mm + kMmaM * nn) + 2 * half;
          const int m = get<0>(coords(base));
          const int col0 = (get<1>(coords(base)) - 2 * q) / 2;  // output column of j = 0, q = 0
          std::uint32_t pair[kJ / 2];                           // bf16 bits of outputs j, j + 1
          CUTLASS_PRAGMA_UNROLL
          for (int jj = 0; jj < kJ / 2; ++jj) {
            const int i0 = base + 4 * (2 * jj), i1 = i0 + 4;
            pair[jj] = bits_of(accumulators(i0), accumulators(i0 + 1)) |
                       (bits_of(accumulators(i1), accumulators(i1 + 1)) << 16);
          }
          // Exchange 1 (lane ^ 1): even q keeps outputs 8jj + q, + 1; odd q 8jj + 4 + q - 1, + q.
          CUTLASS_PRAGMA_UNROLL
          for (int jj = 0; jj < kJ / 2; ++jj) {
            const std::uint32_t other = __shfl_xor_sync(0xffffffffu, pair[jj], 1);
            pair[jj] = (q & 1) == 0 ? (pair[jj] & 0xffffu) | (other << 16) : (other >> 16) | (pair[jj] & 0xffff0000u);
          }
          // Exchange 2 (lane ^ 2): q < 2 keeps the pair group 2kk with its partner's, q >= 2 group
          // 2kk + 1; thread q then holds outputs 16kk + 4q .. 16kk + 4q + 3.
          CUTLASS_PRAGMA_UNROLL
          for (int kk = 0; kk < kJ / 4; ++kk) {
            const bool low = (q & 2) == 0;
            const std::uint32_t other = __shfl_xor_sync(0xffffffffu, low ? pair[2 * kk + 1] : pair[2 * kk], 2);
            const std::uint32_t first = low ? pair[2 * kk] : other, second = low ? other : pair[2 * kk + 1];
            const int col = col0 + 16 * kk + 4 * q;
            if (m >= m_size || col >= out_cols) continue;
            std::uint16_t* dst = d + static_cast<std::int64_t>(m) * ldd + col;
            if (col + 4 <= out_cols) {
              *reinterpret_cast<uint2*>(dst) = make_uint2(first, second);
            } else {  // the problem's last columns (n not a multiple of 8 outputs)
              const std::uint16_t v[4] = {static_cast<std::uint16_t>(first), static_cast<std::uint16_t>(first >> 16),
                                          static_cast<std::uint16_t>(second), static_cast<std::uint16_t>(second >> 16)};
              for (int e = 0; e < 4 && col + e < out_cols; ++e) dst[e] = v[e];
            }
          }
        }
      }
    }
  }

 private:
  CUTLASS_DEVICE std::uint32_t bits_of(float gate, float up) const {
    typename A::Arguments args{};
    if constexpr (std::is_same_v<A, SwigluOai>) args = params_.swiglu;
    return __bfloat16_as_ushort(__float2bfloat16_rn(gemm1_tree<A>(gate, up, args)));  // rounded: exact
  }

  Params params_;
};

template <class A>
using GatedActivationCollective = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<GatedActivationEpilogue<A>>;

}  // namespace moe::cuda::gemm::sm90_detail
