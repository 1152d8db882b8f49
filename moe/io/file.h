// Opening files that come from strangers: regular files only (after symbolic links), never
// blocking on a FIFO or a device, and text reads with a size cap.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "moe/status.h"

namespace moe::io {

// Opens `path` for reading. A FIFO, socket, device or directory is refused without blocking
// (the open is non-blocking; blocking is restored once the file is known to be regular). On
// success *fd is the descriptor (the caller closes it) and *size the file's size in bytes.
// Errors name `what` (the flag or role of the file) and the path.
Status open_regular_file(const std::string& path, std::string_view what, int* fd, std::size_t* size);

// The whole of a regular text file of at most `max_bytes` bytes (JSON configs and indexes).
Status read_text_file(const std::string& path, std::string_view what, std::size_t max_bytes, std::string* out);

// Largest config.json / model.safetensors.index.json accepted: real ones are kilobytes to a few
// megabytes (DeepSeek-V3's index: ~9 MB).
inline constexpr std::size_t kMaxJsonFileBytes = std::size_t{64} << 20;

// Whether `name` (a shard named by an index) is a relative path that stays inside the index's
// folder: not empty, not absolute, no ".." component, no NUL. Symbolic links inside the folder
// are followed when the shard is opened (the Hugging Face cache links every file into blobs/).
bool is_contained_relative_path(std::string_view name);

}  // namespace moe::io
