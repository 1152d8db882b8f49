// The NCCL communicator on every visible GPU of this process (one rank on a one-GPU machine, which
// still exercises NCCL's send/recv to itself): all-to-all blocks land where the layout says,
// all-gather and all-reduce give the expected values, and bad arguments are errors.
#include "moe/cuda/parallel/nccl_communicator.h"

#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "testing/lib/gpu.h"

namespace {

using moe::cuda::NcclCommunicator;
using moe::testing::cuda_ok;

// Rank s sends (s + d) % 3 + d + 1 bytes to rank d, byte i being s * 64 + d * 8 + i (mod 256).
std::size_t count(int s, int d) { return static_cast<std::size_t>((s + d) % 3 + d + 1); }
unsigned char value(int s, int d, std::size_t i) { return static_cast<unsigned char>(s * 64 + d * 8 + static_cast<int>(i)); }

class NcclTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MOE_SKIP_WITHOUT_GPU();
    const moe::Status a = NcclCommunicator::available();
    ASSERT_TRUE(a.is_ok()) << a.to_string() << " (a GPU is present, so NCCL must load)";
    int n = 0;
    cuda_ok(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
    std::vector<int> devices(static_cast<std::size_t>(std::min(n, 8)));
    std::iota(devices.begin(), devices.end(), 0);
    const moe::Status s = NcclCommunicator::create_all(devices, &comms_);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
  }
  int ranks() const { return static_cast<int>(comms_.size()); }
  std::vector<std::unique_ptr<NcclCommunicator>> comms_;
};

TEST_F(NcclTest, AllToAllDeliversEveryBlockToItsRank) {
  const int n = ranks();
  std::vector<void*> send(n), recv(n);
  std::vector<std::vector<std::size_t>> send_bytes(n), recv_bytes(n);
  for (int r = 0; r < n; ++r) {
    cuda_ok(cudaSetDevice(comms_[r]->device()), "cudaSetDevice");
    std::vector<unsigned char> host;
    for (int d = 0; d < n; ++d) {
      send_bytes[r].push_back(count(r, d));
      recv_bytes[r].push_back(count(d, r));
      for (std::size_t i = 0; i < count(r, d); ++i) host.push_back(value(r, d, i));
    }
    const std::size_t in = std::accumulate(recv_bytes[r].begin(), recv_bytes[r].end(), std::size_t{0});
    cuda_ok(cudaMalloc(&send[r], host.size()), "cudaMalloc");
    cuda_ok(cudaMalloc(&recv[r], in), "cudaMalloc");
    cuda_ok(cudaMemcpy(send[r], host.data(), host.size(), cudaMemcpyHostToDevice), "cudaMemcpy");
    cuda_ok(cudaMemset(recv[r], 0xee, in), "cudaMemset");
  }
  // EXPECT, not ASSERT, inside the group: it must be closed whatever happens.
  ASSERT_TRUE(NcclCommunicator::group_start().is_ok());
  for (int r = 0; r < n; ++r) {
    const moe::Status s = comms_[r]->all_to_all_v(send[r], send_bytes[r], recv[r], recv_bytes[r], nullptr);
    EXPECT_TRUE(s.is_ok()) << s.to_string();
  }
  ASSERT_TRUE(NcclCommunicator::group_end().is_ok());
  for (int r = 0; r < n; ++r) {
    cuda_ok(cudaSetDevice(comms_[r]->device()), "cudaSetDevice");
    cuda_ok(cudaDeviceSynchronize(), "sync");
    std::vector<unsigned char> got(std::accumulate(recv_bytes[r].begin(), recv_bytes[r].end(), std::size_t{0}));
    cuda_ok(cudaMemcpy(got.data(), recv[r], got.size(), cudaMemcpyDeviceToHost), "cudaMemcpy");
    std::vector<unsigned char> want;
    for (int s = 0; s < n; ++s) {
      for (std::size_t i = 0; i < count(s, r); ++i) want.push_back(value(s, r, i));
    }
    EXPECT_EQ(got, want) << "rank " << r << " of " << n;
    cuda_ok(cudaFree(send[r]), "cudaFree");
    cuda_ok(cudaFree(recv[r]), "cudaFree");
  }
}

TEST_F(NcclTest, AllGatherAndAllReduce) {
  const int n = ranks();
  constexpr std::size_t kFloats = 33;
  std::vector<float*> mine(n), all(n);
  for (int r = 0; r < n; ++r) {
    cuda_ok(cudaSetDevice(comms_[r]->device()), "cudaSetDevice");
    std::vector<float> host(kFloats);
    for (std::size_t i = 0; i < kFloats; ++i) host[i] = static_cast<float>(r + 1) * 0.5f + static_cast<float>(i);
    cuda_ok(cudaMalloc(reinterpret_cast<void**>(&mine[r]), kFloats * sizeof(float)), "cudaMalloc");
    cuda_ok(cudaMalloc(reinterpret_cast<void**>(&all[r]), n * kFloats * sizeof(float)), "cudaMalloc");
    cuda_ok(cudaMemcpy(mine[r], host.data(), kFloats * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  ASSERT_TRUE(NcclCommunicator::group_start().is_ok());
  for (int r = 0; r < n; ++r) EXPECT_TRUE(comms_[r]->all_gather(mine[r], kFloats * sizeof(float), all[r], nullptr).is_ok());
  ASSERT_TRUE(NcclCommunicator::group_end().is_ok());
  ASSERT_TRUE(NcclCommunicator::group_start().is_ok());
  for (int r = 0; r < n; ++r) EXPECT_TRUE(comms_[r]->all_reduce_sum(mine[r], kFloats, nullptr).is_ok());
  ASSERT_TRUE(NcclCommunicator::group_end().is_ok());
  for (int r = 0; r < n; ++r) {
    cuda_ok(cudaSetDevice(comms_[r]->device()), "cudaSetDevice");
    cuda_ok(cudaDeviceSynchronize(), "sync");
    std::vector<float> gathered(n * kFloats), reduced(kFloats);
    cuda_ok(cudaMemcpy(gathered.data(), all[r], gathered.size() * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy");
    cuda_ok(cudaMemcpy(reduced.data(), mine[r], kFloats * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy");
    for (std::size_t i = 0; i < kFloats; ++i) {
      float sum = 0.0f;
      for (int s = 0; s < n; ++s) {
        const float v = static_cast<float>(s + 1) * 0.5f + static_cast<float>(i);
        EXPECT_EQ(gathered[s * kFloats + i], v) << "rank " << r << " block " << s;
        sum += v;
      }
      EXPECT_FLOAT_EQ(reduced[i], sum) << "rank " << r << " element " << i;  // small integers and halves: exact
    }
    cuda_ok(cudaFree(mine[r]), "cudaFree");
    cuda_ok(cudaFree(all[r]), "cudaFree");
  }
}

TEST_F(NcclTest, BadArgumentsAreErrors) {
  std::vector<std::size_t> too_few(static_cast<std::size_t>(ranks()) + 1, 0);
  const moe::Status s = comms_[0]->all_to_all_v(nullptr, too_few, nullptr, too_few, nullptr);
  EXPECT_NE(s.to_string().find("one per rank"), std::string::npos) << s.to_string();
  std::vector<std::unique_ptr<NcclCommunicator>> more;
  const int twice[] = {0, 0};
  EXPECT_FALSE(NcclCommunicator::create_all(twice, &more).is_ok());
  const int absent[] = {4096};
  EXPECT_NE(NcclCommunicator::create_all(absent, &more).to_string().find("devices"), std::string::npos);
}

}  // namespace
