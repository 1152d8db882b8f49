// Expert parallelism by all-to-all (the prepare/finalize of DeepEP, pplx and vLLM's
// all2all backends), on host memory over any Communicator. Every rank holds its own tokens and
// `experts_per_rank` physical experts: rank r owns physical ids [r * n, (r + 1) * n).
//
//   dispatch   each (token, slot) whose physical id is in range goes to the rank that owns it, in
//              ascending (token, slot) order, with its local expert id. Two modes:
//                kNormal      the per-rank row counts are exchanged first and the rows sent in
//                             blocks of exactly that size (DeepEP "normal", prefill). On the GPU
//                             this is the one host synchronization: NCCL needs the sizes.
//                kLowLatency  fixed blocks of max_tokens_per_rank * min(top_k, n) rows per rank
//                             pair with the count in a header, so nothing depends on the counts
//                             (CUDA-graph capturable on the GPU; DeepEP "low latency", decode).
//   experts    the receiver groups its rows by local expert (kNormal: compact segments; kLowLatency:
//              the batched layout [n, ranks * max_tokens_per_rank, H] with per-expert counts, the
//              BatchedPrepareFinalize format) and calls the caller's experts stage on them. Rows of
//              one expert are ordered by (source rank, token, slot).
//   combine    the outputs return along the reverse route and the token's rank reduces them:
//              out[m] = IO( sum over slots j ascending of IO(w[m, j] * y[m, j]) ) in float, the
//              finalize of moe/stages.h, so the result is the single-rank forward's, bit for bit,
//              whatever the number of ranks.
//
// The output is written only after every collective succeeded; any error leaves it untouched.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <span>
#include <vector>

#include "moe/detail/validate.h"
#include "moe/parallel/communicator.h"
#include "moe/parallel/ep_config.h"
#include "moe/quant/numeric.h"
#include "moe/stages.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::parallel {

// This rank's tokens and their routing (physical expert ids, after any EPLB mapping).
template <class IO>
struct EpTokens {
  HostView<const IO, 2> hidden;              // [M, H], rows contiguous
  HostView<const std::int32_t, 2> topk_ids;  // [M, top_k]; ids outside [0, ranks * n) contribute nothing
  HostView<const float, 2> topk_weights;     // [M, top_k]
};

// Runs this rank's experts on rows grouped by local expert (moe/stages.h's ExpertRows): the CPU
// experts stage, or a test's stand-in.
template <class IO>
using LocalExperts = std::function<Status(const ExpertRows<IO, HostSpace>& rows)>;

namespace detail_ep {

// Rows of one peer block: row i of a block starts at (block_begin + i) * H.
template <class IO>
void copy_row(const IO* src, IO* dst, Index H) {
  std::memcpy(dst, src, static_cast<std::size_t>(H) * sizeof(IO));
}

// w * y rounded to float on its own: with IO = float, round_to is the identity and the compiler
// may otherwise fuse the product into the sum (an FMA under -march=x86-64-v3), which the kernel's
// finalize, adding products stored beforehand, never does.
inline float rounded_product(float w, float y) {
  float p = w * y;
  asm volatile("" : "+m"(p));
  return p;
}

}  // namespace detail_ep

