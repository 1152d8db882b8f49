#include "moe/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>
#include <set>
#include <system_error>
#include <utility>

#include "moe/io/file.h"

namespace moe::io {

namespace {

std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

std::string json_quoted(std::string_view s) {
  std::string out;
  Json(s).dump_to(&out);
  return out;
}

// Other dtypes of the safetensors format, which this library does not map.
constexpr std::string_view kUnmappedDTypes[] = {"BOOL", "F64", "I16", "U16", "U32", "U64", "F8_E5M2",
                                                "F8_E8M0", "E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"};

// product(shape) * element_size, or false on a negative extent or overflow.
bool byte_size(const std::vector<Index>& shape, std::size_t element_size, std::uint64_t* out) {
  for (Index e : shape) {
    if (e < 0) return false;
    if (e == 0) {
      *out = 0;
      return true;
    }
  }
  std::uint64_t n = element_size;
  for (Index e : shape) {
    if (__builtin_mul_overflow(n, static_cast<std::uint64_t>(e), &n)) return false;
  }
  *out = n;
  return true;
}

std::string format_offsets(std::uint64_t begin, std::uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

}  // namespace

std::string_view safetensors_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kF8E4M3: return "F8_E4M3";
    case DType::kI8: return "I8";
    case DType::kU8: return "U8";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
  }
  return "?";
}

Status parse_safetensors_dtype(std::string_view name, DType* out) {
  static constexpr DType kAll[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3,
                                   DType::kI8,  DType::kU8,  DType::kI32,  DType::kI64};
  for (DType d : kAll) {
    if (safetensors_dtype_name(d) == name) {
      *out = d;
      return Status::ok();
    }
  }
  for (std::string_view u : kUnmappedDTypes) {
    if (u == name) {
      return unsupported("dtype ", json_quoted(name), " is not supported (supported: F32, F16, BF16, F8_E4M3, I8, U8, I32, I64)");
    }
  }
  return invalid_argument("unknown dtype ", json_quoted(name), " (supported: F32, F16, BF16, F8_E4M3, I8, U8, I32, I64)");
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kF16: return 2;
    case DType::kBF16: return 2;
    case DType::kF8E4M3: return 1;
    case DType::kI8: return 1;
    case DType::kU8: return 1;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile::~SafetensorsFile() { reset(); }

void SafetensorsFile::reset() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
  map_ = nullptr;
  map_size_ = 0;
  buffer_ = nullptr;
  buffer_size_ = 0;
  path_.clear();
  entries_.clear();
  order_.clear();
  metadata_.clear();
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      map_(std::exchange(other.map_, nullptr)),
      map_size_(std::exchange(other.map_size_, 0)),
      buffer_(std::exchange(other.buffer_, nullptr)),
      buffer_size_(std::exchange(other.buffer_size_, 0)),
      entries_(std::move(other.entries_)),
      order_(std::move(other.order_)),
      metadata_(std::move(other.metadata_)) {
  other.reset();
}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    reset();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_size_ = std::exchange(other.map_size_, 0);
    buffer_ = std::exchange(other.buffer_, nullptr);
    buffer_size_ = std::exchange(other.buffer_size_, 0);
    entries_ = std::move(other.entries_);
    order_ = std::move(other.order_);
    metadata_ = std::move(other.metadata_);
    other.reset();
  }
  return *this;
}

