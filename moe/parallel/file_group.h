// A Communicator between processes (or threads) on one machine through files in a directory
// that they share: what `moe run --launch local` uses to add its ranks' partial outputs. Every
// collective writes this rank's blocks as files (written under a temporary name, then renamed, so
// a reader never sees half a file) and waits for its peers' files. Slow next to NCCL, but it needs
// no GPU and no network, and the tool calls it once per run.
//
// The directory must be the group's own (the launcher makes it with mkdtemp) and stay for the
// group's life; files are named c<call>.<from>.<to> and are not removed (the launcher removes the
// directory). A file of that name already there is an error: the group creates files, it never
// replaces or removes one. A peer that never writes its file is an error after `timeout_seconds`, not a hang; a
// file of another size than the caller expects is an error naming both ranks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "moe/parallel/communicator.h"

namespace moe::parallel {

class FileGroup final : public Communicator {
 public:
  static Status create(const std::string& directory, int size, int rank, double timeout_seconds, std::unique_ptr<FileGroup>* out);

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Status all_to_all_v(std::span<const std::byte> send, std::span<const std::size_t> send_bytes, std::span<std::byte> recv,
                      std::span<const std::size_t> recv_bytes) override;
  Status all_gather(std::span<const std::byte> send, std::span<std::byte> recv) override;

 private:
  FileGroup(std::string directory, int size, int rank, double timeout) : dir_(std::move(directory)), size_(size), rank_(rank), timeout_(timeout) {}
  std::string name(int from, int to) const;
  Status put(int to, std::span<const std::byte> bytes) const;
  Status take(int from, std::span<std::byte> bytes) const;  // waits for the file; exactly bytes.size()

  std::string dir_;
  int size_, rank_;
  double timeout_;
  std::uint64_t call_ = 0;
};

}  // namespace moe::parallel
