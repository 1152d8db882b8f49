// The `moe` tool's signal handling (cli/commands.h, install_signal_handlers), in child processes:
// a SIGTERM or SIGINT while the output's temporary file exists removes it and the process dies of
// the signal; a SIGBUS (a mapped file truncated under the tool) removes it and exits 1 with the
// one-line error; a real truncation of a mapped file read afterwards is that SIGBUS.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "moe/io/safetensors.h"

namespace {

namespace fs = std::filesystem;

fs::path fresh_dir(const std::string& name) {
  const fs::path d = fs::path(::testing::TempDir()) / ("signal_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::vector<std::string> entries(const fs::path& d) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(d)) names.push_back(e.path().filename().string());
  return names;
}

int g_signal_to_raise = 0;
extern "C" void raise_configured_signal() { std::raise(g_signal_to_raise); }

// In a child: install the tool's handlers, then write a safetensors file whose write raises `sig`
// once its temporary exists. Returns the child's wait status.
int write_interrupted_by(int sig, const fs::path& out) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    moe::cli::install_signal_handlers();
    g_signal_to_raise = sig;
    moe::io::set_temporary_created_hook(&raise_configured_signal);
    const std::vector<float> data(64, 1.0f);
    const moe::Status s = moe::io::write_safetensors(out.string(), {{"x", moe::DType::kF32, {64}, data.data()}});
    ::_exit(s.is_ok() ? 0 : 3);  // not reached when the handler ends the process
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

TEST(Signals, TerminationRemovesTheTemporaryAndDiesOfTheSignal) {
  for (const int sig : {SIGTERM, SIGINT, SIGHUP}) {
    const fs::path d = fresh_dir("term" + std::to_string(sig));
    const int status = write_interrupted_by(sig, d / "out.safetensors");
    ASSERT_TRUE(WIFSIGNALED(status)) << "signal " << sig << ": status " << status;
    EXPECT_EQ(WTERMSIG(status), sig);
    EXPECT_TRUE(entries(d).empty()) << "signal " << sig << " left " << entries(d).front();
    fs::remove_all(d);
  }
}

TEST(Signals, BusErrorRemovesTheTemporaryAndExitsOne) {
  const fs::path d = fresh_dir("bus");
  const int status = write_interrupted_by(SIGBUS, d / "out.safetensors");
  ASSERT_TRUE(WIFEXITED(status)) << "status " << status;
  EXPECT_EQ(WEXITSTATUS(status), 1);
  EXPECT_TRUE(entries(d).empty()) << "left " << entries(d).front();
  fs::remove_all(d);
}

TEST(Signals, ReadingATruncatedMappingIsTheOneLineErrorNotACrash) {
  const fs::path d = fresh_dir("truncated");
  const fs::path f = d / "weights.bin";
  { std::ofstream(f, std::ios::binary) << std::string(1 << 16, 'w'); }
  int pipe_fd[2];
  ASSERT_EQ(::pipe(pipe_fd), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(pipe_fd[1], 2);
    moe::cli::install_signal_handlers();
    const int fd = ::open(f.c_str(), O_RDONLY);
    void* p = ::mmap(nullptr, 1 << 16, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) ::_exit(4);
    if (::truncate(f.c_str(), 0) != 0) ::_exit(5);  // as another process would
    volatile char c = static_cast<const char*>(p)[(1 << 16) - 1];  // SIGBUS here
    (void)c;
    ::_exit(0);
  }
  ::close(pipe_fd[1]);
  std::string err;
  char buf[256];
  for (ssize_t n; (n = ::read(pipe_fd[0], buf, sizeof(buf))) > 0;) err.append(buf, static_cast<std::size_t>(n));
  ::close(pipe_fd[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status)) << "status " << status;
  EXPECT_EQ(WEXITSTATUS(status), 1);
  EXPECT_EQ(err, "moe: a checkpoint or input file was truncated while being read (SIGBUS); nothing was written\n");
  fs::remove_all(d);
}

}  // namespace
