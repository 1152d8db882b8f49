// The collectives an expert- or tensor-parallel forward needs, as one interface: what a rank
// sends to and receives from every other rank of its group.
//
//   Communicator        rank(), size(), all_to_all_v and all_gather on byte blocks in host memory.
//                       InProcessGroup (moe/parallel/in_process_group.h) implements it over
//                       threads of one process: the CPU tests' ranks, and the single-process
//                       multi-rank mode. The NCCL communicator is the same set of operations on
//                       device memory, ordered on a stream.
//   exchange_counts, all_to_all_rows, all_reduce_sum
//                       typed helpers over those two operations.
//
// Block layout (MPI's Alltoallv with packed displacements): block r of a buffer holds bytes
// [sum of counts[0..r), + counts[r]). Collectives are collective: every rank of the group calls the
// same ones in the same order. Arguments that disagree between ranks (rank s sends a different
// count than rank d expects) are an error on every rank, found before any rank writes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>
#include <type_traits>
#include <vector>

#include "moe/quant/numeric.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::parallel {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Sends block r of `send` (send_bytes[r] bytes) to rank r and receives rank r's block for this
  // rank into block r of `recv` (recv_bytes[r] bytes, which must be what rank r sends here).
  // Both count arrays have size() entries; the buffers hold at least their sums and do not overlap.
  virtual Status all_to_all_v(std::span<const std::byte> send, std::span<const std::size_t> send_bytes,
                              std::span<std::byte> recv, std::span<const std::size_t> recv_bytes) = 0;
  // Every rank's `send` (the same byte count on every rank) into block r of `recv` (size() * bytes).
  virtual Status all_gather(std::span<const std::byte> send, std::span<std::byte> recv) = 0;
};

// Byte counts of blocks of `counts[r]` elements of `bytes_per_element` bytes each, checked for
// overflow (counts come from other ranks).
inline Status block_bytes(std::span<const Index> counts, std::size_t bytes_per_element, const char* what,
                          std::vector<std::size_t>* out) {
  out->assign(counts.size(), 0);
  std::size_t total = 0;
  for (std::size_t r = 0; r < counts.size(); ++r) {
    const Index c = counts[r];
    if (c < 0) return invalid_argument(what, ": block ", r, " has a negative count ", c);
    const auto n = static_cast<std::size_t>(c);
    if (bytes_per_element != 0 && n > (SIZE_MAX - total) / bytes_per_element) {
      return invalid_argument(what, ": block ", r, " of ", c, " elements overflows the byte count");
    }
    (*out)[r] = n * bytes_per_element;
    total += (*out)[r];
  }
  return Status::ok();
}

// Rank r receives send_counts[r] of every rank: the per-peer element counts an all-to-all needs.
inline Status exchange_counts(Communicator& comm, std::span<const Index> send_counts, std::span<Index> recv_counts) {
  const auto n = static_cast<std::size_t>(comm.size());
  if (send_counts.size() != n || recv_counts.size() != n) {
    return invalid_argument("exchange_counts: expected ", n, " counts (one per rank) to send and receive, got ",
                            send_counts.size(), " and ", recv_counts.size());
  }
  const std::vector<std::size_t> one(n, sizeof(Index));
  return comm.all_to_all_v(std::as_bytes(send_counts), one, std::as_writable_bytes(recv_counts), one);
}

// all_to_all_v of whole elements (rows of `width` values of T): block r holds counts[r] * width.
template <class T>
Status all_to_all_rows(Communicator& comm, std::span<const T> send, std::span<const Index> send_counts, std::span<T> recv,
                       std::span<const Index> recv_counts, Index width, const char* what) {
  static_assert(std::is_trivially_copyable_v<T>);
  const auto n = static_cast<std::size_t>(comm.size());
  if (send_counts.size() != n || recv_counts.size() != n) {
    return invalid_argument(what, ": expected ", n, " send and receive counts, got ", send_counts.size(), " and ",
                            recv_counts.size());
  }
  if (width < 0) return invalid_argument(what, ": expected a row width >= 0, got ", width);
  std::vector<std::size_t> send_bytes, recv_bytes;
  const std::size_t row_bytes = static_cast<std::size_t>(width) * sizeof(T);
  MOE_RETURN_IF_ERROR(block_bytes(send_counts, row_bytes, what, &send_bytes));
  MOE_RETURN_IF_ERROR(block_bytes(recv_counts, row_bytes, what, &recv_bytes));
  return comm.all_to_all_v(std::as_bytes(send), send_bytes, std::as_writable_bytes(recv), recv_bytes);
}

// The sum over ranks of `data` (every rank's partial), on every rank: float sums in rank order,
// rounded once to T. Gathering and adding locally in a fixed order gives every rank the same bits
// whatever the transport (a ring all-reduce adds in an order that depends on the rank).
template <class T>
Status all_reduce_sum(Communicator& comm, std::span<T> data) {
  static_assert(std::is_trivially_copyable_v<T>);
  const auto n = static_cast<std::size_t>(comm.size());
  if (data.size() > SIZE_MAX / sizeof(T) / n) return invalid_argument("all_reduce_sum: ", data.size(), " elements overflow");
  std::vector<T> gathered(data.size() * n);
  MOE_RETURN_IF_ERROR(comm.all_gather(std::as_bytes(std::span<const T>(data)), std::as_writable_bytes(std::span<T>(gathered))));
  for (std::size_t i = 0; i < data.size(); ++i) {
    float sum = 0.0f;
    for (std::size_t r = 0; r < n; ++r) sum += to_float(gathered[r * data.size() + i]);
    data[i] = from_float<T>(sum);
  }
  return Status::ok();
}

}  // namespace moe::parallel
