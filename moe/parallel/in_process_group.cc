#include "moe/parallel/in_process_group.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <new>
#include <system_error>
#include <thread>

namespace moe::parallel {

class InProcessGroup::Rank final : public Communicator {
 public:
  Rank(InProcessGroup* group, int rank) : group_(group), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return group_->size_; }
  Status all_to_all_v(std::span<const std::byte> send, std::span<const std::size_t> send_bytes, std::span<std::byte> recv,
                      std::span<const std::size_t> recv_bytes) override {
    return group_->collective(rank_, Post{Post::Kind::kAllToAll, send, send_bytes, recv, recv_bytes});
  }
  Status all_gather(std::span<const std::byte> send, std::span<std::byte> recv) override {
    return group_->collective(rank_, Post{Post::Kind::kAllGather, send, {}, recv, {}});
  }

 private:
  InProcessGroup* group_;
  int rank_;
};

InProcessGroup::InProcessGroup(int size) : size_(size), posts_(static_cast<std::size_t>(size)) {
  for (int r = 0; r < size; ++r) ranks_.push_back(std::make_unique<Rank>(this, r));
}

InProcessGroup::~InProcessGroup() = default;

Status InProcessGroup::create(int size, std::unique_ptr<InProcessGroup>* out) {
  if (size < 1 || size > kMaxRanks) return invalid_argument("size: expected 1 <= ranks <= ", kMaxRanks, ", got ", size);
  out->reset(new InProcessGroup(size));
  return Status::ok();
}

bool InProcessGroup::wait_for_all(std::unique_lock<std::mutex>& lock) {
  if (left_ > 0) return false;
  const std::uint64_t generation = generation_;
  if (++arrived_ == size_) {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
    return true;
  }
  cv_.wait(lock, [&] { return generation_ != generation || left_ > 0; });
  return generation_ != generation;  // everyone arrived, even if one left afterwards
}

namespace {
bool overlaps(std::span<const std::byte> a, std::span<std::byte> b) {
  if (a.empty() || b.empty()) return false;
  const std::byte* b0 = b.data();
  return a.data() < b0 + b.size() && b0 < a.data() + a.size();
}
std::size_t sum(std::span<const std::size_t> v) {
  std::size_t s = 0;
  for (std::size_t x : v) s = x > SIZE_MAX - s ? SIZE_MAX : s + x;
  return s;
}
}  // namespace

Status InProcessGroup::check_posts() const {
  const auto n = static_cast<std::size_t>(size_);
  for (std::size_t r = 0; r < n; ++r) {
    const Post& p = posts_[r];
    if (p.kind != posts_[0].kind) {
      return invalid_argument("collective mismatch: rank 0 and rank ", r, " called different collectives");
    }
    if (overlaps(p.send, p.recv)) return invalid_argument("rank ", r, ": send and recv buffers overlap");
    if (p.kind == Post::Kind::kAllGather) {
      if (p.send.size() != posts_[0].send.size()) {
        return invalid_argument("all_gather: rank ", r, " sends ", p.send.size(), " bytes, rank 0 sends ",
                                posts_[0].send.size(), "; expected the same count on every rank");
      }
      if (p.recv.size() / n < p.send.size()) {
        return invalid_argument("all_gather: rank ", r, "'s recv holds ", p.recv.size(), " bytes; expected ranks (", n,
                                ") x ", p.send.size());
      }
      continue;
    }
    if (p.send_bytes.size() != n || p.recv_bytes.size() != n) {
      return invalid_argument("all_to_all_v: rank ", r, " passed ", p.send_bytes.size(), " send and ", p.recv_bytes.size(),
                              " recv counts; expected one per rank (", n, ")");
    }
    if (sum(p.send_bytes) > p.send.size()) {
      return invalid_argument("all_to_all_v: rank ", r, "'s send counts add up to ", sum(p.send_bytes),
                              " bytes; its send buffer holds ", p.send.size());
    }
    if (sum(p.recv_bytes) > p.recv.size()) {
      return invalid_argument("all_to_all_v: rank ", r, "'s recv counts add up to ", sum(p.recv_bytes),
                              " bytes; its recv buffer holds ", p.recv.size());
    }
  }
  if (posts_[0].kind == Post::Kind::kAllToAll) {
    for (std::size_t s = 0; s < n; ++s) {
      for (std::size_t d = 0; d < n; ++d) {
        if (posts_[s].send_bytes[d] != posts_[d].recv_bytes[s]) {
          return invalid_argument("all_to_all_v: rank ", s, " sends ", posts_[s].send_bytes[d], " bytes to rank ", d,
                                  ", which expects recv_bytes[", s, "] = ", posts_[d].recv_bytes[s]);
        }
      }
    }
  }
  return Status::ok();
}

