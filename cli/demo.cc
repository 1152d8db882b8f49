// The README's main job: writes a small random Qwen3-MoE checkpoint in Hugging Face layout
// (config.json + model.safetensors) and an input file to a temporary directory, then runs
// `moe info` and `moe run` on it, exactly as a user would, and prints the result summary.
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <random>

#include <unistd.h>

#include "cli/commands.h"
#include "moe/io/safetensors.h"
#include "moe/io/synthetic_checkpoint.h"

int main() {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("moe_demo_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  moe::io::HfLayerSpec spec;
  spec.architecture = "Qwen3MoeForCausalLM";
  spec.hidden = 256;
  spec.intermediate = 128;
  spec.num_experts = 16;
  spec.top_k = 4;
  moe::io::HfCheckpointWriter writer(spec);
  moe::check(writer.write(dir.string()));

  const moe::Index M = 32;
  std::mt19937 gen(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<moe::bfloat16> hidden(M * spec.hidden);
  for (auto& x : hidden) x = moe::bfloat16(nd(gen));
  moe::check(moe::io::write_safetensors((dir / "inputs.safetensors").string(),
                                        {{"hidden_states", moe::DType::kBF16, {M, spec.hidden}, hidden.data()}}));
  std::cout << "demo: wrote a random " << spec.architecture << " layer (E=" << spec.num_experts << ", top_k "
            << spec.top_k << ", H=" << spec.hidden << ", I=" << spec.intermediate << ") to " << dir << "\n\n";
  const std::vector<std::string> common = {"--model-config", (dir / "config.json").string(), "--weights",
                                           (dir / "model.safetensors").string(), "--layer-prefix", writer.prefix()};
  std::vector<std::string> info = {"info"};
  info.insert(info.end(), common.begin(), common.end());
  std::cout << "$ moe info ...\n";
  int rc = moe::cli::run_tool(info, std::cout, std::cerr);
  std::vector<std::string> run = {"run", "--inputs", (dir / "inputs.safetensors").string(), "--output",
                                  (dir / "outputs.safetensors").string()};
  run.insert(run.end(), common.begin(), common.end());
  std::cout << "\n$ moe run ...\n";
  if (rc == 0) rc = moe::cli::run_tool(run, std::cout, std::cerr);
  fs::remove_all(dir);
  return rc;
}
