#include "moe/io/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace moe::io {
namespace {

const char* kind_of(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

}  // namespace

Status open_regular_file(const std::string& path, std::string_view what, int* fd_out, std::size_t* size) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) return invalid_argument(what, " ", path, ": cannot open: ", std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return invalid_argument(what, " ", path, ": cannot stat: ", std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return invalid_argument(what, " ", path, ": expected a regular file, found ", kind_of(st.st_mode));
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    const int err = errno;
    ::close(fd);
    return invalid_argument(what, " ", path, ": cannot set blocking reads: ", std::strerror(err));
  }
  *fd_out = fd;
  *size = static_cast<std::size_t>(st.st_size);
  return Status::ok();
}

Status read_text_file(const std::string& path, std::string_view what, std::size_t max_bytes, std::string* out) {
  int fd = -1;
  std::size_t size = 0;
  MOE_RETURN_IF_ERROR(open_regular_file(path, what, &fd, &size));
  if (size > max_bytes) {
    ::close(fd);
    return invalid_argument(what, " ", path, ": ", size, " bytes, more than the ", max_bytes, " accepted");
  }
  std::string text;
  char buf[1 << 16];
  while (true) {
    const ssize_t r = ::read(fd, buf, sizeof(buf));
    if (r < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return invalid_argument(what, " ", path, ": read failed: ", std::strerror(err));
    }
    if (r == 0) break;
    if (text.size() + static_cast<std::size_t>(r) > max_bytes) {  // grew while being read
      ::close(fd);
      return invalid_argument(what, " ", path, ": more than the ", max_bytes, " bytes accepted");
    }
    text.append(buf, static_cast<std::size_t>(r));
  }
  ::close(fd);
  *out = std::move(text);
  return Status::ok();
}

bool is_contained_relative_path(std::string_view name) {
  if (name.empty() || name.front() == '/' || name.find('\0') != std::string_view::npos) return false;
  std::size_t begin = 0;
  while (begin <= name.size()) {
    const std::size_t end = std::min(name.find('/', begin), name.size());
    if (name.substr(begin, end - begin) == "..") return false;
    begin = end + 1;
  }
  return true;
}

}  // namespace moe::io
