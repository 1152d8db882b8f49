#include "cli/launch.h"

#include <dirent.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>

extern char** environ;

namespace moe::cli {
namespace {

std::string& executable() {
  static std::string path;
  return path;
}

// The GPU rank r uses: the (r mod count)-th of the caller's CUDA_VISIBLE_DEVICES list, or of all
// devices when it set none.
std::string device_for(int rank) {
  if (const char* visible = std::getenv("CUDA_VISIBLE_DEVICES"); visible && *visible) {
    std::vector<std::string> ids;
    std::stringstream ss(visible);
    for (std::string id; std::getline(ss, id, ',');) {
      if (!id.empty()) ids.push_back(id);
    }
    if (!ids.empty()) return ids[static_cast<std::size_t>(rank) % ids.size()];
  }
  // The driver lists one directory per GPU; the launcher itself stays off CUDA (its children
  // would inherit an initialized context across fork).
  int count = 0;
  if (DIR* d = ::opendir("/proc/driver/nvidia/gpus")) {
    while (const dirent* e = ::readdir(d)) count += e->d_name[0] != '.';
    ::closedir(d);
  }
  return std::to_string(rank % std::max(count, 1));
}

// Removes the rendezvous directory and the files the ranks wrote in it (nothing else is there:
// mkdtemp made it, mode 0700).
void remove_directory(const std::string& dir) {
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (name != "." && name != "..") ::unlink((dir + "/" + name).c_str());
    }
    ::closedir(d);
  }
  ::rmdir(dir.c_str());
}

// A termination signal that reached the launcher while its ranks ran: it stops them, removes the
// rendezvous directory, then dies of the signal as the tool's own handler would.
volatile sig_atomic_t g_stop_signal = 0;
extern "C" void note_stop_signal(int sig) { g_stop_signal = sig; }

}  // namespace

void set_tool_executable(std::string path) { executable() = std::move(path); }
const std::string& tool_executable() { return executable(); }

