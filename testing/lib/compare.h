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

// The error bounds of a quantized forward against its reference: every element finite, the largest
// error at most max_frac of the largest |reference|, and the summed error at most mean_frac of the
// summed |reference| (the mean error relative to the mean magnitude).
template <class A>
::testing::AssertionResult close_in_max_and_mean(const std::vector<A>& actual, const std::vector<float>& expected,
                                                 double max_frac, double mean_frac) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure() << "size " << actual.size() << " != " << expected.size();
  }
  double max_ref = 0, sum_ref = 0, sum_err = 0, max_err = 0;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const double o = moe::to_float(actual[i]);
    if (!std::isfinite(o)) return ::testing::AssertionFailure() << "element " << i << " is " << o;
    max_ref = std::max(max_ref, std::abs(static_cast<double>(expected[i])));
    sum_ref += std::abs(expected[i]);
    sum_err += std::abs(o - expected[i]);
    max_err = std::max(max_err, std::abs(o - expected[i]));
  }
  if (max_ref == 0) return ::testing::AssertionFailure() << "the reference is all zeros";
  if (max_err > max_frac * max_ref || sum_err > mean_frac * sum_ref) {
    return ::testing::AssertionFailure() << "max error " << max_err << " (bound " << max_frac * max_ref
                                         << "), summed error " << sum_err << " (bound " << mean_frac * sum_ref << ")";
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
