// `moe`: run, describe or time one MoE layer of a Hugging Face checkpoint. See cli/commands.cc.
#include <unistd.h>

#include <csignal>
#include <iostream>

#include "cli/commands.h"
#include "moe/io/safetensors.h"

namespace {

// On SIGINT, SIGTERM or SIGHUP: remove the output's temporary file if one is being written, then
// die of the signal as the default action would (so the caller sees how the tool ended).
extern "C" void remove_temporary_and_die(int sig) {
  moe::io::remove_pending_temporary_file();
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

// SIGBUS: a mapped checkpoint or input file shrank while being read (another process truncated
// it). The layer copies what it keeps at load, so this can only strike during a load: report it
// as the one-line error of a failed command (exit 1) instead of dying of the signal.
extern "C" void truncated_mapping(int) {
  moe::io::remove_pending_temporary_file();
  static const char kMessage[] =
      "moe: a checkpoint or input file was truncated while being read (SIGBUS); nothing was written\n";
  [[maybe_unused]] const auto n = ::write(2, kMessage, sizeof(kMessage) - 1);
  ::_exit(1);
}

}  // namespace

int main(int argc, char** argv) {
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
  return moe::cli::run_tool(std::vector<std::string>(argv + 1, argv + argc), std::cout, std::cerr);
}
