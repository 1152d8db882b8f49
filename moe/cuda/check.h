// CUDA error handling: every API call and launch becomes a moe::Status.
#pragma once

#include <cuda_runtime_api.h>

#include "moe/status.h"

// A failed call's error stays in the runtime's last-error slot; it is cleared here (where it can be:
// a sticky error stays), so that the next launch check does not report it as its own (a refused
// cudaFuncSetAttribute, say, would otherwise fail the next, unrelated kernel launch).
#define MOE_CUDA_TRY(expr)                                                                                  \
  do {                                                                                                      \
    const cudaError_t moe_err_ = (expr);                                                                    \
    if (moe_err_ != cudaSuccess) {                                                                          \
      (void)cudaGetLastError();                                                                             \
      return ::moe::make_status(::moe::StatusCode::kCudaError, #expr, " failed: ", cudaGetErrorString(moe_err_), \
                                " at ", __FILE__, ":", __LINE__);                                           \
    }                                                                                                       \
  } while (0)

// After a <<<...>>> launch: reports launch-configuration errors without synchronizing.
#define MOE_CUDA_CHECK_LAUNCH() MOE_CUDA_TRY(cudaGetLastError())
