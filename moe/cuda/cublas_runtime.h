// cuBLAS loaded at run time (dlopen): the toolkit on the build machine ships no static cuBLAS, and
// GPU machines have the shared library in their CUDA image or in PyTorch's wheel. Users of it keep
// a path that needs no cuBLAS (`available()` false: the library was not found).
#pragma once

#include <cublas_v2.h>
#include <dlfcn.h>

namespace moe::cuda {

struct CublasRuntime {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasSetWorkspace_v2) set_workspace = nullptr;
  using GemmEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                                    const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                                    cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
  GemmEx gemm = nullptr;

  bool available() const { return create && destroy && set_stream && set_workspace && gemm; }

  // The process-wide loader: libcublas.so.13 from the loader's path, the CUDA image, or any soname.
  static const CublasRuntime& get() {
    static const CublasRuntime r = [] {
      CublasRuntime c;
      void* h = nullptr;
      for (const char* lib : {"libcublas.so.13", "/usr/local/cuda/lib64/libcublas.so.13", "libcublas.so"}) {
        if ((h = dlopen(lib, RTLD_NOW | RTLD_LOCAL))) break;
      }
      if (!h) return c;
      c.create = reinterpret_cast<decltype(c.create)>(dlsym(h, "cublasCreate_v2"));
      c.destroy = reinterpret_cast<decltype(c.destroy)>(dlsym(h, "cublasDestroy_v2"));
      c.set_stream = reinterpret_cast<decltype(c.set_stream)>(dlsym(h, "cublasSetStream_v2"));
      c.set_workspace = reinterpret_cast<decltype(c.set_workspace)>(dlsym(h, "cublasSetWorkspace_v2"));
      c.gemm = reinterpret_cast<decltype(c.gemm)>(dlsym(h, "cublasGemmEx"));
      return c;
    }();
    return r;
  }
};

}  // namespace moe::cuda
