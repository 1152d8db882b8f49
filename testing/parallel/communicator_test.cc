// The in-process group's collectives: every block lands where the layout says, disagreeing
// arguments are refused on every rank with nothing written, and no misuse hangs.
#include <gtest/gtest.h>

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "moe/parallel/communicator.h"
#include "moe/parallel/file_group.h"
#include "moe/parallel/in_process_group.h"

namespace {

using moe::Index;
using moe::Status;
using moe::parallel::Communicator;
using moe::parallel::InProcessGroup;

std::unique_ptr<InProcessGroup> group(int ranks) {
  std::unique_ptr<InProcessGroup> g;
  moe::check(InProcessGroup::create(ranks, &g));
  return g;
}

// Rank s sends (s + d) % 3 + d elements to rank d; element i of that block is s * 1000 + d * 100 + i.
Index count(int s, int d) { return (s + d) % 3 + d; }

TEST(InProcessGroup, AllToAllDeliversEveryBlockToItsRank) {
  for (int ranks : {1, 2, 3, 5}) {
    auto g = group(ranks);
    std::vector<std::vector<std::int32_t>> received(static_cast<std::size_t>(ranks));
    const Status s = g->run([&](Communicator& comm) -> Status {
      const int me = comm.rank();
      std::vector<Index> send_counts, recv_counts;
      std::vector<std::int32_t> send;
      for (int d = 0; d < ranks; ++d) {
        send_counts.push_back(count(me, d));
        for (Index i = 0; i < count(me, d); ++i) send.push_back(me * 1000 + d * 100 + static_cast<std::int32_t>(i));
      }
      std::vector<Index> got(static_cast<std::size_t>(ranks));
      MOE_RETURN_IF_ERROR(moe::parallel::exchange_counts(comm, send_counts, got));
      for (int r = 0; r < ranks; ++r) {
        if (got[r] != count(r, me)) return moe::invalid_argument("exchanged count from rank ", r, " is ", got[r]);
      }
      std::vector<std::int32_t> recv(static_cast<std::size_t>(std::accumulate(got.begin(), got.end(), Index{0})));
      MOE_RETURN_IF_ERROR(moe::parallel::all_to_all_rows<std::int32_t>(comm, send, send_counts, recv, got, 1, "test"));
      received[static_cast<std::size_t>(me)] = recv;
      return Status::ok();
    });
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    for (int d = 0; d < ranks; ++d) {
      std::vector<std::int32_t> expected;
      for (int src = 0; src < ranks; ++src) {
        for (Index i = 0; i < count(src, d); ++i) expected.push_back(src * 1000 + d * 100 + static_cast<std::int32_t>(i));
      }
      EXPECT_EQ(received[static_cast<std::size_t>(d)], expected) << "ranks=" << ranks << " rank " << d;
    }
  }
}

TEST(InProcessGroup, AllReduceGivesEveryRankTheSameRankOrderedSum) {
  constexpr int kRanks = 4;
  auto g = group(kRanks);
  std::vector<std::vector<moe::bfloat16>> result(kRanks);
  std::vector<std::vector<moe::bfloat16>> partial(kRanks);
  for (int r = 0; r < kRanks; ++r) {
    for (int i = 0; i < 64; ++i) partial[r].push_back(moe::from_float<moe::bfloat16>(0.37f * static_cast<float>((r + 1) * (i - 20)) + 1e-3f * static_cast<float>(r)));
  }
  ASSERT_TRUE(g->run([&](Communicator& comm) {
                 std::vector<moe::bfloat16> mine = partial[static_cast<std::size_t>(comm.rank())];
                 MOE_RETURN_IF_ERROR(moe::parallel::all_reduce_sum<moe::bfloat16>(comm, mine));
                 result[static_cast<std::size_t>(comm.rank())] = mine;
                 return Status::ok();
               }).is_ok());
  for (int i = 0; i < 64; ++i) {
    float sum = 0.0f;
    for (int r = 0; r < kRanks; ++r) sum += moe::to_float(partial[r][i]);
    for (int r = 0; r < kRanks; ++r) {
      EXPECT_EQ(result[r][i].bits, moe::from_float<moe::bfloat16>(sum).bits) << "element " << i << " rank " << r;
    }
  }
}

TEST(InProcessGroup, DisagreeingCountsAreRefusedOnEveryRankWithNothingWritten) {
  auto g = group(3);
  std::atomic<int> refused{0};
  std::vector<std::vector<std::int32_t>> recv(3, std::vector<std::int32_t>(8, -7));
  const Status s = g->run([&](Communicator& comm) -> Status {
    const int me = comm.rank();
    std::vector<Index> counts(3, 1);
    std::vector<Index> expect(3, 1);
    if (me == 2) expect[0] = 2;  // rank 0 sends one element to rank 2; rank 2 expects two
    std::vector<std::int32_t> send(3, me);
    const Status st = moe::parallel::all_to_all_rows<std::int32_t>(comm, send, counts, recv[static_cast<std::size_t>(me)], expect, 1, "test");
    if (!st.is_ok() && st.to_string().find("rank 0 sends 4 bytes to rank 2") != std::string::npos) ++refused;
    return st;
  });
  EXPECT_FALSE(s.is_ok());
  EXPECT_EQ(refused.load(), 3) << s.to_string();
  for (const auto& r : recv) EXPECT_EQ(r, std::vector<std::int32_t>(8, -7));
}

TEST(InProcessGroup, ARankThatLeavesEarlyReleasesTheOthersWithItsError) {
  auto g = group(4);
  const Status s = g->run([&](Communicator& comm) -> Status {
    if (comm.rank() == 1) return moe::invalid_argument("rank 1's own failure");
    std::vector<std::int32_t> send(4, 0), recv(4, 0);
    return moe::parallel::all_to_all_rows<std::int32_t>(comm, send, std::vector<Index>(4, 1), recv, std::vector<Index>(4, 1), 1, "test");
  });
  EXPECT_NE(s.to_string().find("rank 1's own failure"), std::string::npos) << s.to_string();
  // Different collectives on different ranks are refused, not deadlocked.
  const Status mismatch = g->run([&](Communicator& comm) -> Status {
    std::vector<std::byte> one(4), all(16);
    if (comm.rank() == 0) return comm.all_gather(one, all);
    std::vector<std::int32_t> send(4, 0), recv(4, 0);
    return moe::parallel::all_to_all_rows<std::int32_t>(comm, send, std::vector<Index>(4, 1), recv, std::vector<Index>(4, 1), 1, "test");
  });
  EXPECT_NE(mismatch.to_string().find("collective mismatch"), std::string::npos) << mismatch.to_string();
  // The group is reusable after a failed run.
  EXPECT_TRUE(g->run([](Communicator& comm) {
                 std::vector<std::byte> one(2, std::byte{1}), all(8);
                 return comm.all_gather(one, all);
               }).is_ok());
}

TEST(InProcessGroup, BadSizesAreErrors) {
  std::unique_ptr<InProcessGroup> g;
  EXPECT_NE(InProcessGroup::create(0, &g).to_string().find("size"), std::string::npos);
  g = group(2);
  const Status s = g->run([](Communicator& comm) {
    std::vector<Index> counts(1, 0);  // one count for two ranks
    std::vector<Index> recv(1);
    return moe::parallel::exchange_counts(comm, counts, recv);
  });
  EXPECT_NE(s.to_string().find("one per rank"), std::string::npos) << s.to_string();
}

// A rank whose body throws leaves the group as one that returns an error does: the others are
// released from the collective it never joins, and run() reports the exception as a status.
TEST(InProcessGroup, AnExceptionInARankIsAnErrorNotATermination) {
  auto g = group(3);
  const Status s = g->run([](Communicator& comm) -> Status {
    if (comm.rank() == 1) throw std::runtime_error("a failure deep in a forward");
    std::vector<std::byte> one(4), all(12);
    return comm.all_gather(one, all);
  });
  EXPECT_EQ(s.code(), moe::StatusCode::kInternal) << s.to_string();
  EXPECT_NE(s.to_string().find("rank 1: a failure deep in a forward"), std::string::npos) << s.to_string();
  // The group is usable again afterwards.
  EXPECT_TRUE(g->run([](Communicator& comm) {
                 std::vector<std::byte> one(4), all(12);
                 return comm.all_gather(one, all);
               }).is_ok());
}

// ---- FileGroup: the same collectives through files in a shared directory -------------------------

std::string fresh_directory() {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string pattern = std::string(base ? base : "/tmp") + "/file_group_XXXXXX";
  if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
  return pattern;
}

// Runs body(rank's FileGroup) on one thread per rank (processes in the tool; threads suffice here).
std::vector<Status> run_file_group(int ranks, double timeout, const std::function<Status(Communicator&)>& body) {
  const std::string dir = fresh_directory();
  std::vector<Status> results(static_cast<std::size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      std::unique_ptr<moe::parallel::FileGroup> g;
      results[r] = moe::parallel::FileGroup::create(dir, ranks, r, timeout, &g);
      if (results[r].is_ok()) results[r] = body(*g);
    });
  }
  for (std::thread& t : threads) t.join();
  return results;
}

