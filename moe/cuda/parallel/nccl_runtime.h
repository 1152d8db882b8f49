// NCCL loaded at run time (dlopen), as cuBLAS is (moe/cuda/cublas_runtime.h): binaries link no
// 200 MB library, CI builds without one, and a GPU machine uses the libnccl of its CUDA image or
// of PyTorch's nvidia-nccl wheel ($MOE_NCCL_LIBRARY names the file when it is elsewhere).
// Only the types come from nccl.h.
#pragma once

#include <dlfcn.h>
#include <nccl.h>

#include <cstdlib>

namespace moe::cuda {

struct NcclRuntime {
  decltype(&ncclGetUniqueId) get_unique_id = nullptr;
  decltype(&ncclCommInitRank) comm_init_rank = nullptr;
  decltype(&ncclCommInitAll) comm_init_all = nullptr;
  decltype(&ncclCommDestroy) comm_destroy = nullptr;
  decltype(&ncclCommAbort) comm_abort = nullptr;
  decltype(&ncclGroupStart) group_start = nullptr;
  decltype(&ncclGroupEnd) group_end = nullptr;
  decltype(&ncclSend) send = nullptr;
  decltype(&ncclRecv) recv = nullptr;
  decltype(&ncclAllGather) all_gather = nullptr;
  decltype(&ncclAllReduce) all_reduce = nullptr;
  decltype(&ncclGetErrorString) error_string = nullptr;

  bool available() const {
    return get_unique_id && comm_init_rank && comm_init_all && comm_destroy && comm_abort && group_start && group_end && send &&
           recv && all_gather && all_reduce && error_string;
  }

  static const NcclRuntime& get() {
    static const NcclRuntime r = [] {
      NcclRuntime n;
      void* h = nullptr;
      const char* env = std::getenv("MOE_NCCL_LIBRARY");
      for (const char* lib : {env, "libnccl.so.2", "/usr/local/cuda/lib/libnccl.so.2", "/usr/local/cuda/lib64/libnccl.so.2",
                              "libnccl.so"}) {
        if (lib && (h = dlopen(lib, RTLD_NOW | RTLD_LOCAL))) break;
      }
      if (!h) return n;
      auto sym = [&](auto* fn, const char* name) { *fn = reinterpret_cast<std::remove_reference_t<decltype(*fn)>>(dlsym(h, name)); };
      sym(&n.get_unique_id, "ncclGetUniqueId");
      sym(&n.comm_init_rank, "ncclCommInitRank");
      sym(&n.comm_init_all, "ncclCommInitAll");
      sym(&n.comm_destroy, "ncclCommDestroy");
      sym(&n.comm_abort, "ncclCommAbort");
      sym(&n.group_start, "ncclGroupStart");
      sym(&n.group_end, "ncclGroupEnd");
      sym(&n.send, "ncclSend");
      sym(&n.recv, "ncclRecv");
      sym(&n.all_gather, "ncclAllGather");
      sym(&n.all_reduce, "ncclAllReduce");
      sym(&n.error_string, "ncclGetErrorString");
      return n;
    }();
    return r;
  }
};

}  // namespace moe::cuda