Status InProcessGroup::collective(int rank, const Post& post) {
  const auto me = static_cast<std::size_t>(rank);
  const auto n = static_cast<std::size_t>(size_);
  Status verdict;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    posts_[me] = post;
    if (!wait_for_all(lock)) return aborted("rank ", rank, ": another rank left the group before this collective");
    verdict = check_posts();  // every rank reaches the same verdict from the same posts
  }
  if (verdict.is_ok()) {
    // Copy the blocks addressed to this rank out of the senders' buffers (read-only while every
    // rank is between the two waits).
    std::size_t at = 0;
    for (std::size_t s = 0; s < n; ++s) {
      const Post& from = posts_[s];
      std::size_t offset = 0, bytes = 0;
      if (post.kind == Post::Kind::kAllGather) {
        bytes = from.send.size();
      } else {
        for (std::size_t d = 0; d < me; ++d) offset += from.send_bytes[d];
        bytes = from.send_bytes[me];
      }
      if (bytes > 0) std::memcpy(post.recv.data() + at, from.send.data() + offset, bytes);
      at += bytes;
    }
  }
  std::unique_lock<std::mutex> lock(mutex_);
  // The senders' buffers stay readable until every rank has copied.
  if (!wait_for_all(lock)) return aborted("rank ", rank, ": another rank left the group during a collective");
  posts_[me] = Post{};
  return verdict;
}

Status InProcessGroup::run(const std::function<Status(Communicator&)>& body) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    left_ = 0;
    arrived_ = 0;
  }
  std::vector<Status> results(static_cast<std::size_t>(size_));
  Status not_started;
  {
    std::vector<std::jthread> threads;
    threads.reserve(static_cast<std::size_t>(size_));
    for (int r = 0; r < size_; ++r) {
      try {
        threads.emplace_back([&, r] {
          Status& result = results[static_cast<std::size_t>(r)];
          // An exception leaves this rank like an error does (a std::jthread would terminate).
          try {
            result = body(*ranks_[static_cast<std::size_t>(r)]);
          } catch (const std::bad_alloc&) {
            result = make_status(StatusCode::kInvalidArgument, "rank ", r, ": out of memory");
          } catch (const std::exception& e) {
            result = make_status(StatusCode::kInternal, "rank ", r, ": ", e.what());
          } catch (...) {
            result = make_status(StatusCode::kInternal, "rank ", r, ": an exception of unknown type");
          }
          std::lock_guard<std::mutex> lock(mutex_);
          ++left_;
          cv_.notify_all();
        });
      } catch (...) {
        // No thread for ranks r and up (std::system_error, or bad_alloc in the thread's state):
        // they count as left, so the started ones are released from their collectives instead
        // of waiting for them.
        not_started = make_status(StatusCode::kInternal, "cannot start the thread of rank ", r, " of ", size_);
        std::lock_guard<std::mutex> lock(mutex_);
        left_ += size_ - r;
        cv_.notify_all();
        break;
      }
    }
  }
  if (!not_started.is_ok()) return not_started;
  // A rank's own error before one that only reports being released by another rank.
  for (const Status& s : results) {
    if (!s.is_ok() && s.code() != StatusCode::kAborted) return s;
  }
  for (const Status& s : results) {
    if (!s.is_ok()) return s;
  }
  return Status::ok();
}

}  // namespace moe::parallel
