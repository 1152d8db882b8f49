// Key bits for the CUB radix sorts of slot keys (one helper for the forward and the standalone ops).
#pragma once

#include "moe/tensor.h"

namespace moe::cuda::detail {

// The bits a radix sort needs for keys in [0, max_key] (at least 1).
inline int radix_sort_bits(Index max_key) {
  int bits = 1;
  while ((Index{1} << bits) <= max_key) ++bits;
  return bits;
}

}  // namespace moe::cuda::detail
