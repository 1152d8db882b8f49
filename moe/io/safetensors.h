// Reading and writing safetensors checkpoints (https://huggingface.co/docs/safetensors).
//
// File layout: an 8-byte little-endian header length N, N bytes of JSON header
//   {"__metadata__": {"key": "value", ...},
//    "<tensor name>": {"dtype": "BF16", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}
// then the data buffer; offsets are bytes relative to the buffer's start.
//
// SafetensorsFile memory-maps one file read-only and validates its whole header at open():
// every entry's dtype, shape and offsets, the size shape*dtype against the offsets, and that no
// two tensors overlap. Every error names the file, and the tensor where there is one.
//
// READ-ONLY DATA: tensors come back as moe::AnyTensor, whose `data` is a `void*` for the sake of
// the library's run-time binding, but it points into a PROT_READ mapping: writing through it
// crashes (SIGSEGV). Bind it to a view of const elements (HostView<const T, R>), as get() does.
// The pointers stay valid while the SafetensorsFile / Checkpoint that made them is alive (moving
// it keeps them valid; destroying it unmaps the file).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "moe/any_tensor.h"
#include "moe/io/json.h"
#include "moe/status.h"
#include "moe/tensor.h"

namespace moe::io {

// The safetensors spelling of a dtype: "F32", "F16", "BF16", "F8_E4M3", "I8", "U8", "I32", "I64".
std::string_view safetensors_dtype_name(DType dtype);
// The inverse. Other safetensors dtypes (F64, BOOL, F8_E5M2, ...) are kUnsupported; names that
// are no safetensors dtype at all are kInvalidArgument.
Status parse_safetensors_dtype(std::string_view name, DType* out);
// Bytes per element.
std::size_t dtype_size(DType dtype);

// One entry of a file's header.
struct TensorInfo {
  DType dtype = DType::kF32;
  std::vector<Index> shape;  // empty: a scalar
  std::uint64_t begin = 0;   // byte offsets in the data buffer, [begin, end)
  std::uint64_t end = 0;
};

class SafetensorsFile {
 public:
  SafetensorsFile() = default;
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // Maps `path` read-only and validates the header. On error `*out` is unchanged.
  static Status open(const std::string& path, SafetensorsFile* out);

  bool is_open() const { return map_ != nullptr; }
  const std::string& path() const { return path_; }
  std::size_t file_size() const { return map_size_; }
  // Tensor names in header order.
  const std::vector<std::string>& names() const { return order_; }
  std::size_t size() const { return order_.size(); }
  bool contains(std::string_view name) const { return entries_.find(name) != entries_.end(); }
  // The header entry of `name`, or nullptr.
  const TensorInfo* info(std::string_view name) const;
  // A row-major view of the tensor (empty strides); its data is READ-ONLY (see above).
  Status tensor(std::string_view name, AnyTensor* out) const;
  // Checks dtype (T's), exact shape and alignment, then writes a const view. Rank >= 1.
  template <class T, int R>
  Status get(std::string_view name, const std::array<Index, R>& expected_shape, HostView<const T, R>* out) const;
  // The header's "__metadata__" (string to string); empty when absent.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  Status parse_header();
  void reset();

  std::string path_;
  void* map_ = nullptr;
  std::size_t map_size_ = 0;
  const std::byte* buffer_ = nullptr;  // start of the data buffer inside the mapping
  std::uint64_t buffer_size_ = 0;
  std::map<std::string, TensorInfo, std::less<>> entries_;
  std::vector<std::string> order_;
  std::map<std::string, std::string> metadata_;
};

// A tensor to write. `data` holds the row-major elements (product(shape) * dtype_size bytes).
struct NamedTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  const void* data = nullptr;
};

// Writes a safetensors file. The header lists "__metadata__" (when `metadata` is not empty)
// and then the tensors sorted by name, and is padded with spaces to a multiple of 8 bytes. The
// data is contiguous (no gaps) in order of decreasing element size, then name, so every tensor
// is aligned to its element size when the file is mapped. The file is written to
// `path + ".tmp-<random>"`, synced, then renamed over `path`: a failure never leaves a partial
// file at `path` (nor the temporary). Names must be unique, non-empty and not "__metadata__".
// While write_safetensors writes, its temporary file ("<path>.tmp-<random>") is registered here, so
// a signal handler can remove it (the tool's SIGINT/SIGTERM/SIGHUP handlers do). Async-signal-safe:
// one unlink of a name held in static storage. Returns whether a file was registered.
bool remove_pending_temporary_file();

