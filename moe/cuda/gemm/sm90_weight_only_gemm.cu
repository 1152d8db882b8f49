// The mixed-input grouped GEMM's entry points (moe/cuda/gemm/sm90_weight_only_gemm.h): checks, the
// tile per problem, and the scale layout kernel. The CUTLASS instantiations live in
// sm90_weight_only_gemm_<codes>_<tile>.cu (sm90_weight_only_gemm_impl.cuh).
#include "moe/cuda/gemm/sm90_weight_only_gemm.h"

#include <cuda_bf16.h>

#include "cutlass/bfloat16.h"

#include <algorithm>

#include "moe/cuda/check.h"

namespace moe::cuda::gemm {
namespace sm90_detail {

template <int TM, int TN, int CM, Sm90WeightOnlyCodes kCodes>
std::size_t weight_only_tile_workspace(int experts, Index n, Index k, Index group_size);
template <int TM, int TN, int CM, Sm90WeightOnlyCodes kCodes>
Status run_weight_only_tile(const Sm90WeightOnlyGemmArgs& a, std::span<std::byte> workspace, cudaStream_t stream);
Status write_weight_only_scales(const Sm90WeightOnlyGemmArgs& a, Index groups, float* scales, float* zeros,
                                cudaStream_t stream);
Status write_weight_only_scales(const Sm90WeightOnlyGemmArgs& a, Index groups, cutlass::bfloat16_t* scales,
                                std::nullptr_t zeros, cudaStream_t stream);

namespace {

// scales[e, g, c] = bf16(scale[e, c, g]) (as a float, or as bf16 where `Out` is), zeros[e, g, c] =
// -float(z) * float(scales[e, g, c]) where zeros is not null: a 32 x 32 (column, group) tile per
// block through shared memory, so both sides are coalesced.
constexpr int kTransposeTile = 32;
template <class Out>
__global__ void __launch_bounds__(kTransposeTile * 8)
    scale_zero_layout_kernel(const float* scale, const std::uint8_t* zero, unsigned default_zero, int n, int groups,
                             Out* scales, float* zeros) {
  __shared__ float s_tile[kTransposeTile][kTransposeTile + 1];
  __shared__ float z_tile[kTransposeTile][kTransposeTile + 1];
  const int e = static_cast<int>(blockIdx.z);
  const int c0 = static_cast<int>(blockIdx.x) * kTransposeTile, g0 = static_cast<int>(blockIdx.y) * kTransposeTile;
  const std::size_t expert = static_cast<std::size_t>(e) * static_cast<std::size_t>(n) * static_cast<std::size_t>(groups);
  for (int i = static_cast<int>(threadIdx.y); i < kTransposeTile; i += blockDim.y) {
    const int c = c0 + i, g = g0 + static_cast<int>(threadIdx.x);
    if (c < n && g < groups) {
      const std::size_t at = expert + static_cast<std::size_t>(c) * groups + g;
      const float s = __bfloat162float(__float2bfloat16_rn(scale[at]));
      const unsigned z = (zero ? zero[at] : default_zero) & 0xFu;
      s_tile[i][threadIdx.x] = s;
      z_tile[i][threadIdx.x] = -static_cast<float>(z) * s;
    }
  }
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.y); i < kTransposeTile; i += blockDim.y) {
    const int g = g0 + i, c = c0 + static_cast<int>(threadIdx.x);
    if (c < n && g < groups) {
      const std::size_t at = expert + static_cast<std::size_t>(g) * n + c;
      scales[at] = static_cast<Out>(s_tile[threadIdx.x][i]);  // exact: already a bf16 value
      if (zeros) zeros[at] = z_tile[threadIdx.x][i];
    }
  }
}

template <class Out>
Status layout_scales(const Sm90WeightOnlyGemmArgs& a, Index groups, Out* scales, float* zeros, cudaStream_t stream) {
  const dim3 tiles(static_cast<unsigned>((a.n + kTransposeTile - 1) / kTransposeTile),
                   static_cast<unsigned>((groups + kTransposeTile - 1) / kTransposeTile),
                   static_cast<unsigned>(a.num_experts));
  scale_zero_layout_kernel<<<tiles, dim3(kTransposeTile, 8), 0, stream>>>(
      a.scale, a.zero, a.default_zero, static_cast<int>(a.n), static_cast<int>(groups), scales, zeros);
  MOE_CUDA_CHECK_LAUNCH();
  return Status::ok();
}

}  // namespace

Status write_weight_only_scales(const Sm90WeightOnlyGemmArgs& a, Index groups, float* scales, float* zeros,
                                cudaStream_t stream) {
  return layout_scales(a, groups, scales, zeros, stream);
}
Status write_weight_only_scales(const Sm90WeightOnlyGemmArgs& a, Index groups, cutlass::bfloat16_t* scales,
                                std::nullptr_t, cudaStream_t stream) {
  return layout_scales(a, groups, scales, static_cast<float*>(nullptr), stream);
}

}  // namespace sm90_detail
namespace {

Index groups_of(Index k, Index group_size) { return group_size > 0 ? (k + group_size - 1) / group_size : 1; }

// The token tile, from the H200 runs (benchmarks/NOTES.md, "W4A16 prefill on the mixed-input
// wgmma GEMM"): 32 tokens up to 16 rows per expert (qwen3 M = 256: 367 µs against 457 with 128),
// 128 from 32 rows (qwen3 M = 1024: 498 against 563 with 64; deepseek M = 1024: 6474 against
// 7014 with 32). A 64-token tile won no row. 256 from 192 rows: 10-20% faster where segments reach
// 256 rows (mixtral M = 4096: 4718 µs against 5768 with 128; "W4A16 prefill: two's-complement
// codes and bf16 scales").
int token_tile(Index rows_per_expert) {
  return rows_per_expert <= 24 ? 32 : rows_per_expert <= 192 ? 128 : 256;
}

}  // namespace

