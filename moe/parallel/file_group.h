// A Communicator between processes (or threads) on one machine through files in a directory
// that they share: what `moe run --launch local` uses to add its ranks' partial outputs. Every
// collective writes this rank's blocks as files (written under a temporary name, then renamed, so
// a reader never sees half a file) and waits for its peers' files. Slow next to NCCL, but it needs
// no GPU and no network, and the tool calls it once per run.
//
// The directory must be the group's own (the launcher makes it with mkdtemp) and stay for the
// group's life: a directory of this user that no one else may write or read (mode 0700 or
// stricter), not a link. It is opened once and every file is made and read relative to that
// handle, so swapping the path afterwards changes nothing. Files are named c<call>.<from>.<to>
// (c<call>.<from>.all for all_gather, one file every peer reads) and are not removed (the
// launcher removes the directory). A file of that name already there is an error: the group
// creates files, it never replaces or removes one. A peer that never writes its file is an error
// after `timeout_seconds`, not a hang; a file of another size than the caller expects, or one
// that is not a regular file (a FIFO is never waited on), is an error naming both ranks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "moe/parallel/communicator.h"

namespace moe::parallel {

class FileGroup final : public Communicator {
 public:
  static Status create(const std::string& directory, int size, int rank, double timeout_seconds, std::unique_ptr<FileGroup>* out);
  ~FileGroup() override;
  FileGroup(const FileGroup&) = delete;
  FileGroup& operator=(const FileGroup&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Status all_to_all_v(std::span<const std::byte> send, std::span<const std::size_t> send_bytes, std::span<std::byte> recv,
                      std::span<const std::size_t> recv_bytes) override;
  Status all_gather(std::span<const std::byte> send, std::span<std::byte> recv) override;

 private:
  FileGroup(std::string directory, int dir_fd, int size, int rank, double timeout)
      : dir_(std::move(directory)), dir_fd_(dir_fd), size_(size), rank_(rank), timeout_(timeout) {}
  // The file of this call from rank `from` to rank `to` (-1: to every rank).
  std::string name(int from, int to) const;
  Status put(int to, std::span<const std::byte> bytes) const;
  // Waits for the file from `from` to `to`; exactly bytes.size().
  Status take(int from, int to, std::span<std::byte> bytes) const;

  std::string dir_;  // for messages; files go through dir_fd_
  int dir_fd_ = -1;
  int size_, rank_;
  double timeout_;
  std::uint64_t call_ = 0;
};

}  // namespace moe::parallel
