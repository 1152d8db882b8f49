// An expert-parallel prepare/finalize written outside moe/, against moe/stages.h only: N ranks
// simulated in one process. The NCCL issue replaces the copies below with all-to-alls.
//
//   dispatch  rank r owns global experts [r * E/N, (r+1) * E/N). Each (token, slot) is copied, in
//             ascending slot order, into its rank's batched rows [E_local, capacity, H] (capacity
//             = M: a token reaches an expert at most once) and counted per local expert.
//   experts   each rank's local experts on its rows: the backend's experts stage, called through
//             `RankExperts` (the CPU test calls cpu::ExpertsStage on host rows; the GPU test
//             copies the rows to the device, runs cuda::ExpertsStage and copies them back).
//   combine   out[m] = IO( sum over slots j ascending of IO(w[m, j] * y[slot]) ) in float: the
//             finalize of moe/stages.h, so the result is the single-rank forward's, bit for bit.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "moe/quant/numeric.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::testing::ep {

// One rank's share after dispatch: batched rows and the segment of each local expert.
template <class IO>
struct RankRows {
  Index capacity = 0;
  std::vector<IO> rows;      // [E_local * capacity, H]
  std::vector<Index> begin;  // [E_local]: e * capacity
  std::vector<Index> count;  // [E_local]
};

// Computes `out` ([E_local * capacity, H], GEMM2's output per row) from `in` for rank `rank`.
template <class IO>
using RankExperts = std::function<Status(int rank, const RankRows<IO>& in, std::vector<IO>* out)>;

// The forward of hidden [M, H] routed by ids/weights [M, top_k] over `ranks` ranks of E / ranks
// experts each. Ids outside [0, E) contribute zero, as in the built-in forward.
template <class IO>
Status forward(const std::vector<IO>& hidden, Index M, Index H, const std::vector<std::int32_t>& ids,
               const std::vector<float>& weights, int top_k, Index E, int ranks, const RankExperts<IO>& run_rank,
               std::vector<IO>* output) {
  if (ranks < 1 || E % ranks != 0) return invalid_argument("ranks: expected a divisor of E=", E, ", got ", ranks);
  const Index E_local = E / ranks;
  std::vector<RankRows<IO>> share(static_cast<std::size_t>(ranks));
  for (RankRows<IO>& s : share) {
    s.capacity = M;
    s.rows.assign(static_cast<std::size_t>(E_local * M * H), from_float<IO>(0.0f));
    s.count.assign(static_cast<std::size_t>(E_local), 0);
    for (Index e = 0; e < E_local; ++e) s.begin.push_back(e * M);
  }
  // Dispatch.
  std::vector<int> slot_rank(static_cast<std::size_t>(M * top_k), -1);
  std::vector<Index> slot_row(static_cast<std::size_t>(M * top_k), -1);
  for (Index m = 0; m < M; ++m) {
    for (int j = 0; j < top_k; ++j) {
      const Index s = m * top_k + j;
      const std::int32_t e = ids[static_cast<std::size_t>(s)];
      if (e < 0 || e >= E) continue;
      const int r = static_cast<int>(e / E_local);
      RankRows<IO>& dst = share[static_cast<std::size_t>(r)];
      const Index local = e % E_local;
      const Index row = dst.begin[static_cast<std::size_t>(local)] + dst.count[static_cast<std::size_t>(local)]++;
      std::copy_n(hidden.begin() + m * H, H, dst.rows.begin() + row * H);
      slot_rank[static_cast<std::size_t>(s)] = r;
      slot_row[static_cast<std::size_t>(s)] = row;
    }
  }
  // Experts, rank by rank.
  std::vector<std::vector<IO>> results(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) MOE_RETURN_IF_ERROR(run_rank(r, share[static_cast<std::size_t>(r)], &results[static_cast<std::size_t>(r)]));
  // Combine.
  output->assign(static_cast<std::size_t>(M * H), from_float<IO>(0.0f));
  for (Index m = 0; m < M; ++m) {
    for (Index c = 0; c < H; ++c) {
      float sum = 0.0f;
      for (int j = 0; j < top_k; ++j) {
        const Index s = m * top_k + j;
        const int r = slot_rank[static_cast<std::size_t>(s)];
        if (r < 0) continue;
        const IO y = results[static_cast<std::size_t>(r)][static_cast<std::size_t>(slot_row[static_cast<std::size_t>(s)] * H + c)];
        sum += round_to<IO>(weights[static_cast<std::size_t>(s)] * to_float(y));
      }
      (*output)[static_cast<std::size_t>(m * H + c)] = from_float<IO>(sum);
    }
  }
  return Status::ok();
}

}  // namespace moe::testing::ep