const char* sm90_weight_only_gemm_refusal(const Sm90WeightOnlyGemmArgs& a) {
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  if (a.num_experts <= 0 || a.num_experts > (1 << 20)) return "the expert count must be in [1, 2^20]";
  if (a.n <= 0 || a.k <= 0 || a.n > INT32_MAX || a.k > INT32_MAX / 2) return "n and k must be positive int32 extents";
  if (!a.a || !a.w || !a.d || !a.scale || !a.seg_begin || !a.seg_count) return "a null operand";
  if (a.signed_codes && a.zero) return "two's-complement codes take no zero points";
  if (a.group_size < 0 || (a.group_size > 0 && a.group_size < a.k && a.group_size % 64 != 0)) {
    return "scale groups must be multiples of 64 K elements (the mixed-input GEMM's K tile) or span K";
  }
  const Index groups = groups_of(a.k, a.group_size);
  if (static_cast<double>(a.num_experts) * static_cast<double>(a.n) * static_cast<double>(groups) > INT32_MAX) {
    return "E * n * groups must fit int32";
  }
  if (!aligned(a.a) || !aligned(a.w) || !aligned(a.d)) return "operands need 16-byte aligned bases (TMA)";
  if (!aligned(a.bias)) return "the bias rows need a 16-byte aligned base";
  if (a.k % 32 != 0 || a.ldw % 16 != 0 || a.w_expert_stride % 16 != 0) {
    return "k must be a multiple of 32 and the code strides of 16 bytes";
  }
  if (a.n % 8 != 0 || a.lda % 8 != 0 || a.ldd % 8 != 0) return "n and the row strides must be multiples of 8 (16-byte rows)";
  return nullptr;
}

namespace {

// The instantiations (weight rows, tokens, cluster, code kind), from the H200 tile runs of session
// 20 (benchmarks/NOTES.md, "W4A16 prefill: the tile's weight rows and clusters"). With 128 tokens,
// 256 weight rows (two 128-row halves, one per consumer warpgroup): each code is still converted
// once per 128 tokens, and each token tile loaded serves twice the weight rows; 8-12% faster from
// 32 to 192 rows per expert on two's-complement codes (qwen3 M = 1024 424 -> 382 µs, gpt-oss
// M = 4096 2472 -> 2244, deepseek M = 4096 8438 -> 7587, mixtral M = 256 740 -> 650), 5-10% on
// offset codes. With 256 tokens, clusters of two CTAs along the weight rows share each token tile:
// 2-5% faster above 192 rows on two's-complement codes (mixtral M = 16384 18218 -> 17927,
// deepseek M = 16384 22787 -> 21669); offset codes ran 128 tokens there before, and this tile is
// 14-32% faster (mixtral M = 16384 27204 -> 18418).
template <class F>
auto with_tile(Index rows_per_expert, Sm90WeightOnlyCodes codes, F&& f) {
  using enum Sm90WeightOnlyCodes;
  const auto tile = [&]<Sm90WeightOnlyCodes kCodes>() {
    switch (token_tile(rows_per_expert)) {
      case 32: return f.template operator()<128, 32, 1, kCodes>();
      case 128: return f.template operator()<256, 128, 1, kCodes>();
      default: return f.template operator()<128, 256, 2, kCodes>();
    }
  };
  return codes == kTwosComplement ? tile.template operator()<kTwosComplement>() : tile.template operator()<kOffset>();
}

}  // namespace

std::size_t sm90_weight_only_gemm_workspace_bytes(int num_experts, Index n, Index k, Index group_size,
                                                  Index rows_per_expert, Sm90WeightOnlyCodes codes) {
  return with_tile(rows_per_expert, codes, [&]<int TM, int TN, int CM, Sm90WeightOnlyCodes kCodes>() {
    return sm90_detail::weight_only_tile_workspace<TM, TN, CM, kCodes>(num_experts, n, k, group_size);
  });
}

Status sm90_weight_only_gemm(const Sm90WeightOnlyGemmArgs& a, std::span<std::byte> workspace, cudaStream_t stream) {
  if (const char* why = sm90_weight_only_gemm_refusal(a)) return invalid_argument("sm90_weight_only_gemm: ", why);
  return with_tile(a.rows_per_expert, a.codes(), [&]<int TM, int TN, int CM, Sm90WeightOnlyCodes kCodes>() {
    return sm90_detail::run_weight_only_tile<TM, TN, CM, kCodes>(a, workspace, stream);
  });
}

}  // namespace moe::cuda::gemm