TEST(FileGroup, AllToAllAndAllReduceMatchTheInProcessGroup) {
  constexpr int kRanks = 3;
  std::vector<std::vector<std::int32_t>> received(kRanks);
  std::vector<std::vector<moe::bfloat16>> reduced(kRanks);
  const auto body = [&](Communicator& comm) -> Status {
    const int me = comm.rank();
    std::vector<Index> send_counts, recv_counts;
    std::vector<std::int32_t> send;
    for (int d = 0; d < kRanks; ++d) {
      send_counts.push_back(count(me, d));
      recv_counts.push_back(count(d, me));
      for (Index i = 0; i < count(me, d); ++i) send.push_back(me * 1000 + d * 100 + static_cast<std::int32_t>(i));
    }
    std::vector<std::int32_t> recv(static_cast<std::size_t>(std::accumulate(recv_counts.begin(), recv_counts.end(), Index{0})));
    MOE_RETURN_IF_ERROR(moe::parallel::all_to_all_rows<std::int32_t>(comm, send, send_counts, recv, recv_counts, 1, "test"));
    received[me] = recv;
    std::vector<moe::bfloat16> mine;
    for (int i = 0; i < 16; ++i) mine.push_back(moe::from_float<moe::bfloat16>(0.3f * static_cast<float>((me + 2) * (i - 7))));
    MOE_RETURN_IF_ERROR(moe::parallel::all_reduce_sum<moe::bfloat16>(comm, mine));
    reduced[me] = mine;
    return Status::ok();
  };
  for (const Status& s : run_file_group(kRanks, 30.0, body)) ASSERT_TRUE(s.is_ok()) << s.to_string();
  const auto file_received = received;
  const auto file_reduced = reduced;
  auto g = group(kRanks);
  ASSERT_TRUE(g->run(body).is_ok());
  EXPECT_EQ(file_received, received);
  for (int r = 0; r < kRanks; ++r) {
    ASSERT_EQ(file_reduced[r].size(), reduced[r].size());
    for (std::size_t i = 0; i < reduced[r].size(); ++i) EXPECT_EQ(file_reduced[r][i].bits, reduced[r][i].bits) << r << " " << i;
  }
}

