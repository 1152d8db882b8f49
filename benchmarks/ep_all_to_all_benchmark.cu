// Dispatch + combine of the expert-parallel all-to-all (moe/cuda/parallel/ep_all_to_all.cuh) over
// NCCL, one rank per visible GPU in this process, for the DeepSeek-V3 shape of issue 10: H = 7168,
// 256 experts, top-8, bf16 rows; 4096 tokens per rank (normal dispatch, prefill) and 128 (low
// latency, decode). The experts stage is a copy, so the time is the all-to-all's: pack, header
// exchange, rows out, grouping, rows back, combine.
//
// Printed per row (CSV): ranks, mode, tokens per rank; µs per forward (the slowest rank's mean
// over the timed iterations) and its bandwidth = the bytes a rank sends to other ranks in the
// dispatch plus those it gets back in the combine (mean over ranks), over that time. DeepEP's
// intranode figures (~153 GB/s dispatch, ~158 GB/s combine over NVLink on H800) count the same
// bytes per phase. Then the NCCL all-to-all of the dispatch rows alone, packed (the transport's
// share), and its bandwidth over the dispatch bytes.
//
//   bazel run //benchmarks:ep_all_to_all_benchmark -- [--iterations N]
#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "moe/cuda/parallel/ep_all_to_all.cuh"

