// moe/cuda/check.h: a failed CUDA call becomes a Status naming the call, and leaves nothing behind
// that a later, unrelated check would report as its own.
#include <gtest/gtest.h>

#include <string>

#include "moe/cuda/check.h"
#include "testing/lib/gpu.h"

namespace {

__global__ void store_one(int* out) { *out = 1; }

__global__ void uses_dynamic_shared(int* out) {
  extern __shared__ int scratch[];
  scratch[threadIdx.x] = static_cast<int>(threadIdx.x);
  out[0] = scratch[0];
}

// Asks for 1 GiB of dynamic shared memory: refused (cudaErrorInvalidValue, not a sticky error).
moe::Status refuse_shared_memory() {
  MOE_CUDA_TRY(cudaFuncSetAttribute(uses_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 1 << 30));
  return moe::Status::ok();
}

moe::Status launch_store_one(int* out) {
  store_one<<<1, 1>>>(out);
  MOE_CUDA_CHECK_LAUNCH();
  return moe::Status::ok();
}

// Before the fix, the refused attribute stayed in the runtime's last-error slot and the next
// launch check (cudaGetLastError) returned it: a correct launch reported "invalid argument".
TEST(CudaCheck, AFailedCallDoesNotFailTheNextLaunchCheck) {
  MOE_SKIP_WITHOUT_GPU();
  moe::testing::DeviceBuffer<int> out(std::vector<int>{0});
  const moe::Status refused = refuse_shared_memory();
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.to_string().find("cudaFuncSetAttribute"), std::string::npos) << refused.to_string();
  const moe::Status launched = launch_store_one(out.data());
  EXPECT_TRUE(launched.is_ok()) << launched.to_string();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(out.download(), std::vector<int>{1});
}

}  // namespace
