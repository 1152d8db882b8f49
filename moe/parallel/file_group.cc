#include "moe/parallel/file_group.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>

namespace moe::parallel {
namespace {

Status io_error(const std::string& what, const std::string& path) {
  return invalid_argument(what, " ", path, ": ", std::strerror(errno));
}

}  // namespace

Status FileGroup::create(const std::string& directory, int size, int rank, double timeout_seconds, std::unique_ptr<FileGroup>* out) {
  if (size < 1 || size > 1024) return invalid_argument("size: expected 1 to 1024 ranks, got ", size);
  if (rank < 0 || rank >= size) return invalid_argument("rank: expected [0, size=", size, "), got ", rank);
  if (!(timeout_seconds > 0) || timeout_seconds > 86400) {
    return invalid_argument("timeout_seconds: expected (0, 86400], got ", timeout_seconds);
  }
  // Without trailing slashes: "link/" would resolve the link before O_NOFOLLOW could see it.
  std::string path = directory;
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  if (path.empty()) return invalid_argument("directory: expected a path, got an empty one");
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return io_error("directory: expected a directory (not a link or a file); cannot open", directory);
  struct stat st;
  const bool stat_ok = ::fstat(fd, &st) == 0;
  if (!stat_ok || !S_ISDIR(st.st_mode) || st.st_uid != ::geteuid() || (st.st_mode & 077) != 0) {
    ::close(fd);
    return invalid_argument("directory ", directory,
                            ": expected a directory of this user that no one else may read or write (mode 0700, as mkdtemp makes)");
  }
  out->reset(new FileGroup(path, fd, size, rank, timeout_seconds));
  return Status::ok();
}

FileGroup::~FileGroup() {
  if (dir_fd_ >= 0) ::close(dir_fd_);
}

std::string FileGroup::name(int from, int to) const {
  return "c" + std::to_string(call_) + "." + std::to_string(from) + "." + (to < 0 ? std::string("all") : std::to_string(to));
}

Status FileGroup::put(int to, std::span<const std::byte> bytes) const {
  const std::string file = name(rank_, to), temporary = file + ".tmp";
  const int fd = ::openat(dir_fd_, temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return io_error("cannot create", dir_ + "/" + temporary);
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const Status s = io_error("cannot write", dir_ + "/" + temporary);
      ::close(fd);
      ::unlinkat(dir_fd_, temporary.c_str(), 0);
      return s;
    }
    done += static_cast<std::size_t>(n);
  }
  // link, not rename: a file already at `file` is an error, never replaced.
  if (::close(fd) != 0 || ::linkat(dir_fd_, temporary.c_str(), dir_fd_, file.c_str(), 0) != 0) {
    const Status s = io_error("cannot finish", dir_ + "/" + file);
    ::unlinkat(dir_fd_, temporary.c_str(), 0);
    return s;
  }
  ::unlinkat(dir_fd_, temporary.c_str(), 0);
  return Status::ok();
}

Status FileGroup::take(int from, int to, std::span<std::byte> bytes) const {
  const std::string file = name(from, to), path = dir_ + "/" + file;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_);
  auto pause = std::chrono::microseconds(200);
  int fd = -1;
  // O_NONBLOCK: a FIFO planted under the name opens at once (and is refused below) instead of
  // blocking past the timeout.
  while ((fd = ::openat(dir_fd_, file.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)) < 0) {
    if (errno != ENOENT) return io_error("cannot open", path);
    if (std::chrono::steady_clock::now() > deadline) {
      return aborted("rank ", rank_, ": rank ", from, " did not deliver ", path, " within ", timeout_, " s");
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(20000));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return invalid_argument(path, ": expected a regular file");
  }
  if (static_cast<std::size_t>(st.st_size) != bytes.size()) {
    ::close(fd);
    return invalid_argument("rank ", from, " sent ", st.st_size, " bytes to rank ", rank_, ", which expects ", bytes.size());
  }
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::read(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ::close(fd);
      return io_error("cannot read", path);
    }
    done += static_cast<std::size_t>(n);
  }
  ::close(fd);
  return Status::ok();
}

Status FileGroup::all_to_all_v(std::span<const std::byte> send, std::span<const std::size_t> send_bytes, std::span<std::byte> recv,
                               std::span<const std::size_t> recv_bytes) {
  const auto n = static_cast<std::size_t>(size_);
  if (send_bytes.size() != n || recv_bytes.size() != n) {
    return invalid_argument("all_to_all_v: expected ", n, " send and recv counts (one per rank), got ", send_bytes.size(), " and ",
                            recv_bytes.size());
  }
  std::size_t s_total = 0, r_total = 0;
  for (std::size_t r = 0; r < n; ++r) {
    if (send_bytes[r] > send.size() - std::min(send.size(), s_total) || recv_bytes[r] > recv.size() - std::min(recv.size(), r_total)) {
      return invalid_argument("all_to_all_v: the counts of block ", r, " run past the buffers");
    }
    s_total += send_bytes[r];
    r_total += recv_bytes[r];
  }
  ++call_;
  std::size_t at = 0;
  for (std::size_t d = 0; d < n; ++d) {
    MOE_RETURN_IF_ERROR(put(static_cast<int>(d), send.subspan(at, send_bytes[d])));
    at += send_bytes[d];
  }
  // Into a copy first: `recv` is written only when every block arrived with its size.
  std::vector<std::byte> staged(r_total);
  at = 0;
  for (std::size_t s = 0; s < n; ++s) {
    MOE_RETURN_IF_ERROR(take(static_cast<int>(s), rank_, std::span<std::byte>(staged).subspan(at, recv_bytes[s])));
    at += recv_bytes[s];
  }
  std::copy(staged.begin(), staged.end(), recv.begin());
  return Status::ok();
}

Status FileGroup::all_gather(std::span<const std::byte> send, std::span<std::byte> recv) {
  const auto n = static_cast<std::size_t>(size_);
  if (recv.size() / n < send.size()) {
    return invalid_argument("all_gather: recv holds ", recv.size(), " bytes; expected ranks (", n, ") x ", send.size());
  }
  ++call_;
  // One file per rank that every peer reads: n blocks on disk, not n x n.
  MOE_RETURN_IF_ERROR(put(-1, send));
  std::vector<std::byte> staged(send.size() * n);  // `recv` is written only when every block arrived
  for (std::size_t s = 0; s < n; ++s) {
    MOE_RETURN_IF_ERROR(take(static_cast<int>(s), -1, std::span<std::byte>(staged).subspan(s * send.size(), send.size())));
  }
  std::copy(staged.begin(), staged.end(), recv.begin());
  return Status::ok();
}

}  // namespace moe::parallel
