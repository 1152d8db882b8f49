// Shared pieces of the standalone CUDA ops (moe/cuda/ops.cuh documents the ops): launch shapes,
// workspace carving, host copies for checked mode, and small device helpers.
#pragma once

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "moe/cuda/check.h"
#include "moe/cuda/radix_bits.h"
#include "moe/detail/workspace.h"
#include "moe/detail/op_checks.h"
#include "moe/detail/validate.h"
#include "moe/expert_map.h"
#include "moe/quant/numeric.h"
#include "moe/routing.h"
#include "moe/status.h"
#include "moe/op_sizes.h"
#include "moe/tensor.h"

namespace moe::cuda {

template <class T, int R>
using OptDeviceView = std::optional<DeviceView<T, R>>;

using ::moe::AlignSizes;
using ::moe::moe_align_block_size_sizes;
using ::moe::moe_permute_rows;
using ::moe::ReplicaChoice;
namespace ops_detail {

using ::moe::detail::Dim;
using ::moe::detail::expect_shape;
using ::moe::detail::format_shape;

constexpr int kThreads = 256;
constexpr int kRowThreads = 128;
constexpr Index kMaxGrid = Index{1} << 20;  // every kernel is grid-stride: any grid size is correct
constexpr std::size_t kAlign = 256;

inline unsigned grid_for(Index n, int per_block) {
  return static_cast<unsigned>(std::clamp<Index>((n + per_block - 1) / per_block, 1, kMaxGrid));
}

MOE_HOST_DEVICE Index round_up_hd(Index x, Index m) { return (x + m - 1) / m * m; }
MOE_DEVICE Index global_thread() { return static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; }
MOE_DEVICE Index grid_threads() { return static_cast<Index>(gridDim.x) * blockDim.x; }

// Workspace layout: 256-byte aligned regions from a base the op aligns itself (moe/detail/workspace.h).
using Carve = moe::detail::WorkspaceCarver<kAlign>;
inline std::byte* aligned_base(std::byte* p) { return Carve::aligned_base(p); }
template <class T>
T* at(std::byte* base, std::size_t off) {
  return reinterpret_cast<T*>(base + off);
}
inline std::size_t count_of(Index n) { return static_cast<std::size_t>(std::max<Index>(0, n)); }

inline Status check_workspace(std::span<std::byte> workspace, std::size_t need, const char* fn) {
  if (workspace.size() < need) {
    return make_status(StatusCode::kWorkspaceTooSmall, "workspace: expected at least ", need, " bytes (", fn,
                       "()), got ", workspace.size());
  }
  return Status::ok();
}

// Bits of a radix key whose values are in [0, num_keys).

// CUB temp storage for a stable sort of n (uint32 key, int32 value) pairs on `bits` key bits.
// A size query only: no device work.
inline Status sort_temp_bytes(Index n, int bits, std::size_t* bytes) {
  *bytes = 0;
  if (n <= 0) return Status::ok();
  MOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, *bytes, static_cast<const std::uint32_t*>(nullptr),
                                               static_cast<std::uint32_t*>(nullptr),
                                               static_cast<const std::int32_t*>(nullptr),
                                               static_cast<std::int32_t*>(nullptr), static_cast<int>(n), 0, bits));
  return Status::ok();
}

// Checked mode: device views to packed host vectors, on `stream` (the caller synchronizes).
template <class T>
Status copy_to_host(DeviceView<const T, 1> v, std::vector<std::remove_const_t<T>>* out, cudaStream_t stream) {
  out->resize(count_of(v.extent(0)));
  if (out->empty()) return Status::ok();
  if (out->size() == 1 || v.stride(0) == 1) {
    MOE_CUDA_TRY(cudaMemcpyAsync(out->data(), v.data(), out->size() * sizeof(T), cudaMemcpyDeviceToHost, stream));
  } else {
    MOE_CUDA_TRY(cudaMemcpy2DAsync(out->data(), sizeof(T), v.data(), v.stride(0) * sizeof(T), sizeof(T), out->size(),
                                   cudaMemcpyDeviceToHost, stream));
  }
  return Status::ok();
}
template <class T>
Status copy_to_host(DeviceView<const T, 2> v, std::vector<std::remove_const_t<T>>* out, cudaStream_t stream) {
  const Index rows = v.extent(0), cols = v.extent(1);
  out->resize(count_of(rows * cols));
  if (out->empty()) return Status::ok();
  if (rows == 1 || v.stride(0) == cols) {
    MOE_CUDA_TRY(cudaMemcpyAsync(out->data(), v.data(), out->size() * sizeof(T), cudaMemcpyDeviceToHost, stream));
  } else {
    MOE_CUDA_TRY(cudaMemcpy2DAsync(out->data(), cols * sizeof(T), v.data(), v.stride(0) * sizeof(T), cols * sizeof(T),
                                   rows, cudaMemcpyDeviceToHost, stream));
  }
  return Status::ok();
}

// Largest e in [0, n) with starts[e] <= r, for r in [starts[0], starts[n]) (starts ascending).
MOE_DEVICE Index segment_of(const Index* starts, Index n, Index r) {
  Index lo = 0, hi = n;
  while (hi - lo > 1) {
    const Index mid = lo + (hi - lo) / 2;
    if (starts[mid] <= r) lo = mid;
    else hi = mid;
  }
  return lo;
}

// out += w * x with one rounding per operation, never contracted to an FMA: the CPU op's
// `acc += w * x` compiled without FMA contraction, so both give the same bits.
MOE_DEVICE float mul_add_rn(float acc, float w, float x) { return __fadd_rn(acc, __fmul_rn(w, x)); }

}  // namespace ops_detail
}  // namespace moe::cuda
