// Run-time-typed tensors: what callers whose dtypes and shapes come from files, configs or other
// languages hold (the safetensors reader, the layer, the tool, a future DLPack binding), and
// bind(), which checks one against a typed view. Host code only; the typed views of
// moe/tensor.h are what kernels take.
#pragma once

#include <array>
#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "moe/status.h"
#include "moe/tensor.h"

namespace moe {

// A tensor whose dtype and rank are run-time values. bind() turns it into a typed view.
struct AnyTensor {
  void* data = nullptr;
  DType dtype = DType::kF32;
  std::vector<Index> extents;
  std::vector<Index> strides;  // empty: row-major contiguous
};

namespace detail {
inline std::string format_shape(const std::vector<Index>& e) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < e.size(); ++i) os << (i ? ", " : "") << e[i];
  os << ']';
  return os.str();
}
}  // namespace detail

// Checks `t` has element type T and rank Rank, then writes the typed view to `*out`.
// The error names `name`, the expected and the actual dtype/rank.
template <class T, int Rank, class Space = HostSpace>
Status bind(const AnyTensor& t, std::string_view name, TensorView<T, Rank, Space>* out) {
  if (t.dtype != dtype_of<T>) {
    return invalid_argument(name, ": expected dtype ", to_string(dtype_of<T>), ", got ", to_string(t.dtype));
  }
  if (static_cast<int>(t.extents.size()) != Rank) {
    return invalid_argument(name, ": expected rank ", Rank, ", got rank ", t.extents.size(), " (shape ",
                            detail::format_shape(t.extents), ")");
  }
  if (!t.strides.empty() && t.strides.size() != t.extents.size()) {
    return invalid_argument(name, ": strides has ", t.strides.size(), " entries for rank ", t.extents.size());
  }
  for (Index e : t.extents) {
    if (e < 0) return invalid_argument(name, ": negative extent in shape ", detail::format_shape(t.extents));
  }
  if (reinterpret_cast<std::uintptr_t>(t.data) % alignof(T) != 0) {  // a typed view would read misaligned
    return invalid_argument(name, ": data is not aligned to ", alignof(T), " bytes");
  }
  std::array<Index, Rank> e{};
  for (int d = 0; d < Rank; ++d) e[d] = t.extents[d];
  T* data = static_cast<T*>(t.data);
  if (t.strides.empty()) {
    *out = TensorView<T, Rank, Space>(data, e);
  } else {
    std::array<Index, Rank> s{};
    for (int d = 0; d < Rank; ++d) s[d] = t.strides[d];
    *out = TensorView<T, Rank, Space>(data, e, s);
  }
  return Status::ok();
}

}  // namespace moe
