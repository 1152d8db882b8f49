// Carving one caller-given workspace into aligned regions: the one carver of the CPU kernel, the
// CUDA kernel, the standalone CUDA ops and the device layer.
//
// `take(bytes)` hands out offsets from an aligned base; total() includes kAlignment bytes of slack,
// so any span of total() bytes works whatever its start address: the user of the layout aligns
// the span's start with aligned_base() and adds the offsets to it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moe::detail {

template <std::size_t kAlignment>
struct WorkspaceCarver {
  static_assert((kAlignment & (kAlignment - 1)) == 0, "WorkspaceCarver: the alignment is a power of two");
  std::size_t off = 0;

  std::size_t take(std::size_t bytes) {
    const std::size_t at = off;
    off += (bytes + kAlignment - 1) / kAlignment * kAlignment;
    return at;
  }
  // Bytes a workspace needs for what was taken (0 when nothing was).
  std::size_t total() const { return off == 0 ? 0 : off + kAlignment; }

  static std::byte* aligned_base(std::byte* p) {
    const auto u = reinterpret_cast<std::uintptr_t>(p);
    return p + (kAlignment - u % kAlignment) % kAlignment;
  }
};

}  // namespace moe::detail
