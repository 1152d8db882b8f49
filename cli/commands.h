// The `moe` command-line tool: run one MoE layer of a Hugging Face checkpoint, describe it, or
// time it. main() is a thin wrapper so tests and the demo call the same code.
#pragma once

#include <ostream>
#include <string>
#include <vector>

namespace moe::cli {

// Runs `moe <args>`; writes results to `out`, one-line errors to `err`. Returns the exit code:
// 0 on success, 1 on a failed command, 2 on bad usage.
int run_tool(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

// The tool's signal handling (main() installs it; testing/layer/signal_test.cc checks it):
//  * SIGINT, SIGTERM, SIGHUP: remove the output's temporary file if one is being written, then
//    die of the signal as the default action would (so the caller sees how the tool ended);
//  * SIGBUS (a mapped checkpoint or input file shrank while being read: another process
//    truncated it): remove the temporary file, print the tool's one-line error, exit 1.
void install_signal_handlers();

}  // namespace moe::cli