namespace {

using moe::Index;
using moe::Status;
using IO = moe::bfloat16;

constexpr Index kHidden = 7168, kExperts = 256, kTopK = 8;

#define BENCH_CHECK(expr)                                                                       \
  do {                                                                                          \
    const Status s_ = (expr);                                                                   \
    if (!s_.is_ok()) {                                                                          \
      std::fprintf(stderr, "%s: %s\n", #expr, s_.to_string().c_str());                         \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)
#define BENCH_CUDA(expr)                                                                        \
  do {                                                                                          \
    const cudaError_t e_ = (expr);                                                              \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s: %s\n", #expr, cudaGetErrorString(e_));                          \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

// Distinct random experts per token, the same draw on every run.
std::vector<std::int32_t> routing(Index M, int rank) {
  std::mt19937 rng(1234u + static_cast<unsigned>(rank));
  std::vector<std::int32_t> ids(static_cast<std::size_t>(M * kTopK));
  std::vector<std::int32_t> all(kExperts);
  for (Index m = 0; m < M; ++m) {
    for (Index e = 0; e < kExperts; ++e) all[e] = static_cast<std::int32_t>(e);
    for (Index j = 0; j < kTopK; ++j) {
      std::uniform_int_distribution<Index> pick(j, kExperts - 1);
      std::swap(all[j], all[pick(rng)]);
      ids[m * kTopK + j] = all[j];
    }
  }
  return ids;
}

struct Row {
  moe::parallel::DispatchMode mode;
  Index tokens;
};

}  // namespace

int main(int argc, char** argv) {
  int iterations = 20;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--iterations") iterations = std::max(1, std::atoi(argv[i + 1]));
  }
  BENCH_CHECK(moe::cuda::NcclCommunicator::available());
  int count = 0;
  BENCH_CUDA(cudaGetDeviceCount(&count));
  std::vector<int> devices;
  for (int d = 0; d < std::min(count, 8); ++d) devices.push_back(d);
  std::vector<std::unique_ptr<moe::cuda::NcclCommunicator>> comms;
  BENCH_CHECK(moe::cuda::NcclCommunicator::create_all(devices, &comms));
  const int P = static_cast<int>(comms.size());
  if (kExperts % P != 0) {
    std::fprintf(stderr, "%d ranks do not divide %lld experts\n", P, static_cast<long long>(kExperts));
    return 1;
  }
  std::printf("ranks,mode,tokens_per_rank,us_forward,gb_per_s_forward,us_rows_alltoall,gb_per_s_rows_alltoall\n");
  for (const Row row : {Row{moe::parallel::DispatchMode::kLowLatency, 128}, Row{moe::parallel::DispatchMode::kNormal, 4096}}) {
    std::vector<double> us(static_cast<std::size_t>(P)), us_rows(static_cast<std::size_t>(P)), bytes(static_cast<std::size_t>(P));
    const Index n = kExperts / P;
    // Every rank's routing, and the dispatch bytes from each rank to each rank (for the packed
    // all-to-all, whose receivers must know what each peer sends).
    std::vector<std::vector<std::int32_t>> ids_of;
    std::vector<std::vector<std::size_t>> matrix(static_cast<std::size_t>(P), std::vector<std::size_t>(static_cast<std::size_t>(P), 0));
    for (int r = 0; r < P; ++r) {
      ids_of.push_back(routing(row.tokens, r));
      for (std::int32_t id : ids_of.back()) matrix[r][static_cast<std::size_t>(id / n)] += kHidden * sizeof(IO);
    }
    std::barrier sync(P);
    std::vector<std::thread> threads;
    for (int r = 0; r < P; ++r) {
      threads.emplace_back([&, r] {
        BENCH_CUDA(cudaSetDevice(comms[r]->device()));
        cudaStream_t stream;
        BENCH_CUDA(cudaStreamCreate(&stream));
        const Index M = row.tokens;
        const std::vector<std::int32_t>& ids = ids_of[r];
        std::vector<IO> hidden(static_cast<std::size_t>(M * kHidden), moe::from_float<IO>(0.5f));
        const std::vector<float> weights(static_cast<std::size_t>(M * kTopK), 0.125f);
        IO *d_hidden = nullptr, *d_out = nullptr;
        std::int32_t* d_ids = nullptr;
        float* d_weights = nullptr;
        BENCH_CUDA(cudaMalloc(&d_hidden, hidden.size() * sizeof(IO)));
        BENCH_CUDA(cudaMalloc(&d_out, hidden.size() * sizeof(IO)));
        BENCH_CUDA(cudaMalloc(&d_ids, ids.size() * 4));
        BENCH_CUDA(cudaMalloc(&d_weights, weights.size() * 4));
        BENCH_CUDA(cudaMemcpy(d_hidden, hidden.data(), hidden.size() * sizeof(IO), cudaMemcpyHostToDevice));
        BENCH_CUDA(cudaMemcpy(d_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
        BENCH_CUDA(cudaMemcpy(d_weights, weights.data(), weights.size() * 4, cudaMemcpyHostToDevice));
        moe::cuda::DeviceEpTokens<IO> t;
        t.hidden = moe::DeviceView<const IO, 2>(d_hidden, {M, kHidden});
        t.topk_ids = moe::DeviceView<const std::int32_t, 2>(d_ids, {M, kTopK});
        t.topk_weights = moe::DeviceView<const float, 2>(d_weights, {M, kTopK});
        const moe::parallel::EpConfig config{n, row.mode, M};
        std::size_t ws_bytes = 0;
        BENCH_CHECK(moe::cuda::ep_forward_workspace_bytes<IO>(config, P, kHidden, kTopK, &ws_bytes));
        std::byte* ws = nullptr;
        BENCH_CUDA(cudaMalloc(&ws, ws_bytes));
        moe::cuda::DeviceLocalExperts<IO> copy = [](const moe::ExpertRows<IO, moe::DeviceSpace>& rows, cudaStream_t s) -> Status {
          const std::size_t b = static_cast<std::size_t>(rows.input.extent(0) * rows.input.extent(1)) * sizeof(IO);
          if (b > 0) MOE_CUDA_TRY(cudaMemcpyAsync(rows.output.data(), rows.input.data(), b, cudaMemcpyDeviceToDevice, s));
          return Status::ok();
        };
        // Bytes this rank sends to other ranks (dispatch) and receives back (combine).
        Index remote = 0;
        for (std::int32_t id : ids) remote += id / n != r;
        bytes[r] = 2.0 * static_cast<double>(remote) * kHidden * sizeof(IO);
        const moe::DeviceView<IO, 2> out(d_out, {M, kHidden});
        const auto once = [&] {
          BENCH_CHECK(moe::cuda::ep_forward<IO>(*comms[r], config, t, copy, out, std::span<std::byte>(ws, ws_bytes), stream));
        };
        for (int i = 0; i < 3; ++i) once();
        BENCH_CUDA(cudaStreamSynchronize(stream));
        sync.arrive_and_wait();
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iterations; ++i) once();
        BENCH_CUDA(cudaStreamSynchronize(stream));
        us[r] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / iterations;
        // The transport alone: the dispatch rows as one all-to-all of packed blocks.
        std::vector<std::size_t> recv_block(static_cast<std::size_t>(P));
        for (int src = 0; src < P; ++src) recv_block[src] = matrix[src][r];
        sync.arrive_and_wait();
        const auto t1 = std::chrono::steady_clock::now();
        for (int i = 0; i < iterations; ++i) {
          BENCH_CHECK(comms[r]->all_to_all_v(ws, matrix[r], ws + ws_bytes / 2, recv_block, stream));
        }
        BENCH_CUDA(cudaStreamSynchronize(stream));
        us_rows[r] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t1).count() / iterations;
        BENCH_CUDA(cudaFree(ws));
        BENCH_CUDA(cudaFree(d_hidden));
        BENCH_CUDA(cudaFree(d_out));
        BENCH_CUDA(cudaFree(d_ids));
        BENCH_CUDA(cudaFree(d_weights));
        BENCH_CUDA(cudaStreamDestroy(stream));
      });
    }
    for (std::thread& th : threads) th.join();
    const double slowest = *std::max_element(us.begin(), us.end());
    const double slowest_rows = *std::max_element(us_rows.begin(), us_rows.end());
    const double mean_bytes = [&] {
      double s = 0;
      for (double b : bytes) s += b;
      return s / P;
    }();
    std::printf("%d,%s,%lld,%.1f,%.1f,%.1f,%.1f\n", P, row.mode == moe::parallel::DispatchMode::kNormal ? "normal" : "low_latency",
                static_cast<long long>(row.tokens), slowest, mean_bytes / (slowest * 1e3), slowest_rows,
                mean_bytes / 2 / (slowest_rows * 1e3));
  }
  return 0;
}
