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

}  // namespace moe::cli
