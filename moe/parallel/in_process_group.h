// A group of ranks that are threads of one process, exchanging through shared memory: the CPU
// tests' ranks and the single-process multi-rank mode. Communicators of the group are handed to
// `run`, which starts one thread per rank.
//
// Never hangs: a rank that returns (an error, or fewer collectives than the others) releases every
// rank waiting in a collective with an error instead of leaving it blocked, and arguments that
// disagree between ranks are refused on every rank before any rank writes.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "moe/parallel/communicator.h"

namespace moe::parallel {

class InProcessGroup {
 public:
  // Status::ok() and a group of `size` ranks, or an error for size < 1 or > kMaxRanks.
  static constexpr int kMaxRanks = 1024;
  static Status create(int size, std::unique_ptr<InProcessGroup>* out);
  ~InProcessGroup();

  int size() const { return size_; }
  // Runs body(communicator of rank r) for every rank r on its own thread and waits for all. Returns
  // the error of the lowest failing rank (a rank released from a collective because another left
  // reports that instead), or ok.
  Status run(const std::function<Status(Communicator&)>& body);

 private:
  class Rank;
  struct Post {
    enum class Kind { kNone, kAllToAll, kAllGather } kind = Kind::kNone;
    std::span<const std::byte> send;
    std::span<const std::size_t> send_bytes;
    std::span<std::byte> recv;
    std::span<const std::size_t> recv_bytes;
  };

  explicit InProcessGroup(int size);
  Status collective(int rank, const Post& post);
  Status check_posts() const;  // called with every rank's post in place; the same verdict on all
  bool wait_for_all(std::unique_lock<std::mutex>& lock);  // false: a rank left the group

  int size_;
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::vector<Post> posts_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  std::uint64_t generation_ = 0;
  int left_ = 0;  // ranks whose body returned during the current run
};

}  // namespace moe::parallel
