// A weight-only checkpoint built by the tests (W4A16 / W8A16, moe/quant/weight_only.h): the
// tests' own group quantizer (symmetric around the default zero point, or asymmetric with zero
// points) and nibble packing, written independently of the library's reader. Weights change
// magnitude by powers of two across rows, groups and experts, so a scale or zero point read from
// the wrong place fails a comparison.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "moe/quant/numeric.h"
#include "moe/tensor.h"

namespace moe::testing {

// The tests' own quantized checkpoint of weights [E, N, K]: codes, packed bytes, scales, zeros.
template <int Bits>
struct QuantizedMatrix {
  std::vector<unsigned> codes;       // [E, N, K] unpacked
  std::vector<std::uint8_t> packed;  // [E, N, K * Bits / 8]
  std::vector<float> scales;         // [E, N, groups]
  std::vector<std::uint8_t> zeros;   // [E, N, groups] (zero-point variant)
  Index groups = 0;
};

template <int Bits>
inline QuantizedMatrix<Bits> quantize(Index E, Index N, Index K, Index group, bool zero_points, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> d(0.0, 0.05);
  const Index G = group > 0 ? group : K, qmax = (1 << Bits) - 1, half = 1 << (Bits - 1);
  QuantizedMatrix<Bits> q;
  q.groups = (K + G - 1) / G;
  q.codes.resize(static_cast<std::size_t>(E * N * K));
  q.scales.resize(static_cast<std::size_t>(E * N * q.groups));
  q.zeros.resize(q.scales.size());
  for (Index e = 0; e < E; ++e) {
    for (Index n = 0; n < N; ++n) {
      for (Index g = 0; g < q.groups; ++g) {
        const Index k0 = g * G, k1 = std::min(K, k0 + G);
        std::vector<double> w;
        const double mag = std::ldexp(1.0, static_cast<int>((n / 16 + g + e) % 5));
        // An offset per group exercises the zero points (symmetric groups stay centred).
        const double offset = zero_points ? 0.03 * mag * static_cast<double>((n + g) % 3) : 0.0;
        for (Index k = k0; k < k1; ++k) w.push_back(d(gen) * mag + offset);
        const auto [lo, hi] = std::minmax_element(w.begin(), w.end());
        double s = 0;
        Index z = half;
        if (zero_points) {
          s = std::max(*hi - *lo, 1e-6) / static_cast<double>(qmax);
          z = std::clamp<Index>(static_cast<Index>(std::lround(-*lo / s)), 0, qmax);
        } else {
          s = std::max(std::fabs(*lo), std::fabs(*hi)) / static_cast<double>(half - 1);
        }
        const std::size_t si = static_cast<std::size_t>((e * N + n) * q.groups + g);
        q.scales[si] = static_cast<float>(s);
        q.zeros[si] = static_cast<std::uint8_t>(z);
        for (Index k = k0; k < k1; ++k) {
          q.codes[(e * N + n) * K + k] =
              static_cast<unsigned>(std::clamp<Index>(std::lround(w[k - k0] / s) + z, 0, qmax));
        }
      }
    }
  }
  // Pack along K: 4-bit codes two per byte, the even k in the low nibble.
  const Index per_byte = 8 / Bits;
  q.packed.assign(static_cast<std::size_t>(E * N * K / per_byte), 0);
  for (Index i = 0; i < E * N * K; ++i) {
    q.packed[i / per_byte] |= static_cast<std::uint8_t>(q.codes[i] << (Bits * (i % per_byte)));
  }
  return q;
}

// MXFP4 weights [E, N, K] made by the tests: random codes (every one, the negative zero too),
// E8M0 scales over 2^-9..2^1, and the tests' own dequantization (E2M1 table x 2^(s - 127), rounded
// to bf16).
struct Mxfp4Matrix {
  std::vector<std::uint8_t> codes;   // [E, N, K / 2], the even k in the low nibble
  std::vector<std::uint8_t> scales;  // [E, N, K / 32]
  std::vector<bfloat16> dequantized; // [E, N, K]
};

inline Mxfp4Matrix mxfp4_matrix(Index E, Index N, Index K, std::uint32_t seed) {
  static constexpr float kE2m1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  std::mt19937 gen(seed);
  Mxfp4Matrix m;
  m.codes.resize(static_cast<std::size_t>(E * N * K / 2));
  m.scales.resize(static_cast<std::size_t>(E * N * K / 32));
  m.dequantized.resize(static_cast<std::size_t>(E * N * K));
  for (auto& c : m.codes) c = static_cast<std::uint8_t>(gen());
  for (auto& s : m.scales) s = static_cast<std::uint8_t>(118 + gen() % 11);
  for (Index x = 0; x < E * N * K; ++x) {
    const unsigned q = (m.codes[x / 2] >> (4 * (x % 2))) & 0xF;
    const float v = (q & 8 ? -1.0f : 1.0f) * kE2m1[q & 7];
    m.dequantized[x] = bfloat16(std::ldexp(v, static_cast<int>(m.scales[x / 32]) - 127));
  }
  return m;
}

}  // namespace moe::testing
