// `moe`: run, describe or time one MoE layer of a Hugging Face checkpoint. See cli/commands.cc.
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

}  // namespace

int main(int argc, char** argv) {
  for (const int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction sa = {};
    sa.sa_handler = remove_temporary_and_die;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, nullptr);
  }
  return moe::cli::run_tool(std::vector<std::string>(argv + 1, argv + argc), std::cout, std::cerr);
}
