// The tool's signal handlers (cli/commands.h, install_signal_handlers).
#include <unistd.h>

#include <csignal>

#include "cli/commands.h"
#include "moe/io/safetensors.h"

namespace moe::cli {
namespace {

extern "C" void remove_temporary_and_die(int sig) {
  moe::io::remove_pending_temporary_file();
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

// The layer copies what it keeps at load, so a truncated mapping can only strike while a file is
// read: report it as the one-line error of a failed command (exit 1) instead of dying of it.
extern "C" void truncated_mapping(int) {
  moe::io::remove_pending_temporary_file();
  static const char kMessage[] =
      "moe: a checkpoint or input file was truncated while being read (SIGBUS); nothing was written\n";
  [[maybe_unused]] const auto n = ::write(2, kMessage, sizeof(kMessage) - 1);
  ::_exit(1);
}

}  // namespace

void install_signal_handlers() {
  for (const int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction sa = {};
    sa.sa_handler = remove_temporary_and_die;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, nullptr);
  }
  struct sigaction bus = {};
  bus.sa_handler = truncated_mapping;
  sigemptyset(&bus.sa_mask);
  sigaction(SIGBUS, &bus, nullptr);
}

}  // namespace moe::cli