Status SafetensorsFile::open(const std::string& path, SafetensorsFile* out) {
  int fd = -1;
  std::size_t size = 0;
  if (Status s = open_regular_file(path, "safetensors file", &fd, &size); !s.is_ok()) return s;
  if (size < 8) {
    ::close(fd);
    return invalid_argument(path, ": file is ", size,
                            " bytes, shorter than the 8-byte header length that starts a safetensors file");
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file open
  if (map == MAP_FAILED) return invalid_argument(path, ": cannot mmap ", size, " bytes: ", errno_text(map_err));

  SafetensorsFile f;  // owns the mapping from here on
  f.path_ = path;
  f.map_ = map;
  f.map_size_ = size;
  MOE_RETURN_IF_ERROR(f.parse_header());
  *out = std::move(f);
  return Status::ok();
}

Status SafetensorsFile::parse_header() {
  const auto* bytes = static_cast<const unsigned char*>(map_);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  const std::uint64_t rest = map_size_ - 8;
  if (n > rest) {
    return invalid_argument(path_, ": header length ", n, " is larger than the rest of the file (", rest,
                            " bytes after the 8-byte length; the file is truncated or not safetensors)");
  }
  const std::string_view text(reinterpret_cast<const char*>(bytes + 8), static_cast<std::size_t>(n));
  Json header;
  if (Status s = parse_json(text, &header); !s.is_ok()) {
    return invalid_argument(path_, ": header is not valid JSON: ", s.message());
  }
  if (!header.is_object()) {
    return invalid_argument(path_, ": header must be a JSON object, got ", Json::type_name(header.type()));
  }
  buffer_ = reinterpret_cast<const std::byte*>(bytes + 8 + n);
  buffer_size_ = rest - n;

  struct Span {
    std::uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Span> spans;
  for (const Json::Member& m : header.members()) {
    const std::string& name = m.first;
    const Json& entry = m.second;
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        return invalid_argument(path_, ": \"__metadata__\" must be an object of strings, got ",
                                Json::type_name(entry.type()));
      }
      for (const Json::Member& kv : entry.members()) {
        if (!kv.second.is_string()) {
          return invalid_argument(path_, ": \"__metadata__\" value of ", json_quoted(kv.first), " must be a string, got ",
                                  Json::type_name(kv.second.type()));
        }
        metadata_[kv.first] = kv.second.as_string();
      }
      continue;
    }
    const std::string where = path_ + ": tensor " + json_quoted(name);
    if (!entry.is_object()) {
      return invalid_argument(where, ": expected an object with dtype, shape and data_offsets, got ",
                              Json::type_name(entry.type()));
    }
    TensorInfo info;
    std::string dtype;
    if (Status s = get_string(entry, "dtype", &dtype); !s.is_ok()) return make_status(s.code(), where, ": ", s.message());
    if (Status s = parse_safetensors_dtype(dtype, &info.dtype); !s.is_ok()) {
      return make_status(s.code(), where, ": ", s.message());
    }
    const Json* shape = nullptr;
    if (Status s = get_array(entry, "shape", &shape); !s.is_ok()) return invalid_argument(where, ": ", s.message());
    for (std::size_t d = 0; d < shape->size(); ++d) {
      std::int64_t e = 0;
      const std::string p = "shape[" + std::to_string(d) + "]";
      if (Status s = as_int((*shape)[d], p, &e); !s.is_ok()) return invalid_argument(where, ": ", s.message());
      if (e < 0) return invalid_argument(where, ": ", p, " is negative (", e, ")");
      info.shape.push_back(e);
    }
    const Json* offsets = nullptr;
    if (Status s = get_array(entry, "data_offsets", &offsets); !s.is_ok()) {
      return invalid_argument(where, ": ", s.message());
    }
    if (offsets->size() != 2) {
      return invalid_argument(where, ": data_offsets must have 2 entries [begin, end], got ", offsets->size());
    }
    std::int64_t be[2] = {0, 0};
    for (int k = 0; k < 2; ++k) {
      const std::string p = "data_offsets[" + std::to_string(k) + "]";
      if (Status s = as_int((*offsets)[k], p, &be[k]); !s.is_ok()) return invalid_argument(where, ": ", s.message());
      if (be[k] < 0) return invalid_argument(where, ": ", p, " is negative (", be[k], ")");
    }
    info.begin = static_cast<std::uint64_t>(be[0]);
    info.end = static_cast<std::uint64_t>(be[1]);
    if (info.begin > info.end) {
      return invalid_argument(where, ": data_offsets ", format_offsets(info.begin, info.end), " has begin > end");
    }
    if (info.end > buffer_size_) {
      return invalid_argument(where, ": data_offsets ", format_offsets(info.begin, info.end),
                              " lie outside the data buffer of ", buffer_size_, " bytes");
    }
    std::uint64_t need = 0;
    if (!byte_size(info.shape, dtype_size(info.dtype), &need)) {
      return invalid_argument(where, ": shape ", detail::format_shape(info.shape), " of ", dtype,
                              " overflows a 64-bit byte count");
    }
    if (need != info.end - info.begin) {
      return invalid_argument(where, ": data_offsets ", format_offsets(info.begin, info.end), " span ",
                              info.end - info.begin, " bytes, but shape ", detail::format_shape(info.shape), " of ",
                              dtype, " needs ", need);
    }
    auto [it, inserted] = entries_.emplace(name, std::move(info));
    if (!inserted) return invalid_argument(where, ": appears twice in the header");  // parse_json rejects this
    order_.push_back(name);
    if (it->second.end > it->second.begin) spans.push_back({it->second.begin, it->second.end, &it->first});
  }

  // Overlaps, among tensors of at least one byte: sorted by begin, each must start at or after
  // the furthest end seen so far.
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const Span* furthest = nullptr;
  for (const Span& s : spans) {
    if (furthest != nullptr && s.begin < furthest->end) {
      return invalid_argument(path_, ": tensors ", json_quoted(*furthest->name), " (data_offsets ",
                              format_offsets(furthest->begin, furthest->end), ") and ", json_quoted(*s.name),
                              " (data_offsets ", format_offsets(s.begin, s.end), ") overlap");
    }
    if (furthest == nullptr || s.end > furthest->end) furthest = &s;
  }
  return Status::ok();
}

