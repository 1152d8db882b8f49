// The configuration of an expert-parallel all-to-all (moe/parallel/ep_all_to_all.h on the host,
// moe/cuda/parallel/ep_all_to_all.cuh on the GPU), and the checks both make first.
#pragma once

#include <algorithm>
#include <cstdint>

#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::parallel {

enum class DispatchMode { kNormal, kLowLatency };

struct EpConfig {
  Index experts_per_rank = 0;     // physical experts on every rank (> 0)
  DispatchMode mode = DispatchMode::kNormal;
  // Every rank's token count is at most this (> 0): the fixed blocks of kLowLatency, and on the
  // GPU the workspace bound of both modes.
  Index max_tokens_per_rank = 0;
};

// a * b * c without overflow (sizes that come from configs and other ranks).
inline bool product_fits(Index a, Index b, Index c, Index* out) {
  Index ab = 0;
  return !__builtin_mul_overflow(a, b, &ab) && !__builtin_mul_overflow(ab, c, out);
}

// The checks every rank can make alone, before any collective: the same verdict on every rank
// for the arguments they share (the mode and capacity), this rank's own for its token count.
inline Status check_ep_config(const EpConfig& c, int ranks, Index M, Index H) {
  if (ranks < 1) return invalid_argument("ranks: expected >= 1, got ", ranks);
  if (M < 0 || H < 0) return invalid_argument("hidden: expected [M >= 0, H >= 0], got [", M, ", ", H, "]");
  if (c.experts_per_rank < 1) return invalid_argument("experts_per_rank: expected >= 1, got ", c.experts_per_rank);
  if (c.experts_per_rank > INT32_MAX / ranks) {
    return invalid_argument("experts_per_rank: ", c.experts_per_rank, " experts on each of ", ranks,
                            " ranks overflow int32 expert ids");
  }
  if (c.mode == DispatchMode::kLowLatency) {
    if (c.max_tokens_per_rank < 1) {
      return invalid_argument("max_tokens_per_rank: expected >= 1 in the low-latency mode, got ", c.max_tokens_per_rank);
    }
    if (M > c.max_tokens_per_rank) {
      return invalid_argument("hidden: ", M, " tokens on rank; expected at most max_tokens_per_rank = ", c.max_tokens_per_rank,
                              " in the low-latency mode");
    }
    // The largest buffer: n * ranks * max_tokens batched rows of H elements (the sent rows,
    // ranks * max_tokens * min(top_k, n), are no more).
    Index rows = 0, elements = 0;
    if (!product_fits(c.experts_per_rank, ranks, c.max_tokens_per_rank, &rows) || !product_fits(rows, H, 16, &elements)) {
      return invalid_argument("max_tokens_per_rank: ", c.max_tokens_per_rank, " tokens x ", ranks, " ranks x ",
                              c.experts_per_rank, " experts x H = ", H, " overflows the batched buffer size");
    }
  }
  return Status::ok();
}

}  // namespace moe::parallel
