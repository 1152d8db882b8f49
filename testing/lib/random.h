// Seeded random inputs for tests and benchmarks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "moe/quant/numeric.h"

namespace moe::testing {

class Random {
 public:
  explicit Random(std::uint64_t seed) : gen_(seed) {}

  float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(gen_); }
  float normal(float mean = 0.0f, float stddev = 1.0f) { return std::normal_distribution<float>(mean, stddev)(gen_); }
  int integer(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen_); }  // inclusive

  template <class T>
  std::vector<T> normal_vector(std::size_t n, float stddev = 1.0f) {
    std::vector<T> v(n);
    for (auto& x : v) x = from_float<T>(normal(0.0f, stddev));
    return v;
  }
  template <class T>
  std::vector<T> uniform_vector(std::size_t n, float lo, float hi) {
    std::vector<T> v(n);
    for (auto& x : v) x = from_float<T>(uniform(lo, hi));
    return v;
  }

  // Router logits [M, E] whose values in each row are distinct with gaps of at least `gap`, so
  // that float and double top-k selection cannot disagree on near-ties.
  std::vector<float> gapped_logits(std::size_t M, std::size_t E, float gap = 0.05f) {
    std::vector<float> out(M * E);
    std::vector<int> perm(E);
    for (std::size_t m = 0; m < M; ++m) {
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), gen_);
      const float base = uniform(-1.0f, 1.0f);
      for (std::size_t e = 0; e < E; ++e) out[m * E + e] = base + gap * static_cast<float>(perm[e]) - gap * E / 2.0f;
    }
    return out;
  }

  // k distinct ids in [0, E) per token.
  std::vector<std::int32_t> distinct_ids(std::size_t M, int E, int k) {
    std::vector<std::int32_t> out(M * k);
    std::vector<int> perm(E);
    for (std::size_t m = 0; m < M; ++m) {
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), gen_);
      for (int j = 0; j < k; ++j) out[m * k + j] = perm[j];
    }
    return out;
  }

  std::mt19937_64& engine() { return gen_; }

 private:
  std::mt19937_64 gen_;
};

}  // namespace moe::testing