const TensorInfo* SafetensorsFile::info(std::string_view name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

Status SafetensorsFile::tensor(std::string_view name, AnyTensor* out) const {
  const TensorInfo* t = info(name);
  if (t == nullptr) return invalid_argument("tensor ", json_quoted(name), " not found in ", path_);
  // The mapping is PROT_READ: AnyTensor's void* is for binding only, never for writing.
  out->data = const_cast<std::byte*>(buffer_ + t->begin);
  out->dtype = t->dtype;
  out->extents = t->shape;
  out->strides.clear();
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------
// Writing

namespace {

Status write_all(int fd, const void* data, std::size_t n, const std::string& tmp) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const std::size_t chunk = std::min<std::size_t>(n, std::size_t{1} << 30);
    const ssize_t w = ::write(fd, p, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      return invalid_argument(tmp, ": write failed: ", errno_text(errno));
    }
    if (w == 0) return invalid_argument(tmp, ": write wrote nothing");
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return Status::ok();
}

// The temporary file being written, for remove_pending_temporary_file (a signal handler). One at
// a time: the tool writes one output; a second concurrent writer simply is not covered.
char g_pending_temporary[4096];
std::atomic<bool> g_pending{false};

void register_pending(const std::string& tmp) {
  if (tmp.size() + 1 > sizeof(g_pending_temporary) || g_pending.exchange(true)) return;
  std::memcpy(g_pending_temporary, tmp.c_str(), tmp.size() + 1);
  std::atomic_signal_fence(std::memory_order_seq_cst);
}
void clear_pending(const std::string& tmp) {
  if (g_pending.load() && tmp == g_pending_temporary) g_pending.store(false);
}

// Creates `path + ".tmp-<random>"` exclusively; *fd and *tmp on success.
Status create_temporary(const std::string& path, int* fd, std::string* tmp) {
  static std::atomic<std::uint64_t> counter{0};
  std::random_device rd;
  static constexpr char kHex[] = "0123456789abcdef";
  for (int attempt = 0; attempt < 32; ++attempt) {
    std::uint64_t r = (static_cast<std::uint64_t>(rd()) << 32) ^ rd() ^
                      (static_cast<std::uint64_t>(::getpid()) << 20) ^ counter.fetch_add(1);
    std::string name = path + ".tmp-";
    for (int k = 0; k < 12; ++k, r >>= 4) name.push_back(kHex[r & 0xF]);
    const int f = ::open(name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (f >= 0) {
      *fd = f;
      *tmp = std::move(name);
      return Status::ok();
    }
    if (errno != EEXIST) return invalid_argument(path, ": cannot create ", name, ": ", errno_text(errno));
  }
  return invalid_argument(path, ": cannot create a unique temporary file next to it");
}

}  // namespace

void (*g_temporary_created_hook)() = nullptr;
void set_temporary_created_hook(void (*hook)()) { g_temporary_created_hook = hook; }

bool remove_pending_temporary_file() {
  if (!g_pending.exchange(false)) return false;
  ::unlink(g_pending_temporary);
  return true;
}

Status write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                         const std::map<std::string, std::string>& metadata) {
  // Validate everything before touching the file system.
  std::vector<std::uint64_t> sizes(tensors.size());
  std::set<std::string_view> seen;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const NamedTensor& t = tensors[i];
    if (t.name.empty()) return invalid_argument(path, ": tensor ", i, " has an empty name");
    if (t.name == "__metadata__") return invalid_argument(path, ": tensor ", i, " is named \"__metadata__\", which is reserved");
    if (!seen.insert(t.name).second) return invalid_argument(path, ": tensor ", json_quoted(t.name), " is given twice");
    for (std::int64_t e : t.shape) {
      if (e < 0) return invalid_argument(path, ": tensor ", json_quoted(t.name), ": negative extent in shape ", detail::format_shape(t.shape));
    }
    if (!byte_size(t.shape, dtype_size(t.dtype), &sizes[i])) {
      return invalid_argument(path, ": tensor ", json_quoted(t.name), ": shape ", detail::format_shape(t.shape),
                              " overflows a 64-bit byte count");
    }
    if (sizes[i] > 0 && t.data == nullptr) {
      return invalid_argument(path, ": tensor ", json_quoted(t.name), ": data is null for ", sizes[i], " bytes");
    }
  }

  // Data order: decreasing element size, then name (keeps every tensor aligned, no gaps).
  std::vector<std::size_t> data_order(tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) data_order[i] = i;
  std::sort(data_order.begin(), data_order.end(), [&](std::size_t a, std::size_t b) {
    const std::size_t sa = dtype_size(tensors[a].dtype), sb = dtype_size(tensors[b].dtype);
    return sa != sb ? sa > sb : tensors[a].name < tensors[b].name;
  });
  std::vector<std::uint64_t> begin(tensors.size());
  std::uint64_t offset = 0;
  for (std::size_t i : data_order) {
    begin[i] = offset;
    if (__builtin_add_overflow(offset, sizes[i], &offset)) return invalid_argument(path, ": total size overflows");
  }

  // Header: metadata first, then tensors by name.
  Json header = Json::object();
  if (!metadata.empty()) {
    Json meta = Json::object();
    for (const auto& [k, v] : metadata) meta.members().emplace_back(k, Json(v));
    header.members().emplace_back("__metadata__", std::move(meta));
  }
  std::vector<std::size_t> name_order = data_order;
  std::sort(name_order.begin(), name_order.end(),
            [&](std::size_t a, std::size_t b) { return tensors[a].name < tensors[b].name; });
  for (std::size_t i : name_order) {
    const NamedTensor& t = tensors[i];
    Json shape = Json::array();
    for (std::int64_t e : t.shape) shape.push_back(Json(e));
    Json offsets = Json::array();
    offsets.push_back(Json(begin[i]));
    offsets.push_back(Json(begin[i] + sizes[i]));
    Json entry = Json::object();
    entry.members().emplace_back("dtype", Json(safetensors_dtype_name(t.dtype)));
    entry.members().emplace_back("shape", std::move(shape));
    entry.members().emplace_back("data_offsets", std::move(offsets));
    header.members().emplace_back(t.name, std::move(entry));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  unsigned char length[8];
  for (int k = 0; k < 8; ++k) length[k] = static_cast<unsigned char>(static_cast<std::uint64_t>(text.size()) >> (8 * k));

  int fd = -1;
  std::string tmp;
  MOE_RETURN_IF_ERROR(create_temporary(path, &fd, &tmp));
  register_pending(tmp);
  if (g_temporary_created_hook != nullptr) g_temporary_created_hook();
  auto fail = [&](Status s) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    clear_pending(tmp);
    return s;
  };
  if (Status s = write_all(fd, length, sizeof(length), tmp); !s.is_ok()) return fail(s);
  if (Status s = write_all(fd, text.data(), text.size(), tmp); !s.is_ok()) return fail(s);
  for (std::size_t i : data_order) {
    if (Status s = write_all(fd, tensors[i].data, static_cast<std::size_t>(sizes[i]), tmp); !s.is_ok()) return fail(s);
  }
  if (::fsync(fd) != 0) return fail(invalid_argument(tmp, ": fsync failed: ", errno_text(errno)));
  const int closed = ::close(fd);
  fd = -1;
  if (closed != 0) return fail(invalid_argument(tmp, ": close failed: ", errno_text(errno)));
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    return fail(invalid_argument(path, ": cannot rename ", tmp, " to it: ", errno_text(errno)));
  }
  clear_pending(tmp);
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------
// Checkpoint

