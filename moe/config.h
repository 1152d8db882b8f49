// Compiler portability for code shared by the host (g++) and device (nvcc) backends.
#pragma once

#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__ __forceinline__
#define MOE_DEVICE __device__ __forceinline__
#else
#define MOE_HOST_DEVICE inline
#define MOE_DEVICE inline
#endif

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
