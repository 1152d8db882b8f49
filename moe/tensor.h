// Non-owning tensor views, and the type-erased tensor used where dtype and rank are known only
// at run time.
//
// A TensorView is a pointer plus extents and strides (in elements, 64-bit). The memory space is
// part of the type, so a device view cannot be handed to the CPU backend: that fails to compile
// rather than crash. Accessors are named like std::mdspan's.
#pragma once

#include <array>
#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "moe/config.h"
#include "moe/quant/numeric.h"
#include "moe/status.h"

namespace moe {

using Index = std::int64_t;

struct HostSpace {
  static constexpr std::string_view kName = "host";
};
struct DeviceSpace {
  static constexpr std::string_view kName = "device";
};

template <class T, int Rank, class Space = HostSpace>
class TensorView {
  static_assert(Rank >= 1, "moe::TensorView: Rank must be at least 1");

 public:
  using element_type = std::remove_const_t<T>;
  using value_type = T;
  using space = Space;
  static constexpr int kRank = Rank;

  TensorView() = default;
  // Row-major contiguous view.
  MOE_HOST_DEVICE TensorView(T* data, const std::array<Index, Rank>& extents) : data_(data), extent_(extents) {
    Index s = 1;
    for (int d = Rank - 1; d >= 0; --d) {
      stride_[d] = s;
      s *= extent_[d];
    }
  }
  MOE_HOST_DEVICE TensorView(T* data, const std::array<Index, Rank>& extents,
                             const std::array<Index, Rank>& strides)
      : data_(data), extent_(extents), stride_(strides) {}

  // A view of mutable elements converts to a view of const ones.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  MOE_HOST_DEVICE TensorView(const TensorView<U, Rank, Space>& other)
      : data_(other.data()), extent_(other.extents()), stride_(other.strides()) {}

  MOE_HOST_DEVICE T* data() const { return data_; }
  MOE_HOST_DEVICE Index extent(int d) const { return extent_[d]; }
  MOE_HOST_DEVICE Index stride(int d) const { return stride_[d]; }
  MOE_HOST_DEVICE const std::array<Index, Rank>& extents() const { return extent_; }
  MOE_HOST_DEVICE const std::array<Index, Rank>& strides() const { return stride_; }
  MOE_HOST_DEVICE Index size() const {
    Index n = 1;
    for (int d = 0; d < Rank; ++d) n *= extent_[d];
    return n;
  }
  MOE_HOST_DEVICE bool empty() const { return size() == 0; }

  template <class... I>
    requires(sizeof...(I) == Rank)
  MOE_HOST_DEVICE T& operator()(I... idx) const {
    const Index i[] = {static_cast<Index>(idx)...};
    Index offset = 0;
    for (int d = 0; d < Rank; ++d) offset += i[d] * stride_[d];
    return data_[offset];
  }

  // Dense row-major layout (strides match the extents; size-1 dimensions may have any stride).
  bool is_contiguous() const {
    Index s = 1;
    for (int d = Rank - 1; d >= 0; --d) {
      if (extent_[d] != 1 && stride_[d] != s) return false;
      s *= extent_[d];
    }
    return true;
  }
  // The last dimension is dense; outer dimensions may be padded (a column slice of a wider buffer).
  bool is_row_contiguous() const { return extent_[Rank - 1] <= 1 || stride_[Rank - 1] == 1; }

  // The view of index `i` along dimension 0.
  TensorView<T, Rank - 1, Space> operator[](Index i) const
    requires(Rank >= 2)
  {
    std::array<Index, Rank - 1> e{}, s{};
    for (int d = 1; d < Rank; ++d) {
      e[d - 1] = extent_[d];
      s[d - 1] = stride_[d];
    }
    return TensorView<T, Rank - 1, Space>(data_ + i * stride_[0], e, s);
  }

  // Elements [begin, end) of dimension `dim`.
  TensorView slice(int dim, Index begin, Index end) const {
    TensorView v = *this;
    v.data_ = data_ + begin * stride_[dim];
    v.extent_[dim] = end - begin;
    return v;
  }

 private:
  T* data_ = nullptr;
  std::array<Index, Rank> extent_{};
  std::array<Index, Rank> stride_{};
};

template <class T, int Rank>
using HostView = TensorView<T, Rank, HostSpace>;
template <class T, int Rank>
using DeviceView = TensorView<T, Rank, DeviceSpace>;

// ---------------------------------------------------------------------------------------------
// Run-time element types, for callers whose dtypes come from files or configs.

enum class DType { kF32, kF16, kBF16, kF8E4M3, kI8, kU8, kI32, kI64 };

constexpr std::string_view to_string(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
    case DType::kF8E4M3: return "f8_e4m3";
    case DType::kI8: return "i8";
    case DType::kU8: return "u8";
    case DType::kI32: return "i32";
    case DType::kI64: return "i64";
  }
  return "?";
}

template <class T>
struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::kF32; };
template <> struct DTypeOf<half> { static constexpr DType value = DType::kF16; };
template <> struct DTypeOf<bfloat16> { static constexpr DType value = DType::kBF16; };
template <> struct DTypeOf<float8_e4m3> { static constexpr DType value = DType::kF8E4M3; };
template <> struct DTypeOf<std::int8_t> { static constexpr DType value = DType::kI8; };
template <> struct DTypeOf<std::uint8_t> { static constexpr DType value = DType::kU8; };
template <> struct DTypeOf<std::int32_t> { static constexpr DType value = DType::kI32; };
template <> struct DTypeOf<std::int64_t> { static constexpr DType value = DType::kI64; };
template <class T>
inline constexpr DType dtype_of = DTypeOf<std::remove_const_t<T>>::value;

namespace detail {
template <std::size_t N>
std::string format_shape(const std::array<Index, N>& e) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < N; ++i) os << (i ? ", " : "") << e[i];
  os << ']';
  return os.str();
}
}  // namespace detail

}  // namespace moe
