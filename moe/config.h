// Compiler portability for code shared by the host (g++) and device (nvcc) backends.
#pragma once

#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__ __forceinline__
#define MOE_DEVICE __device__ __forceinline__
// Before a MOE_HOST_DEVICE template that forwards to its context: the context may be host-only
// (the CPU backend's BlockContext), and nvcc need not check a call that only the host makes.
#define MOE_FORWARDING_HOST_DEVICE _Pragma("nv_exec_check_disable")
#else
#define MOE_HOST_DEVICE inline
#define MOE_DEVICE inline
#define MOE_FORWARDING_HOST_DEVICE
#endif

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
