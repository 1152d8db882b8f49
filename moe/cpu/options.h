// The CPU backend's tag and run-time options, apart from its kernels: what code that only names
// the backend (the layer's registry, the tool) includes, without Eigen.
#pragma once

#include <string_view>

#include "moe/cpu/parallel.h"
#include "moe/tensor.h"

namespace moe::cpu {

// Backend tag.
struct Eigen {
  using Space = HostSpace;
  static constexpr std::string_view kName = "cpu_eigen";
};

// What the CPU backend does with a precomputed top-k id outside [0, E_global).
enum class InvalidIds {
  kReject,  // error before anything is written (default)
  kSkip,    // the slot contributes zero, as the unchecked CUDA path and vLLM's kernels do
};

struct Options {
  Index chunk_tokens = 16384;  // tokens per chunk; bounds the workspace (vLLM's default chunk)
  int num_threads = default_num_threads();
  InvalidIds invalid_ids = InvalidIds::kReject;
  Index row_block = 256;  // rows per parallel task
};

}  // namespace moe::cpu
