// Shape and layout checks shared by every backend's validation. Each returns a Status whose
// message names the argument, the expected shape (with the meaning of each dimension) and the
// shape it got.
#pragma once

#include <array>
#include <optional>
#include <sstream>
#include <string_view>

#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::detail {

// One expected dimension: its meaning ("M", "2*I") and value.
struct Dim {
  std::string_view label;
  Index value;
};

template <std::size_t N>
std::string describe(const std::array<Dim, N>& dims) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < N; ++i) os << (i ? ", " : "") << dims[i].label << '=' << dims[i].value;
  os << ']';
  return os.str();
}

template <class View, std::size_t N>
Status expect_shape(const View& v, std::string_view name, const std::array<Dim, N>& dims) {
  static_assert(View::kRank == static_cast<int>(N), "expect_shape: rank of the expectation differs from the view");
  for (std::size_t d = 0; d < N; ++d) {
    if (v.extent(static_cast<int>(d)) != dims[d].value) {
      return invalid_argument(name, ": expected shape ", describe(dims), ", got ", format_shape(v.extents()));
    }
  }
  if (v.size() > 0 && v.data() == nullptr) {
    return invalid_argument(name, ": null data pointer for a non-empty tensor of shape ", format_shape(v.extents()));
  }
  if (!v.is_row_contiguous()) {
    return invalid_argument(name, ": the last dimension must be contiguous (stride 1), got stride ",
                            v.stride(View::kRank - 1));
  }
  for (int d = 0; d < View::kRank; ++d) {
    if (v.stride(d) < 0) return invalid_argument(name, ": negative stride in dimension ", d);
  }
  return Status::ok();
}

template <class View, std::size_t N>
Status expect_shape(const std::optional<View>& v, std::string_view name, const std::array<Dim, N>& dims) {
  return v ? expect_shape(*v, name, dims) : Status::ok();
}

template <class View>
Status expect_contiguous(const View& v, std::string_view name) {
  if (!v.is_contiguous()) return invalid_argument(name, ": expected a contiguous row-major tensor");
  return Status::ok();
}

}  // namespace moe::detail