namespace {

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// A key identifying a file, so that one reached two ways is opened once.
std::string file_key(const std::string& path) {
  std::error_code ec;
  std::filesystem::path p = std::filesystem::weakly_canonical(path, ec);
  if (ec) p = std::filesystem::path(path).lexically_normal();
  return p.string();
}

}  // namespace

Status Checkpoint::open(const std::vector<std::string>& paths, Checkpoint* out) {
  Checkpoint c;
  std::map<std::string, std::size_t> opened;  // file_key -> index in c.files_
  auto open_file = [&](const std::string& path, std::size_t* index) -> Status {
    const std::string key = file_key(path);
    if (auto it = opened.find(key); it != opened.end()) {
      *index = it->second;
      return Status::ok();
    }
    SafetensorsFile f;
    MOE_RETURN_IF_ERROR(SafetensorsFile::open(path, &f));
    c.files_.push_back(std::move(f));
    *index = c.files_.size() - 1;
    opened.emplace(key, *index);
    return Status::ok();
  };

  for (const std::string& path : paths) {
    if (!ends_with(path, ".index.json")) {
      std::size_t index = 0;
      MOE_RETURN_IF_ERROR(open_file(path, &index));
      continue;
    }
    std::string text;
    MOE_RETURN_IF_ERROR(read_text_file(path, "checkpoint index", kMaxJsonFileBytes, &text));
    Json index;
    if (Status s = parse_json(text, &index); !s.is_ok()) return invalid_argument(path, ": not valid JSON: ", s.message());
    const Json* weight_map = nullptr;
    if (Status s = get_object(index, "weight_map", &weight_map); !s.is_ok()) {
      return invalid_argument(path, ": ", s.message());
    }
    if (const Json* meta = index.find("metadata"); meta != nullptr && !meta->is_null()) {
      if (!meta->is_object()) {
        return invalid_argument(path, ": metadata: expected an object, got ", Json::type_name(meta->type()));
      }
      // First writer wins across several indexes (find is O(log n): the merge is n·log n).
      for (const Json::Member& m : meta->members()) {
        if (c.index_metadata_.find(m.first) == nullptr) c.index_metadata_.members().emplace_back(m.first, m.second);
      }
    }
    const std::filesystem::path dir = std::filesystem::path(path).parent_path();
    std::map<std::string, std::size_t> shard_index;  // shard name as written -> index in c.files_
    for (const Json::Member& m : weight_map->members()) {
      if (!m.second.is_string()) {
        return invalid_argument(path, ": weight_map.", m.first, ": expected a file name string, got ",
                                Json::type_name(m.second.type()));
      }
      const std::string& shard = m.second.as_string();
      if (!is_contained_relative_path(shard)) {
        return invalid_argument(path, ": weight_map.", m.first, ": shard ", json_quoted(shard),
                                " must be a relative path inside the index's folder (no absolute path, no \"..\")");
      }
      auto it = shard_index.find(shard);
      if (it == shard_index.end()) {
        std::size_t file_index = 0;
        if (Status s = open_file((dir / shard).string(), &file_index); !s.is_ok()) {
          return make_status(s.code(), s.message(), " (a shard of ", path, ")");
        }
        it = shard_index.emplace(shard, file_index).first;
      }
      const SafetensorsFile& file = c.files_[it->second];
      if (!file.contains(m.first)) {
        return invalid_argument(path, ": weight_map puts tensor ", json_quoted(m.first), " in ", file.path(),
                                ", which does not contain it");
      }
    }
  }

  for (std::size_t i = 0; i < c.files_.size(); ++i) {
    for (const std::string& name : c.files_[i].names()) {
      auto [it, inserted] = c.where_.emplace(name, i);
      if (!inserted) {
        return invalid_argument("tensor ", json_quoted(name), " is in two files: ", c.files_[it->second].path(), " and ",
                                c.files_[i].path());
      }
    }
  }
  *out = std::move(c);
  return Status::ok();
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [name, index] : where_) out.push_back(name);
  return out;
}

const SafetensorsFile* Checkpoint::file_of(std::string_view name) const {
  auto it = where_.find(name);
  return it == where_.end() ? nullptr : &files_[it->second];
}

Status Checkpoint::not_found(std::string_view name) const {
  std::string searched;
  for (const SafetensorsFile& f : files_) {
    if (!searched.empty()) searched += ", ";
    searched += f.path();
  }
  if (searched.empty()) searched = "no files";
  return invalid_argument("tensor ", json_quoted(name), " not found in the checkpoint (searched ", files_.size(),
                          files_.size() == 1 ? " file: " : " files: ", searched, ")");
}

Status Checkpoint::tensor(std::string_view name, AnyTensor* out) const {
  const SafetensorsFile* file = file_of(name);
  if (file == nullptr) return not_found(name);
  return file->tensor(name, out);
}

}  // namespace moe::io