TEST(FileGroup, AWrongSizeAndAMissingPeerAreErrorsNotHangs) {
  // Rank 1 expects 2 elements from rank 0, which sends 1: rank 1 reports it, naming both.
  const auto wrong = run_file_group(2, 5.0, [](Communicator& comm) {
    std::vector<Index> counts(2, 1), expect(2, 1);
    if (comm.rank() == 1) expect[0] = 2;
    std::vector<std::int32_t> send(2, comm.rank()), recv(3, -1);
    return moe::parallel::all_to_all_rows<std::int32_t>(comm, send, counts, recv, expect, 1, "test");
  });
  EXPECT_NE(wrong[1].to_string().find("rank 0 sent 4 bytes to rank 1, which expects 8"), std::string::npos) << wrong[1].to_string();
  // Rank 1 never calls the collective: rank 0 gives up after its timeout.
  const auto missing = run_file_group(2, 0.2, [](Communicator& comm) -> Status {
    if (comm.rank() == 1) return Status::ok();
    std::vector<std::byte> one(4), all(8);
    return comm.all_gather(one, all);
  });
  EXPECT_EQ(missing[0].code(), moe::StatusCode::kAborted) << missing[0].to_string();
  EXPECT_NE(missing[0].to_string().find("did not deliver"), std::string::npos) << missing[0].to_string();
  // A file already where the group would write is left alone: an error, not a replacement.
  const std::string dir = fresh_directory();
  { std::ofstream(dir + "/c1.0.all") << "a stranger's file"; }
  std::unique_ptr<moe::parallel::FileGroup> fg;
  ASSERT_TRUE(moe::parallel::FileGroup::create(dir, 1, 0, 1.0, &fg).is_ok());
  std::vector<std::byte> one(4), all(4);
  const Status clash = fg->all_gather(one, all);
  EXPECT_NE(clash.to_string().find("c1.0.all"), std::string::npos) << clash.to_string();
  std::ifstream kept(dir + "/c1.0.all");
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(kept), {}), "a stranger's file");
  EXPECT_NE(moe::parallel::FileGroup::create("/nonexistent/dir", 2, 0, 1.0, &fg).to_string().find("directory"), std::string::npos);
  EXPECT_NE(moe::parallel::FileGroup::create(dir, 2, 2, 1.0, &fg).to_string().find("rank"), std::string::npos);
}

