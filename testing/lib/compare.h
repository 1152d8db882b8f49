// Comparisons with readable failure messages.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "moe/quant/numeric.h"

namespace moe::testing {

struct Tolerance {
  double atol;
  double rtol;  // relative to the largest |reference| value
};

// Every element within atol + rtol * max|ref|; reports the worst element.
template <class A, class B>
::testing::AssertionResult all_close(const std::vector<A>& actual, const std::vector<B>& expected, Tolerance tol) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure() << "size " << actual.size() << " != " << expected.size();
  }
  double max_ref = 0;
  for (const auto& e : expected) max_ref = std::max(max_ref, std::abs(static_cast<double>(e)));
  const double bound = tol.atol + tol.rtol * max_ref;
  double worst = -1;
  std::size_t worst_i = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double a = static_cast<double>(actual[i]), e = static_cast<double>(expected[i]);
    const double d = std::abs(a - e);
    if (!(d <= bound) && (std::isnan(d) || d > worst)) {
      worst = std::isnan(d) ? INFINITY : d;
      worst_i = i;
    }
  }
  if (worst >= 0) {
    return ::testing::AssertionFailure() << "element " << worst_i << ": got " << static_cast<double>(actual[worst_i])
                                         << ", expected " << static_cast<double>(expected[worst_i]) << " (diff " << worst
                                         << " > bound " << bound << ", max|ref| " << max_ref << ")";
  }
  return ::testing::AssertionSuccess();
}

// Every element equal (operator==); reports how many differ and the first mismatch.
template <class A>
::testing::AssertionResult ExactlyEqual(const std::vector<A>& got, const std::vector<A>& want) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!(got[i] == want[i]) && bad++ == 0) first = i;
  }
  if (bad) {
    return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements differ; first at " << first
                                         << ": got " << got[first] << ", expected " << want[first];
  }
  return ::testing::AssertionSuccess();
}

// Bitwise equality of storage values (float, bfloat16, half).
template <class T>
::testing::AssertionResult BitwiseEqual(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0 && bad++ == 0) first = i;
  }
  if (bad) {
    return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements differ bitwise; first at "
                                         << first << ": got " << moe::to_float(got[first]) << ", expected "
                                         << moe::to_float(want[first]);
  }
  return ::testing::AssertionSuccess();
}

template <class T>
double max_abs(const std::vector<T>& v) {
  double m = 0;
  for (const auto& x : v) m = std::max(m, std::abs(static_cast<double>(x)));
  return m;
}

}  // namespace moe::testing
