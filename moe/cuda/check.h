// CUDA error handling: every API call and launch becomes a moe::Status.
#pragma once

#include <cuda_runtime_api.h>

#include "moe/status.h"

#define MOE_CUDA_TRY(expr)                                                                                  \
  do {                                                                                                      \
    const cudaError_t moe_err_ = (expr);                                                                    \
    if (moe_err_ != cudaSuccess) {                                                                          \
      return ::moe::make_status(::moe::StatusCode::kCudaError, #expr, " failed: ", cudaGetErrorString(moe_err_), \
                                " at ", __FILE__, ":", __LINE__);                                           \
    }                                                                                                       \
  } while (0)

// After a <<<...>>> launch: reports launch-configuration errors without synchronizing.
#define MOE_CUDA_CHECK_LAUNCH() MOE_CUDA_TRY(cudaGetLastError())