// The directory is the group's own: others may not read or write it, and a link to one (also
// spelled with a trailing slash, which would resolve it) is refused. A FIFO planted under a
// peer's file name is an error at once, not a reader blocked past the timeout.
TEST(FileGroup, RefusesSharedDirectoriesLinksAndFifos) {
  std::unique_ptr<moe::parallel::FileGroup> fg;
  const std::string shared = fresh_directory();
  ASSERT_EQ(::chmod(shared.c_str(), 0755), 0);
  EXPECT_NE(moe::parallel::FileGroup::create(shared, 2, 0, 1.0, &fg).to_string().find("mode 0700"), std::string::npos);
  const std::string own = fresh_directory(), link = own + ".link";
  ASSERT_EQ(::symlink(own.c_str(), link.c_str()), 0);
  for (const std::string& spelled : {link, link + "/", link + "//"}) {
    const Status s = moe::parallel::FileGroup::create(spelled, 2, 0, 1.0, &fg);
    EXPECT_FALSE(s.is_ok()) << spelled;
    EXPECT_NE(s.to_string().find("not a link"), std::string::npos) << s.to_string();
  }
  ASSERT_TRUE(moe::parallel::FileGroup::create(own + "/", 2, 0, 30.0, &fg).is_ok());
  ASSERT_EQ(::mkfifo((own + "/c1.1.all").c_str(), 0600), 0);
  std::vector<std::byte> one(4), all(8, std::byte{7});
  const auto t0 = std::chrono::steady_clock::now();
  const Status s = fg->all_gather(one, all);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10)) << "waited on the FIFO";
  EXPECT_NE(s.to_string().find("expected a regular file"), std::string::npos) << s.to_string();
  EXPECT_EQ(all, std::vector<std::byte>(8, std::byte{7})) << "recv written on failure";
}

}  // namespace
