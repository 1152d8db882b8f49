// `moe`: run, describe or time one MoE layer of a Hugging Face checkpoint. See cli/commands.cc.
#include <iostream>

#include "cli/commands.h"
#include "cli/launch.h"

int main(int argc, char** argv) {
  moe::cli::install_signal_handlers();
  moe::cli::set_tool_executable("/proc/self/exe");  // --launch re-executes this binary per rank
  return moe::cli::run_tool(std::vector<std::string>(argv + 1, argv + argc), std::cout, std::cerr);
}