int launch_local(const std::vector<std::string>& args, int ep_size, int tp_size, bool cuda, std::ostream& err) {
  if (executable().empty()) {
    err << "moe run: --launch: only the moe executable can launch its ranks (this program embeds the tool)\n";
    return 2;
  }
  const char* tmp = std::getenv("TMPDIR");
  std::string dir = std::string(tmp && *tmp ? tmp : "/tmp") + "/moe-launch-XXXXXX";
  if (!::mkdtemp(dir.data())) {
    err << "moe run: --launch: cannot make a rendezvous directory under " << (tmp && *tmp ? tmp : "/tmp") << ": "
        << std::strerror(errno) << "\n";
    return 1;
  }
  const int ranks = ep_size * tp_size;
  // Every child's argv and environment, built before any fork (only exec follows a fork).
  std::vector<std::vector<std::string>> argvs(static_cast<std::size_t>(ranks)), envs(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    std::vector<std::string>& a = argvs[static_cast<std::size_t>(r)];
    a.push_back(executable());
    a.insert(a.end(), args.begin(), args.end());
    a.insert(a.end(), {"--ep-rank", std::to_string(r / tp_size), "--tp-rank", std::to_string(r % tp_size), "--rendezvous", dir});
    std::vector<std::string>& e = envs[static_cast<std::size_t>(r)];
    for (char** v = environ; *v; ++v) {
      if (!cuda || std::strncmp(*v, "CUDA_VISIBLE_DEVICES=", 21) != 0) e.push_back(*v);
    }
    if (cuda) e.push_back("CUDA_VISIBLE_DEVICES=" + device_for(r));
  }
  const auto pointers = [](std::vector<std::string>& v) {
    std::vector<char*> p;
    for (std::string& s : v) p.push_back(s.data());
    p.push_back(nullptr);
    return p;
  };
  std::vector<std::vector<char*>> argv_ptrs, env_ptrs;
  for (int r = 0; r < ranks; ++r) {
    argv_ptrs.push_back(pointers(argvs[static_cast<std::size_t>(r)]));
    env_ptrs.push_back(pointers(envs[static_cast<std::size_t>(r)]));
  }
  // Until every rank is reaped, a termination signal is noted instead of ending the launcher with
  // its ranks and directory left behind. A signal the caller ignores (nohup's SIGHUP) stays
  // ignored, here and in the ranks.
  g_stop_signal = 0;
  struct sigaction note = {}, previous[3];
  note.sa_handler = note_stop_signal;
  sigemptyset(&note.sa_mask);
  const int stop_signals[3] = {SIGINT, SIGTERM, SIGHUP};
  sigset_t stop_set, unblocked;
  sigemptyset(&stop_set);
  for (int i = 0; i < 3; ++i) {
    sigaddset(&stop_set, stop_signals[i]);
    ::sigaction(stop_signals[i], nullptr, &previous[i]);
    if (previous[i].sa_handler != SIG_IGN) ::sigaction(stop_signals[i], &note, nullptr);
  }
  const pid_t launcher = ::getpid();
  std::vector<pid_t> pids(static_cast<std::size_t>(ranks), -1);
  std::vector<bool> running(static_cast<std::size_t>(ranks), false);
  int exit_code = 0;
  const auto stop_all = [&] {
    for (int r = 0; r < ranks; ++r) {
      if (running[static_cast<std::size_t>(r)]) ::kill(pids[static_cast<std::size_t>(r)], SIGTERM);
    }
  };
  for (int r = 0; r < ranks; ++r) {
    // The stop signals are blocked across the fork: the child puts back the caller's dispositions
    // before it unblocks them, so a stop_all() that reaches it before execve ends it (by default)
    // instead of being noted by the launcher's handler and lost at execve.
    ::sigprocmask(SIG_BLOCK, &stop_set, &unblocked);
    const pid_t pid = ::fork();
    if (pid == 0) {
      for (int i = 0; i < 3; ++i) {
        struct sigaction restored = {};
        restored.sa_handler = previous[i].sa_handler == SIG_IGN ? SIG_IGN : SIG_DFL;
        sigemptyset(&restored.sa_mask);
        ::sigaction(stop_signals[i], &restored, nullptr);
      }
      ::sigprocmask(SIG_SETMASK, &unblocked, nullptr);
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // the launcher died: stop
      if (::getppid() != launcher) ::_exit(1);
      ::execve(argv_ptrs[static_cast<std::size_t>(r)][0], argv_ptrs[static_cast<std::size_t>(r)].data(),
               env_ptrs[static_cast<std::size_t>(r)].data());
      ::_exit(127);
    }
    const int fork_errno = errno;
    ::sigprocmask(SIG_SETMASK, &unblocked, nullptr);
    errno = fork_errno;
    if (pid < 0) {
      err << "moe run: --launch: cannot start rank " << r << ": " << std::strerror(errno) << "\n";
      exit_code = 1;
      stop_all();
      break;
    }
    pids[static_cast<std::size_t>(r)] = pid;
    running[static_cast<std::size_t>(r)] = true;
  }
  for (;;) {
    if (g_stop_signal != 0) stop_all();  // also one noted before the first wait
    int status = 0;
    // Polled, not blocking: a signal that lands between the check above and a blocking wait would
    // otherwise go unseen until a rank ends by itself.
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid == 0) {
      ::usleep(10000);
      continue;
    }
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;  // no children left
    }
    int r = 0;
    while (r < ranks && pids[static_cast<std::size_t>(r)] != pid) ++r;
    if (r == ranks) continue;
    running[static_cast<std::size_t>(r)] = false;
    const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (!ok && exit_code == 0) {
      exit_code = WIFEXITED(status) && WEXITSTATUS(status) != 0 ? WEXITSTATUS(status) : 1;
      err << "moe run: rank " << r << " (ep " << r / tp_size << ", tp " << r % tp_size << ") "
          << (WIFEXITED(status) ? "exited with code " + std::to_string(WEXITSTATUS(status))
                                : "died of signal " + std::to_string(WTERMSIG(status)))
          << "; stopping the other ranks\n";
      stop_all();
    }
  }
  remove_directory(dir);
  for (int i = 0; i < 3; ++i) ::sigaction(stop_signals[i], &previous[i], nullptr);
  if (g_stop_signal != 0) ::raise(g_stop_signal);  // the tool's handler (or the default) ends the process
  return exit_code;
}

}  // namespace moe::cli