// Test seam: when set, called by write_safetensors right after its temporary file exists and is
// registered, before any data is written (a test raises a signal there to check the cleanup).
void set_temporary_created_hook(void (*hook)());

Status write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                         const std::map<std::string, std::string>& metadata = {});

// Several safetensors files seen as one set of tensors (a sharded checkpoint).
class Checkpoint {
 public:
  // Each path is a .safetensors file, or a Hugging Face index ending in ".index.json":
  //   {"metadata": {...}, "weight_map": {"tensor name": "shard.safetensors", ...}}
  // whose shards are resolved relative to the index's directory; every tensor it lists must be in
  // the shard it names. A file named twice (directly or through indexes) is opened once. A tensor
  // in two different files is an error. On error `*out` is unchanged.
  static Status open(const std::vector<std::string>& paths, Checkpoint* out);

  // All tensor names, sorted.
  std::vector<std::string> names() const;
  bool contains(std::string_view name) const { return where_.find(name) != where_.end(); }
  // The file that holds `name`, or nullptr.
  const SafetensorsFile* file_of(std::string_view name) const;
  // The tensor from whichever file holds it (READ-ONLY data). A missing tensor's error names it
  // and the files searched.
  Status tensor(std::string_view name, AnyTensor* out) const;
  // Checks dtype and exact shape; the error names the tensor, the file, expected and actual.
  template <class T, int R>
  Status get(std::string_view name, const std::array<Index, R>& expected_shape, HostView<const T, R>* out) const;

  // The safetensors files, in the order opened.
  const std::vector<SafetensorsFile>& files() const { return files_; }
  // The members of the indexes' "metadata" objects (the first index to name a key wins); an
  // empty object when no index was read.
  const Json& index_metadata() const { return index_metadata_; }

 private:
  Status not_found(std::string_view name) const;

  std::vector<SafetensorsFile> files_;
  std::map<std::string, std::size_t, std::less<>> where_;  // tensor name -> index in files_
  Json index_metadata_ = Json::object();
};

// ---------------------------------------------------------------------------------------------
// Implementation of the templates.

template <class T, int R>
Status SafetensorsFile::get(std::string_view name, const std::array<Index, R>& expected_shape,
                            HostView<const T, R>* out) const {
  AnyTensor t;
  MOE_RETURN_IF_ERROR(tensor(name, &t));
  constexpr DType want = dtype_of<T>;
  if (t.dtype != want) {
    return invalid_argument("tensor \"", name, "\" in ", path_, ": expected dtype ", safetensors_dtype_name(want),
                            ", got ", safetensors_dtype_name(t.dtype), " (shape ", detail::format_shape(t.extents),
                            ")");
  }
  bool same = static_cast<int>(t.extents.size()) == R;
  for (int d = 0; same && d < R; ++d) same = t.extents[d] == expected_shape[d];
  if (!same) {
    return invalid_argument("tensor \"", name, "\" in ", path_, ": expected shape ",
                            detail::format_shape(expected_shape), ", got ", detail::format_shape(t.extents),
                            " (dtype ", safetensors_dtype_name(t.dtype), ")");
  }
  if (reinterpret_cast<std::uintptr_t>(t.data) % alignof(T) != 0) {
    return invalid_argument("tensor \"", name, "\" in ", path_, ": data at byte offset ",
                            static_cast<const std::byte*>(t.data) - static_cast<const std::byte*>(map_),
                            " of the file is not aligned to ", alignof(T), " bytes");
  }
  *out = HostView<const T, R>(static_cast<const T*>(t.data), expected_shape);
  return Status::ok();
}

template <class T, int R>
Status Checkpoint::get(std::string_view name, const std::array<Index, R>& expected_shape,
                       HostView<const T, R>* out) const {
  const SafetensorsFile* file = file_of(name);
  if (file == nullptr) return not_found(name);
  return file->get<T, R>(name, expected_shape, out);
}

}  // namespace moe::io
