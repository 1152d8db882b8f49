// Fuzz target: a safetensors file from a stranger (header parse, offsets, dtypes, overlaps), then
// every tensor it admits read end to end: no crash, no out-of-bounds read.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "moe/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string path = [] {
    const char* dir = std::getenv("TEST_TMPDIR");
    return std::string(dir ? dir : "/tmp") + "/moe_fuzz_" + std::to_string(::getpid()) + ".safetensors";
  }();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  moe::io::SafetensorsFile file;
  if (!moe::io::SafetensorsFile::open(path, &file).is_ok()) return 0;
  volatile unsigned sum = 0;
  for (const std::string& name : file.names()) {
    moe::AnyTensor t;
    if (!file.tensor(name, &t).is_ok()) continue;
    std::size_t bytes = moe::io::dtype_size(t.dtype);
    for (moe::Index e : t.extents) bytes *= static_cast<std::size_t>(e);
    for (std::size_t i = 0; i < bytes; ++i) sum = sum + static_cast<const unsigned char*>(t.data)[i];
  }
  return 0;
}
