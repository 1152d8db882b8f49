// `moe run --launch local`: one process per rank on this machine. The launcher re-executes the
// tool once per (EP, TP) rank with that rank's flags and a rendezvous directory of its own
// (mkdtemp, removed at the end); the ranks add their partial outputs through files there
// (moe/parallel/file_group.h) and rank 0 writes the one full output. On the cuda backend rank r
// sees one GPU, the (r mod count)-th visible one (CUDA_VISIBLE_DEVICES, within the caller's list
// when it set one). When a rank fails the launcher stops the others, and a rank whose launcher
// dies is stopped too: nothing is left running or waiting.
#pragma once

#include <ostream>
#include <string>
#include <vector>

namespace moe::cli {

// The running `moe` executable, set by main(). Empty when the tool runs inside another program
// (tests calling run_tool), where --launch is refused.
void set_tool_executable(std::string path);
const std::string& tool_executable();

// Runs `ranks` copies of the tool with `args` plus, for rank r = ep_rank * tp_size + tp_rank,
// `--ep-rank`, `--tp-rank` and `--rendezvous DIR`. Returns the run's exit code (the first failing
// rank's, else 0); messages about the launch itself go to `err`.
int launch_local(const std::vector<std::string>& args, int ep_size, int tp_size, bool cuda, std::ostream& err);

}  // namespace moe::cli
