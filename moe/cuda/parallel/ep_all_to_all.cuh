// Expert parallelism by all-to-all on the GPU, over NCCL: the device counterpart of
// moe/parallel/ep_all_to_all.h (same routing of rows, same order within an expert, same combine,
// so the same bits as the single-rank forward when the experts stage runs the same schedule).
// Include from .cu files.
//
// Buffers, from the caller's workspace (ep_forward_workspace_bytes), with cap = max_tokens_per_rank
// * top_k rows per peer (a token sends at most top_k rows to one rank):
//   send [ranks, cap, H]   this rank's rows, block r for rank r, in ascending (token, slot) order;
//                          after the dispatch it receives the returned outputs in the same places
//   recv [ranks, cap, H]   block s from rank s; after the experts it holds their outputs
//   header [ranks, 1 + cap] int32: a block's row count, then each row's local expert
//   grouped / grouped_out  the received rows by local expert, and the experts' outputs
//
//   1. pack       one block per destination rank scans the slots in order with block scans
//                 (deterministic positions), then one block per slot copies its row
//   2. headers    one fixed-size all-to-all of [count, local ids]
//   3. rows       kNormal: the counts are copied to the host (the one synchronization) and each
//                 block is sent with its exact size; kLowLatency: every block at full capacity,
//                 nothing waits for the host (graph-capturable)
//   4. layout     one block per local expert scans the received rows in (source, row) order:
//                 compact segments (kNormal) or the batched layout of ranks * max_tokens_per_rank
//                 rows per expert (kLowLatency; a row past it, possible only when a token's top-k
//                 repeats an expert, is dropped and counted in `dropped_slots`)
//   5. experts    the caller's experts stage on ExpertRows in device memory
//   6. return     outputs scattered back into `recv`, sent back along the reverse route into `send`
//   7. combine    out[m] = IO( sum over slots j ascending of IO(w[m, j] * y[m, j]) ), float sums
//
// Where it differs from the host version: a token whose top-k repeats an expert is refused there
// in the low-latency mode and here its overflow is dropped and counted (the device cannot refuse
// without a synchronization); top_k must be >= 1 here; and blocks are max_tokens * top_k rows
// (the host: max_tokens * min(top_k, experts_per_rank)), the bound with repeated ids. Rows past a
// block's count are sent uninitialized in the low-latency mode (never read; initcheck reports
// them). Tuned only as far as block scans: each destination rank's block reads every slot, and
// each local expert's block every received row (benchmarks/NOTES.md has the sender-sorted plan).
//
// Errors: arguments are checked before anything is enqueued. After that every rank issues the
// same collectives whatever fails locally, and returns the first local error at the end with the
// output untouched, so a failure on one rank does not leave the others waiting.
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "moe/cuda/check.h"
#include "moe/cuda/parallel/nccl_communicator.h"
#include "moe/detail/validate.h"
#include "moe/detail/workspace.h"
#include "moe/parallel/ep_config.h"
#include "moe/quant/numeric.h"
#include "moe/stages.h"

