// `moe`: run, describe or time one MoE layer of a Hugging Face checkpoint. See cli/commands.cc.
#include <iostream>

#include "cli/commands.h"

int main(int argc, char** argv) {
  moe::cli::install_signal_handlers();
  return moe::cli::run_tool(std::vector<std::string>(argv + 1, argv + argc), std::cout, std::cerr);
}
