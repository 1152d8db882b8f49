// Eigen views of moe tensors, used by the CPU backend.
#pragma once

#include <Eigen/Core>

#include "moe/quant/numeric.h"
#include "moe/tensor.h"

namespace moe::cpu {

using MatrixRM = ::Eigen::Matrix<float, ::Eigen::Dynamic, ::Eigen::Dynamic, ::Eigen::RowMajor>;
using ArrayRM = ::Eigen::Array<float, ::Eigen::Dynamic, ::Eigen::Dynamic, ::Eigen::RowMajor>;
using StridedMap = ::Eigen::Map<MatrixRM, 0, ::Eigen::OuterStride<>>;
using ConstStridedMap = ::Eigen::Map<const MatrixRM, 0, ::Eigen::OuterStride<>>;
// A block whose columns may be spaced (interleaved gate/up): Stride<row stride, column step>.
using ConstSpacedArray = ::Eigen::Map<const ArrayRM, 0, ::Eigen::Stride<::Eigen::Dynamic, ::Eigen::Dynamic>>;

// An Eigen map of a float matrix view (rows may be padded; columns contiguous).
inline ConstStridedMap as_eigen(HostView<const float, 2> v) {
  return ConstStridedMap(v.data(), v.extent(0), v.extent(1), ::Eigen::OuterStride<>(v.stride(0)));
}
inline StridedMap as_eigen(HostView<float, 2> v) {
  return StridedMap(v.data(), v.extent(0), v.extent(1), ::Eigen::OuterStride<>(v.stride(0)));
}

// Converts a [rows, cols] matrix of storage type T to dense float (row stride `cols`).
template <class T>
void convert_to_float(HostView<const T, 2> src, float* dst) {
  const Index rows = src.extent(0), cols = src.extent(1);
  for (Index r = 0; r < rows; ++r) {
    const T* s = &src(r, 0);
    float* d = dst + r * cols;
    for (Index c = 0; c < cols; ++c) d[c] = to_float(s[c]);
  }
}

}  // namespace moe::cpu
