// Fuzz target: config.json to a layer plan (every architecture's keys, defaults and range checks).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "moe/io/json.h"
#include "moe/layer/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  moe::io::Json j;
  if (!moe::io::parse_json(std::string_view(reinterpret_cast<const char*>(data), size), &j).is_ok()) return 0;
  moe::layer::ModelConfig c;
  (void)moe::layer::parse_model_config(j, &c);
  return 0;
}