template <class IO>
Status ep_forward(Communicator& comm, const EpConfig& config, const EpTokens<IO>& tokens, const LocalExperts<IO>& experts,
                  HostView<IO, 2> output) {
  using moe::detail::Dim;
  using moe::detail::expect_shape;
  const int P = comm.size();
  const Index M = tokens.hidden.extent(0), H = tokens.hidden.extent(1), k = tokens.topk_ids.extent(1);
  MOE_RETURN_IF_ERROR(expect_shape(tokens.topk_ids, "topk_ids", std::array<Dim, 2>{{{"M", M}, {"top_k", k}}}));
  MOE_RETURN_IF_ERROR(expect_shape(tokens.topk_weights, "topk_weights", std::array<Dim, 2>{{{"M", M}, {"top_k", k}}}));
  MOE_RETURN_IF_ERROR(expect_shape(output, "output", std::array<Dim, 2>{{{"M", M}, {"H", H}}}));
  if (!tokens.hidden.is_row_contiguous() || !output.is_row_contiguous()) {
    return invalid_argument("hidden, output: expected rows with unit element stride");
  }
  if (k > INT32_MAX) return invalid_argument("topk_ids: top_k ", k, " out of range");
  MOE_RETURN_IF_ERROR(check_ep_config(config, P, M, H));
  const Index n = config.experts_per_rank;
  const Index num_physical = n * P;
  const bool low_latency = config.mode == DispatchMode::kLowLatency;
  // Low latency: a token's top-k ids are distinct (checked below), so it sends at most
  // min(top_k, n) rows to one rank and reaches one expert at most once.
  const Index block_cap = low_latency ? config.max_tokens_per_rank * std::min(k, n) : 0;
  if (low_latency) {
    for (Index m = 0; m < M; ++m) {
      for (Index j = 0; j < k; ++j) {
        for (Index i = 0; i < j; ++i) {
          const std::int32_t id = tokens.topk_ids(m, j);
          if (id >= 0 && id < num_physical && tokens.topk_ids(m, i) == id) {
            return invalid_argument("topk_ids: token ", m, " names expert ", id, " in slots ", i, " and ", j,
                                    "; the low-latency mode's batched layout holds a token once per expert");
          }
        }
      }
    }
  }

  // ---- dispatch: rows by destination rank, then (token, slot) ascending ----
  std::vector<Index> send_counts(static_cast<std::size_t>(P), 0);
  for (Index m = 0; m < M; ++m) {
    for (Index j = 0; j < k; ++j) {
      const std::int32_t id = tokens.topk_ids(m, j);
      if (id >= 0 && id < num_physical) ++send_counts[static_cast<std::size_t>(id / n)];
    }
  }
  // Block starts in the send buffer (exact sizes, or the fixed capacity).
  std::vector<Index> send_begin(static_cast<std::size_t>(P) + 1, 0);
  for (int r = 0; r < P; ++r) send_begin[r + 1] = send_begin[r] + (low_latency ? block_cap : send_counts[r]);
  const Index send_rows = send_begin[P];
  std::vector<IO> send(static_cast<std::size_t>(send_rows * H));
  // Header per block: [count, local id of each row]; low latency carries its count here.
  const Index meta_width = 1 + (low_latency ? block_cap : 0);
  std::vector<std::int32_t> send_local(static_cast<std::size_t>(send_rows), -1);
  std::vector<Index> slot_row(static_cast<std::size_t>(M * k), -1);  // the slot's row in the send buffer
  {
    std::vector<Index> fill(send_begin.begin(), send_begin.end() - 1);
    for (Index m = 0; m < M; ++m) {
      for (Index j = 0; j < k; ++j) {
        const std::int32_t id = tokens.topk_ids(m, j);
        if (id < 0 || id >= num_physical) continue;
        const Index row = fill[static_cast<std::size_t>(id / n)]++;
        detail_ep::copy_row(&tokens.hidden(m, 0), send.data() + row * H, H);
        send_local[static_cast<std::size_t>(row)] = static_cast<std::int32_t>(id % n);
        slot_row[static_cast<std::size_t>(m * k + j)] = row;
      }
    }
  }

  // ---- the counts each rank receives ----
  std::vector<Index> recv_counts(static_cast<std::size_t>(P), 0);
  std::vector<Index> recv_begin(static_cast<std::size_t>(P) + 1, 0);
  std::vector<std::int32_t> recv_local;
  std::vector<IO> recv;
  const std::vector<Index> fixed(static_cast<std::size_t>(P), block_cap);
  if (!low_latency) {
    MOE_RETURN_IF_ERROR(exchange_counts(comm, send_counts, recv_counts));
    for (int r = 0; r < P; ++r) {
      if (recv_counts[r] < 0 || recv_counts[r] > INT64_MAX / 2 - recv_begin[r]) {
        return invalid_argument("rank ", r, " announced ", recv_counts[r], " rows; expected a count >= 0 that fits");
      }
      recv_begin[r + 1] = recv_begin[r] + recv_counts[r];
    }
    const Index R = recv_begin[P];
    if (H > 0 && R > INT64_MAX / H) return invalid_argument("received rows: ", R, " x H = ", H, " overflows");
    recv.resize(static_cast<std::size_t>(R * H));
    recv_local.resize(static_cast<std::size_t>(R));
    MOE_RETURN_IF_ERROR(all_to_all_rows<IO>(comm, send, send_counts, recv, recv_counts, H, "dispatch rows"));
    MOE_RETURN_IF_ERROR(all_to_all_rows<std::int32_t>(comm, send_local, send_counts, recv_local, recv_counts, 1,
                                                      "dispatch expert ids"));
  } else {
    // One fixed-size exchange of [count, ids...] headers and one of rows.
    std::vector<std::int32_t> send_meta(static_cast<std::size_t>(P * meta_width), 0);
    for (int r = 0; r < P; ++r) {
      send_meta[r * meta_width] = static_cast<std::int32_t>(send_counts[r]);
      std::copy_n(send_local.begin() + send_begin[r], block_cap, send_meta.begin() + r * meta_width + 1);
    }
    std::vector<std::int32_t> recv_meta(send_meta.size());
    const std::vector<Index> ones(static_cast<std::size_t>(P), 1);
    MOE_RETURN_IF_ERROR(all_to_all_rows<std::int32_t>(comm, send_meta, ones, recv_meta, ones, meta_width, "dispatch headers"));
    recv.resize(static_cast<std::size_t>(P * block_cap * H));
    MOE_RETURN_IF_ERROR(all_to_all_rows<IO>(comm, send, fixed, recv, fixed, H, "dispatch rows"));
    recv_local.assign(static_cast<std::size_t>(P * block_cap), -1);
    for (int r = 0; r < P; ++r) {
      const std::int32_t c = recv_meta[r * meta_width];
      if (c < 0 || c > block_cap) {
        return invalid_argument("rank ", r, " announced ", c, " rows; expected at most its block capacity ", block_cap);
      }
      recv_counts[r] = c;
      recv_begin[r + 1] = recv_begin[r] + block_cap;
      std::copy_n(recv_meta.begin() + r * meta_width + 1, c, recv_local.begin() + r * block_cap);
    }
  }

  // ---- experts: group the received rows by local expert ----
  // Received row i (block r, row t < recv_counts[r]) has local id recv_local[i].
  std::vector<Index> expert_count(static_cast<std::size_t>(n), 0);
  for (int r = 0; r < P; ++r) {
    for (Index t = 0; t < recv_counts[r]; ++t) {
      const std::int32_t e = recv_local[static_cast<std::size_t>(recv_begin[r] + t)];
      if (e < 0 || e >= n) return invalid_argument("rank ", r, " sent local expert id ", e, "; expected [0, ", n, ")");
      ++expert_count[static_cast<std::size_t>(e)];
    }
  }
  // kNormal: compact segments; kLowLatency: the batched layout of ranks * max_tokens rows per
  // expert (each token of each rank at most once).
  const Index expert_cap = low_latency ? P * config.max_tokens_per_rank : 0;
  std::vector<Index> seg_begin(static_cast<std::size_t>(n), 0);
  for (Index e = 1; e < n; ++e) {
    seg_begin[e] = low_latency ? e * expert_cap : seg_begin[e - 1] + expert_count[e - 1];
  }
  const Index rows_total = low_latency ? n * expert_cap : (n > 0 ? seg_begin[n - 1] + expert_count[n - 1] : 0);
  std::vector<IO> grouped(static_cast<std::size_t>(rows_total * H), from_float<IO>(0.0f));
  std::vector<IO> grouped_out(grouped.size(), from_float<IO>(0.0f));
  std::vector<Index> grouped_row(recv_local.size(), -1);  // received row -> its row in `grouped`
  {
    std::vector<Index> fill(seg_begin);
    for (int r = 0; r < P; ++r) {
      for (Index t = 0; t < recv_counts[r]; ++t) {
        const Index i = recv_begin[r] + t;
        const Index g = fill[static_cast<std::size_t>(recv_local[static_cast<std::size_t>(i)])]++;
        detail_ep::copy_row(recv.data() + i * H, grouped.data() + g * H, H);
        grouped_row[static_cast<std::size_t>(i)] = g;
      }
    }
  }
  ExpertRows<IO, HostSpace> rows;
  rows.input = HostView<const IO, 2>(grouped.data(), {rows_total, H});
  rows.output = HostView<IO, 2>(grouped_out.data(), {rows_total, H});
  rows.seg_begin = HostView<const Index, 1>(seg_begin.data(), {n});
  rows.seg_count = HostView<const Index, 1>(expert_count.data(), {n});
  rows.max_rows_per_expert = low_latency ? expert_cap : *std::max_element(expert_count.begin(), expert_count.end());
  // A failure of this rank's experts still takes part in the combine (its blocks as zeros), so no
  // peer is left waiting in it; the error is returned after, and the output stays untouched.
  const Status experts_status = experts(rows);

  // ---- combine: outputs back along the reverse route, in the received order ----
  std::vector<IO> back(recv.size(), from_float<IO>(0.0f));
  for (std::size_t i = 0; i < grouped_row.size() && experts_status.is_ok(); ++i) {
    if (grouped_row[i] >= 0) detail_ep::copy_row(grouped_out.data() + grouped_row[i] * H, back.data() + i * H, H);
  }
  std::vector<IO> returned(send.size());
  if (!low_latency) {
    MOE_RETURN_IF_ERROR(all_to_all_rows<IO>(comm, back, recv_counts, returned, send_counts, H, "combine rows"));
  } else {
    MOE_RETURN_IF_ERROR(all_to_all_rows<IO>(comm, back, fixed, returned, fixed, H, "combine rows"));
  }
  MOE_RETURN_IF_ERROR(experts_status);
  for (Index m = 0; m < M; ++m) {
    IO* out = &output(m, 0);
    for (Index c = 0; c < H; ++c) {
      float sum = 0.0f;
      for (Index j = 0; j < k; ++j) {
        const Index row = slot_row[static_cast<std::size_t>(m * k + j)];
        if (row < 0) continue;
        sum += round_to<IO>(detail_ep::rounded_product(tokens.topk_weights(m, j), to_float(returned[static_cast<std::size_t>(row * H + c)])));
      }
      out[c] = from_float<IO>(sum);
    }
  }
  return Status::ok();
}

}  // namespace moe::parallel
