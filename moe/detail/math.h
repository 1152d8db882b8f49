// Scalar math used by policies on both backends: std:: on the host, CUDA intrinsics on the device.
#pragma once

#include <cmath>
#include <limits>

#include "moe/config.h"

namespace moe::math {

MOE_HOST_DEVICE float exp(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return std::exp(x);
#endif
}
MOE_HOST_DEVICE float tanh(float x) {
#if defined(__CUDA_ARCH__)
  return ::tanhf(x);
#else
  return std::tanh(x);
#endif
}
MOE_HOST_DEVICE float erf(float x) {
#if defined(__CUDA_ARCH__)
  return ::erff(x);
#else
  return std::erf(x);
#endif
}
MOE_HOST_DEVICE bool isnan(float x) { return x != x; }
MOE_HOST_DEVICE float fmin(float a, float b) { return a < b ? a : b; }
MOE_HOST_DEVICE float fmax(float a, float b) { return a > b ? a : b; }
MOE_HOST_DEVICE float clamp(float x, float lo, float hi) { return fmin(fmax(x, lo), hi); }
MOE_HOST_DEVICE float sigmoid(float x) { return 1.0f / (1.0f + exp(-x)); }
MOE_HOST_DEVICE float infinity() { return std::numeric_limits<float>::infinity(); }

}  // namespace moe::math