namespace moe::cuda {

template <class IO>
struct DeviceEpTokens {
  DeviceView<const IO, 2> hidden;              // [M, H], rows contiguous
  DeviceView<const std::int32_t, 2> topk_ids;  // [M, top_k] physical ids; outside [0, ranks * n): no contribution
  DeviceView<const float, 2> topk_weights;     // [M, top_k]
};

// Runs this rank's experts stage on rows in device memory, ordered on `stream`.
template <class IO>
using DeviceLocalExperts = std::function<Status(const ExpertRows<IO, DeviceSpace>& rows, cudaStream_t stream)>;

namespace ep_detail {

constexpr std::size_t kAlign = 256;
using Carve = moe::detail::WorkspaceCarver<kAlign>;

struct Layout {
  Index cap = 0, expert_cap = 0, rows = 0, grouped_rows = 0, header_width = 0;
  std::size_t send = 0, recv = 0, grouped = 0, grouped_out = 0, send_header = 0, recv_header = 0, slot_row = 0,
              grouped_row = 0, seg_begin = 0, seg_count = 0, counts_out = 0, total = 0;
};

inline Status plan(const parallel::EpConfig& c, int ranks, Index H, Index top_k, std::size_t io_bytes, Layout* l) {
  if (c.experts_per_rank < 1) return invalid_argument("experts_per_rank: expected >= 1, got ", c.experts_per_rank);
  if (c.max_tokens_per_rank < 1) return invalid_argument("max_tokens_per_rank: expected >= 1 (the workspace bound), got ", c.max_tokens_per_rank);
  if (top_k < 1 || top_k > INT32_MAX) return invalid_argument("topk_ids: top_k ", top_k, " out of range");
  const Index n = c.experts_per_rank;
  // Row indices are int32 on the device; byte counts must fit with room for 8-byte elements.
  Index rows = 0, row_elements = 0, expert_rows = 0, expert_elements = 0;
  if (!parallel::product_fits(c.max_tokens_per_rank, top_k, ranks, &rows) || !parallel::product_fits(rows, H, 1, &row_elements) ||
      !parallel::product_fits(n, ranks, c.max_tokens_per_rank, &expert_rows) ||
      !parallel::product_fits(expert_rows, H, 1, &expert_elements) || rows >= INT32_MAX || expert_rows >= INT32_MAX ||
      row_elements > INT64_MAX / 8 || expert_elements > INT64_MAX / 8) {
    return invalid_argument("max_tokens_per_rank: ", c.max_tokens_per_rank, " x top_k ", top_k, " x ", ranks, " ranks x H ", H,
                            " overflows the all-to-all buffers");
  }
  l->cap = c.max_tokens_per_rank * top_k;
  l->rows = ranks * l->cap;
  l->expert_cap = c.mode == parallel::DispatchMode::kLowLatency ? ranks * c.max_tokens_per_rank : 0;
  l->grouped_rows = c.mode == parallel::DispatchMode::kLowLatency ? n * l->expert_cap : l->rows;
  l->header_width = 1 + l->cap;
  const auto R = static_cast<std::size_t>(l->rows), G = static_cast<std::size_t>(l->grouped_rows);
  const auto row_bytes = static_cast<std::size_t>(H) * io_bytes;
  Carve cv;
  l->send = cv.take(R * row_bytes);
  l->recv = cv.take(R * row_bytes);
  l->grouped = cv.take(G * row_bytes);
  l->grouped_out = cv.take(G * row_bytes);
  l->send_header = cv.take(static_cast<std::size_t>(ranks * l->header_width) * 4);
  l->recv_header = cv.take(static_cast<std::size_t>(ranks * l->header_width) * 4);
  l->slot_row = cv.take(static_cast<std::size_t>(c.max_tokens_per_rank * top_k) * 4);
  l->grouped_row = cv.take(R * 4);
  l->seg_begin = cv.take(static_cast<std::size_t>(n) * 8);
  l->seg_count = cv.take(static_cast<std::size_t>(n) * 8);
  l->counts_out = cv.take(8);
  l->total = cv.total();
  return Status::ok();
}

constexpr int kScanThreads = 256;

// Block-wide, in order: for i in [0, count) with keep(i), place(i, carry + k) where k is i's rank
// among the kept items (0, 1, ...); returns carry plus how many were kept, on every thread. One
// block scan per kThreads items, so the positions are the serial loop's whatever the schedule.
template <int kThreads, class Keep, class Place>
__device__ Index block_stable_filter(Index count, Index carry, Keep keep, Place place) {
  using Scan = cub::BlockScan<Index, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  for (Index base = 0; base < count; base += kThreads) {
    const Index i = base + static_cast<Index>(threadIdx.x);
    const Index flag = i < count && keep(i) ? 1 : 0;
    Index before = 0, total = 0;
    Scan(temp).ExclusiveSum(flag, before, total);
    if (flag) place(i, carry + before);
    carry += total;
    __syncthreads();  // `temp` is reused by the next chunk
  }
  return carry;
}

// 1. One block per destination rank r: its rows in ascending slot order (a block scan per chunk
// of slots; a token sends at most k rows to one rank and M <= max_tokens_per_rank, so the count
// stays below cap).
static __global__ void __launch_bounds__(kScanThreads) pack_plan_kernel(const std::int32_t* ids, Index ld_ids, Index M, Index k,
                                                                       Index n, Index cap, Index header_width,
                                                                       std::int32_t* slot_row, std::int32_t* header) {
  const int r = static_cast<int>(blockIdx.x);
  const Index first = Index{r} * n, last = first + n;
  const auto id_of = [&](Index s) { return ids[(s / k) * ld_ids + s % k]; };
  const Index count = block_stable_filter<kScanThreads>(
      M * k, 0,
      [&](Index s) {
        const std::int32_t id = id_of(s);
        return id >= first && id < last;
      },
      [&](Index s, Index position) {
        slot_row[s] = static_cast<std::int32_t>(r * cap + position);
        header[r * header_width + 1 + position] = static_cast<std::int32_t>(id_of(s) - first);
      });
  if (threadIdx.x == 0) header[r * header_width] = static_cast<std::int32_t>(count);
}

static __global__ void mark_unrouted_kernel(const std::int32_t* ids, Index ld_ids, Index M, Index k, Index num_physical,
                                     std::int32_t* slot_row) {
  for (Index s = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; s < M * k; s += static_cast<Index>(gridDim.x) * blockDim.x) {
    const std::int32_t id = ids[(s / k) * ld_ids + s % k];
    if (id < 0 || id >= num_physical) slot_row[s] = -1;
  }
}

// Row copies: dst[dst_row(i)] = src[src_row(i)] for i in [0, count), a block per row. A row with
// no destination (-1) is skipped; one with no source (-1: a dropped row) is written as zeros.
template <class IO>
__global__ void copy_rows_kernel(const IO* src, const std::int32_t* src_map, Index src_div, IO* dst, const std::int32_t* dst_map,
                                 Index count, Index H, Index ld_src) {
  for (Index i = blockIdx.x; i < count; i += gridDim.x) {
    // src_map: i -> source row (nullptr: i / src_div, the token of slot i); dst_map: i -> dest row.
    const Index s = src_map ? src_map[i] : i / src_div;
    const Index d = dst_map ? dst_map[i] : i;
    if (d < 0) continue;
    for (Index c = threadIdx.x; c < H; c += blockDim.x) dst[d * H + c] = s < 0 ? from_float<IO>(0.0f) : src[s * ld_src + c];
  }
}

// A block's row count from its header, clamped to [0, cap].
static __device__ inline Index header_rows(const std::int32_t* header, Index header_width, int s, Index cap) {
  const Index c = header[s * header_width];
  return c < 0 ? 0 : (c > cap ? cap : c);
}

// 4. One block per local expert e: the received rows of expert e in (source, row) order, visiting
// only the rows each block's header counts. Compact segments begin after the rows of the experts
// before e (a block reduction); batched ones at e * expert_cap, where a row past the capacity
// (possible only when a token's top-k repeats an expert) is dropped and counted.
static __global__ void __launch_bounds__(kScanThreads) layout_kernel(const std::int32_t* header, Index header_width, int ranks,
                                                                    Index cap, Index expert_cap, std::int32_t* grouped_row,
                                                                    Index* seg_begin, Index* seg_count, Index* dropped) {
  const Index e = blockIdx.x;
  const auto id_at = [&](int s, Index t) -> Index { return header[s * header_width + 1 + t]; };
  Index begin = e * expert_cap;
  if (expert_cap == 0) {
    using Reduce = cub::BlockReduce<Index, kScanThreads>;
    __shared__ typename Reduce::TempStorage temp;
    __shared__ Index before_e;
    Index mine = 0;
    for (int s = 0; s < ranks; ++s) {
      const Index rows = header_rows(header, header_width, s, cap);
      for (Index t = threadIdx.x; t < rows; t += kScanThreads) {
        const Index id = id_at(s, t);
        mine += id >= 0 && id < e;
      }
    }
    const Index total = Reduce(temp).Sum(mine);  // thread 0's
    if (threadIdx.x == 0) before_e = total;
    __syncthreads();
    begin = before_e;
  }
  Index found = 0;
  for (int s = 0; s < ranks; ++s) {
    found = block_stable_filter<kScanThreads>(
        header_rows(header, header_width, s, cap), found, [&](Index t) { return id_at(s, t) == e; },
        [&](Index t, Index position) {
          grouped_row[s * cap + t] = expert_cap > 0 && position >= expert_cap ? -1 : static_cast<std::int32_t>(begin + position);
        });
  }
  if (threadIdx.x == 0) {
    const Index placed = expert_cap > 0 && found > expert_cap ? expert_cap : found;
    seg_begin[e] = begin;
    seg_count[e] = placed;
    if (found > placed) atomicAdd(reinterpret_cast<unsigned long long*>(dropped), static_cast<unsigned long long>(found - placed));
  }
}

// 7. out[m, c] = IO( sum_j IO(w[m, j] * y[slot_row[m, j], c]) ).
template <class IO>
__global__ void combine_kernel(const IO* returned, Index H, const std::int32_t* slot_row, const float* weights, Index ld_w,
                               Index M, Index k, IO* out, Index ld_out) {
  for (Index m = blockIdx.x; m < M; m += gridDim.x) {
    for (Index c = threadIdx.x; c < H; c += blockDim.x) {
      float sum = 0.0f;
      for (Index j = 0; j < k; ++j) {
        const std::int32_t row = slot_row[m * k + j];
        if (row < 0) continue;
        sum = __fadd_rn(sum, round_to<IO>(__fmul_rn(weights[m * ld_w + j], to_float(returned[row * H + c]))));
      }
      out[m * ld_out + c] = from_float<IO>(sum);
    }
  }
}

inline unsigned blocks_for(Index n, Index per_block) {
  return static_cast<unsigned>(std::clamp<Index>((n + per_block - 1) / per_block, 1, Index{1} << 20));
}

}  // namespace ep_detail

// Workspace bytes of ep_forward for `ranks` ranks, hidden size H and top_k (every rank's the same).
template <class IO>
Status ep_forward_workspace_bytes(const parallel::EpConfig& config, int ranks, Index H, Index top_k, std::size_t* bytes) {
  ep_detail::Layout l;
  MOE_RETURN_IF_ERROR(ep_detail::plan(config, ranks, H, top_k, sizeof(IO), &l));
  *bytes = l.total;
  return Status::ok();
}

// The forward of this rank's tokens over the communicator's ranks; collective (every rank calls it
// with the same config, H and top_k). `dropped_slots` (optional, device): slots lost to a full
// expert batch in the low-latency mode, added on the stream. Refused before anything is enqueued:
// bad shapes, a token count above max_tokens_per_rank, a small workspace.
template <class IO>
Status ep_forward(NcclCommunicator& comm, const parallel::EpConfig& config, const DeviceEpTokens<IO>& tokens,
                  const DeviceLocalExperts<IO>& experts, DeviceView<IO, 2> output, std::span<std::byte> workspace,
                  cudaStream_t stream, std::int64_t* dropped_slots = nullptr) {
  using moe::detail::Dim;
  using moe::detail::expect_shape;
  using namespace ep_detail;
  const int P = comm.size(), me = comm.rank();
  const Index M = tokens.hidden.extent(0), H = tokens.hidden.extent(1), k = tokens.topk_ids.extent(1);
  MOE_RETURN_IF_ERROR(expect_shape(tokens.topk_ids, "topk_ids", std::array<Dim, 2>{{{"M", M}, {"top_k", k}}}));
  MOE_RETURN_IF_ERROR(expect_shape(tokens.topk_weights, "topk_weights", std::array<Dim, 2>{{{"M", M}, {"top_k", k}}}));
  MOE_RETURN_IF_ERROR(expect_shape(output, "output", std::array<Dim, 2>{{{"M", M}, {"H", H}}}));
  if (!tokens.hidden.is_row_contiguous() || !output.is_row_contiguous() || tokens.topk_ids.stride(1) != 1 ||
      tokens.topk_weights.stride(1) != 1) {
    return invalid_argument("hidden, topk_ids, topk_weights, output: expected rows with unit element stride");
  }
  if (M > config.max_tokens_per_rank) {
    return invalid_argument("hidden: ", M, " tokens on rank ", me, "; expected at most max_tokens_per_rank = ", config.max_tokens_per_rank);
  }
  Layout l;
  MOE_RETURN_IF_ERROR(plan(config, P, H, k, sizeof(IO), &l));
  MOE_RETURN_IF_ERROR(check_workspace(workspace.size(), l.total));
  const bool low_latency = config.mode == parallel::DispatchMode::kLowLatency;
  const Index n = config.experts_per_rank, num_physical = n * P;
  std::byte* base = Carve::aligned_base(workspace.data());
  auto* send = reinterpret_cast<IO*>(base + l.send);
  auto* recv = reinterpret_cast<IO*>(base + l.recv);
  auto* grouped = reinterpret_cast<IO*>(base + l.grouped);
  auto* grouped_out = reinterpret_cast<IO*>(base + l.grouped_out);
  auto* send_header = reinterpret_cast<std::int32_t*>(base + l.send_header);
  auto* recv_header = reinterpret_cast<std::int32_t*>(base + l.recv_header);
  auto* slot_row = reinterpret_cast<std::int32_t*>(base + l.slot_row);
  auto* grouped_row = reinterpret_cast<std::int32_t*>(base + l.grouped_row);
  auto* seg_begin = reinterpret_cast<Index*>(base + l.seg_begin);
  auto* seg_count = reinterpret_cast<Index*>(base + l.seg_count);
  auto* dropped = dropped_slots ? reinterpret_cast<Index*>(dropped_slots) : reinterpret_cast<Index*>(base + l.counts_out);
  const std::size_t row_bytes = static_cast<std::size_t>(H) * sizeof(IO);

  // From here on every rank issues the same collectives with the sizes they agreed on, whatever
  // happens locally: a local failure (a launch, a copy, the experts stage) is kept, the local work
  // after it is skipped, and it is returned at the end, so no peer is left waiting in a collective.
  Status failed;
  const auto local = [&](Status st) {
    if (failed.is_ok() && !st.is_ok()) failed = std::move(st);
    return failed.is_ok();
  };
  const auto launched = [] {
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? Status::ok() : make_status(StatusCode::kCudaError, "ep_forward: kernel launch: ", cudaGetErrorString(e));
  };
  const auto cuda = [](cudaError_t e, const char* what) {
    if (e == cudaSuccess) return Status::ok();
    (void)cudaGetLastError();
    return make_status(StatusCode::kCudaError, "ep_forward: ", what, ": ", cudaGetErrorString(e));
  };

  // 1. Pack.
  if (local(cuda(cudaMemsetAsync(send_header, 0, static_cast<std::size_t>(P * l.header_width) * 4, stream), "header memset")) && M * k > 0) {
    mark_unrouted_kernel<<<blocks_for(M * k, 256), 256, 0, stream>>>(tokens.topk_ids.data(), tokens.topk_ids.stride(0), M, k,
                                                                       num_physical, slot_row);
    local(launched());
  }
  if (failed.is_ok()) {
    pack_plan_kernel<<<static_cast<unsigned>(P), kScanThreads, 0, stream>>>(tokens.topk_ids.data(), tokens.topk_ids.stride(0), M, k,
                                                                            n, l.cap, l.header_width, slot_row, send_header);
    local(launched());
  }
  if (failed.is_ok() && M * k > 0 && H > 0) {
    copy_rows_kernel<IO><<<blocks_for(M * k, 1), 128, 0, stream>>>(tokens.hidden.data(), nullptr, k, send, slot_row, M * k, H,
                                                                     tokens.hidden.stride(0));
    local(launched());
  }
  // 2. Headers (fixed size).
  const std::vector<std::size_t> header_bytes(static_cast<std::size_t>(P), static_cast<std::size_t>(l.header_width) * 4);
  MOE_RETURN_IF_ERROR(comm.all_to_all_v(send_header, header_bytes, recv_header, header_bytes, stream));
  // 3. Rows.
  std::vector<std::size_t> offsets(static_cast<std::size_t>(P)), send_bytes(static_cast<std::size_t>(P)),
      recv_bytes(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r) offsets[r] = static_cast<std::size_t>(r * l.cap) * row_bytes;
  Index received = 0, largest_expert = 0;  // kNormal: rows received and the largest expert's, on the host
  if (low_latency) {
    std::fill(send_bytes.begin(), send_bytes.end(), static_cast<std::size_t>(l.cap) * row_bytes);
    recv_bytes = send_bytes;
  } else {
    // The one synchronization: both headers on the host (a failed copy leaves no agreed size: the
    // communicator is then unusable and the error is returned at once).
    std::vector<std::int32_t> sent(static_cast<std::size_t>(P)), got(static_cast<std::size_t>(P * l.header_width));
    MOE_RETURN_IF_ERROR(cuda(cudaMemcpy2DAsync(sent.data(), 4, send_header, static_cast<std::size_t>(l.header_width) * 4, 4,
                                               static_cast<std::size_t>(P), cudaMemcpyDeviceToHost, stream), "header copy"));
    MOE_RETURN_IF_ERROR(cuda(cudaMemcpyAsync(got.data(), recv_header, got.size() * 4, cudaMemcpyDeviceToHost, stream), "header copy"));
    MOE_RETURN_IF_ERROR(cuda(cudaStreamSynchronize(stream), "synchronize"));
    std::vector<Index> per_expert(static_cast<std::size_t>(n), 0);
    for (int r = 0; r < P; ++r) {
      const std::int32_t c = got[static_cast<std::size_t>(r * l.header_width)];
      if (c < 0 || c > l.cap) {  // only a corrupted header: no size both sides agree on
        return make_status(StatusCode::kInternal, "ep_forward: rank ", r, " announced ", c, " rows; expected at most ", l.cap);
      }
      send_bytes[r] = static_cast<std::size_t>(sent[r]) * row_bytes;
      recv_bytes[r] = static_cast<std::size_t>(c) * row_bytes;
      received += c;
      for (Index t = 0; t < c; ++t) {
        const std::int32_t e = got[static_cast<std::size_t>(r * l.header_width + 1 + t)];
        if (e >= 0 && e < n) largest_expert = std::max(largest_expert, ++per_expert[static_cast<std::size_t>(e)]);
      }
    }
  }
  MOE_RETURN_IF_ERROR(comm.all_to_all_v(send, offsets, send_bytes, recv, offsets, recv_bytes, stream));
  // 4. Layout by local expert.
  if (failed.is_ok()) local(cuda(cudaMemsetAsync(grouped_row, 0xFF, static_cast<std::size_t>(l.rows) * 4, stream), "memset"));
  if (failed.is_ok() && !dropped_slots) local(cuda(cudaMemsetAsync(dropped, 0, 8, stream), "memset"));
  if (failed.is_ok()) {
    layout_kernel<<<static_cast<unsigned>(n), kScanThreads, 0, stream>>>(recv_header, l.header_width, P, l.cap, l.expert_cap,
                                                                          grouped_row, seg_begin, seg_count, dropped);
    local(launched());
  }
  const Index grouped_rows = low_latency ? l.grouped_rows : received;
  if (failed.is_ok() && low_latency) {
    local(cuda(cudaMemsetAsync(grouped, 0, static_cast<std::size_t>(l.grouped_rows) * row_bytes, stream), "memset"));
  }
  if (failed.is_ok() && l.rows > 0 && H > 0) {  // grouped[grouped_row[i]] = recv[i]
    copy_rows_kernel<IO><<<blocks_for(l.rows, 1), 128, 0, stream>>>(recv, nullptr, 1, grouped, grouped_row, l.rows, H, H);
    local(launched());
  }
  // 5. Experts.
  if (failed.is_ok()) {
    ExpertRows<IO, DeviceSpace> rows;
    rows.input = DeviceView<const IO, 2>(grouped, {grouped_rows, H});
    rows.output = DeviceView<IO, 2>(grouped_out, {grouped_rows, H});
    rows.seg_begin = DeviceView<const Index, 1>(seg_begin, {n});
    rows.seg_count = DeviceView<const Index, 1>(seg_count, {n});
    rows.max_rows_per_expert = low_latency ? l.expert_cap : largest_expert;
    local(experts(rows, stream));
  }
  // 6. Return: recv[i] = grouped_out[grouped_row[i]] (zeros for a dropped row), then back along
  // the reverse route.
  if (failed.is_ok() && l.rows > 0 && H > 0) {
    copy_rows_kernel<IO><<<blocks_for(l.rows, 1), 128, 0, stream>>>(grouped_out, grouped_row, 1, recv, nullptr, l.rows, H, H);
    local(launched());
  }
  MOE_RETURN_IF_ERROR(comm.all_to_all_v(recv, offsets, recv_bytes, send, offsets, send_bytes, stream));
  MOE_RETURN_IF_ERROR(failed);  // the output is written only when every step succeeded
  // 7. Combine.
  if (M > 0 && H > 0) {
    combine_kernel<IO><<<blocks_for(M, 1), 128, 0, stream>>>(send, H, slot_row, tokens.topk_weights.data(),
                                                              tokens.topk_weights.stride(0), M, k, output.data(), output.stride(0));
    MOE_RETURN_IF_ERROR(launched());
  }
  return Status::ok();
}

}  // namespace moe::cuda
