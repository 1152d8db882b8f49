// Fuzz target: the JSON parser (configs, indexes and safetensors headers all go through it).
// Any input must give a Status, never a crash, a hang or a sanitizer report; a parsed value must
// dump to text that parses back to an equal value.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "moe/io/json.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  moe::io::Json j;
  if (!moe::io::parse_json(text, &j).is_ok()) return 0;
  moe::io::Json again;
  if (!moe::io::parse_json(j.dump(), &again).is_ok() || !(again == j)) std::abort();  // round trip
  return 0;
}
