// Safetensors reading and writing, and multi-file checkpoints: round trips for every dtype, the
// layout of written files, every validation error at open (each naming the file), atomic writes,
// and Checkpoint over several files or a Hugging Face index.
#include "moe/io/safetensors.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "moe/io/file.h"

namespace {

namespace fs = std::filesystem;
using moe::AnyTensor;
using moe::DType;
using moe::HostView;
using moe::Status;
using moe::StatusCode;
using moe::io::Checkpoint;
using moe::io::NamedTensor;
using moe::io::SafetensorsFile;
using moe::io::write_safetensors;

// A fresh directory per test under $TEST_TMPDIR.
std::string test_dir() {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir = fs::path(tmp != nullptr ? tmp : "/tmp") / (std::string(info->test_suite_name()) + "." + info->name());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void write_bytes(const std::string& path, std::string_view bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

std::string le64(std::uint64_t n) {
  std::string s(8, '\0');
  for (int k = 0; k < 8; ++k) s[k] = static_cast<char>((n >> (8 * k)) & 0xFF);
  return s;
}

// A safetensors file as another writer might produce it: no padding, any order.
std::string raw_file(std::string_view header, std::string_view data) {
  return le64(header.size()) + std::string(header) + std::string(data);
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

bool contains(const std::string& haystack, const std::string& needle) { return haystack.find(needle) != std::string::npos; }

// Expects open() to fail with `code` and a message containing the path and every part.
void expect_open_error(const std::string& path, std::initializer_list<std::string> parts,
                       StatusCode code = StatusCode::kInvalidArgument) {
  SafetensorsFile f;
  const Status s = SafetensorsFile::open(path, &f);
  ASSERT_FALSE(s.is_ok()) << "accepted " << path;
  EXPECT_EQ(s.code(), code) << s.to_string();
  EXPECT_TRUE(contains(s.message(), path)) << "message does not name the file: " << s.message();
  for (const std::string& p : parts) EXPECT_TRUE(contains(s.message(), p)) << "missing '" << p << "' in: " << s.message();
  EXPECT_FALSE(f.is_open());
}

// Writes `header` + `data` to a file and expects open() to fail naming it and the parts.
void expect_header_error(const std::string& dir, std::string_view header, std::string_view data,
                         std::initializer_list<std::string> parts, StatusCode code = StatusCode::kInvalidArgument) {
  const std::string path = dir + "/bad.safetensors";
  write_bytes(path, raw_file(header, data));
  expect_open_error(path, parts, code);
}

std::vector<unsigned char> random_bytes(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<unsigned char> v(n);
  for (auto& b : v) b = static_cast<unsigned char>(rng());
  return v;
}

struct Spec {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
};

// One tensor of every dtype, with byte counts chosen so that a naive layout would misalign.
const std::vector<Spec>& every_dtype() {
  static const std::vector<Spec> specs = {
      {"u8", DType::kU8, {3, 5}},          {"i8", DType::kI8, {7}},       {"f8", DType::kF8E4M3, {1, 3, 3}},
      {"bf16", DType::kBF16, {3, 3}},      {"f16", DType::kF16, {5}},     {"f32", DType::kF32, {2, 3}},
      {"i32", DType::kI32, {1}},           {"i64", DType::kI64, {2, 2}},
  };
  return specs;
}

std::size_t element_count(const std::vector<std::int64_t>& shape) {
  std::size_t n = 1;
  for (auto e : shape) n *= static_cast<std::size_t>(e);
  return n;
}

// ---------------------------------------------------------------------------------------------
// Round trips and layout

TEST(Safetensors, RoundTripEveryDType) {
  const std::string dir = test_dir();
  const std::string path = dir + "/all.safetensors";
  std::vector<std::vector<unsigned char>> data;
  std::vector<NamedTensor> tensors;
  unsigned seed = 1;
  for (const Spec& s : every_dtype()) {
    data.push_back(random_bytes(element_count(s.shape) * moe::io::dtype_size(s.dtype), seed++));
  }
  for (std::size_t i = 0; i < every_dtype().size(); ++i) {
    const Spec& s = every_dtype()[i];
    tensors.push_back({s.name, s.dtype, s.shape, data[i].data()});
  }
  ASSERT_TRUE(write_safetensors(path, tensors, {{"format", "pt"}, {"note", "quote \" and \xc3\xa9"}}).is_ok());
  EXPECT_EQ(list_dir(dir), std::vector<std::string>{"all.safetensors"});  // no temporary left

  SafetensorsFile f;
  const Status st = SafetensorsFile::open(path, &f);
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  EXPECT_TRUE(f.is_open());
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.metadata().size(), 2u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.metadata().at("note"), "quote \" and \xc3\xa9");
  // Header order: sorted by name.
  EXPECT_EQ(f.names(), (std::vector<std::string>{"bf16", "f16", "f32", "f8", "i32", "i64", "i8", "u8"}));
  for (std::size_t i = 0; i < every_dtype().size(); ++i) {
    const Spec& s = every_dtype()[i];
    SCOPED_TRACE(s.name);
    ASSERT_TRUE(f.contains(s.name));
    AnyTensor t;
    ASSERT_TRUE(f.tensor(s.name, &t).is_ok());
    EXPECT_EQ(t.dtype, s.dtype);
    EXPECT_EQ(t.extents, s.shape);
    EXPECT_TRUE(t.strides.empty());
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.data) % moe::io::dtype_size(s.dtype), 0u) << "misaligned";
    EXPECT_EQ(0, std::memcmp(t.data, data[i].data(), data[i].size())) << "data differs";
  }
  EXPECT_FALSE(f.contains("nope"));
  AnyTensor t;
  const Status missing = f.tensor("nope", &t);
  EXPECT_EQ(missing.message(), "tensor \"nope\" not found in " + path);

  // Layout: 8-byte length, header padded with spaces to a multiple of 8, then contiguous data.
  const std::string bytes = read_bytes(path);
  std::uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | static_cast<unsigned char>(bytes[k]);
  EXPECT_EQ(n % 8, 0u);
  std::size_t total = 0;
  for (const auto& d : data) total += d.size();
  EXPECT_EQ(bytes.size(), 8 + n + total);
  const std::string header = bytes.substr(8, n);
  EXPECT_EQ(header.rfind("{\"__metadata__\":{\"format\":\"pt\",", 0), 0u) << header;
  EXPECT_EQ(header.find_last_not_of(' '), header.rfind('}'));
  moe::io::Json parsed;
  ASSERT_TRUE(moe::io::parse_json(header, &parsed).is_ok());
  // Data order: element size descending, then name: i64, f32, i32, bf16, f16, f8, i8, u8.
  EXPECT_EQ(parsed.find("i64")->dump(), R"({"dtype":"I64","shape":[2,2],"data_offsets":[0,32]})");
  EXPECT_EQ(parsed.find("f32")->dump(), R"({"dtype":"F32","shape":[2,3],"data_offsets":[32,56]})");
  EXPECT_EQ(parsed.find("i32")->dump(), R"({"dtype":"I32","shape":[1],"data_offsets":[56,60]})");
  EXPECT_EQ(parsed.find("u8")->dump(), R"({"dtype":"U8","shape":[3,5],"data_offsets":[104,119]})");
}

TEST(Safetensors, TypedGet) {
  const std::string dir = test_dir();
  const std::string path = dir + "/t.safetensors";
  const std::vector<float> w = {1, 2, 3, 4, 5, 6};
  std::vector<moe::bfloat16> b;
  for (float x : w) b.push_back(moe::bfloat16(x));
  const std::vector<std::int32_t> ids = {7, -1, 3};
  ASSERT_TRUE(write_safetensors(path, {{"w", DType::kF32, {2, 3}, w.data()},
                                       {"b", DType::kBF16, {3, 2}, b.data()},
                                       {"ids", DType::kI32, {3}, ids.data()}})
                  .is_ok());
  SafetensorsFile f;
  ASSERT_TRUE(SafetensorsFile::open(path, &f).is_ok());
  HostView<const float, 2> wv;
  ASSERT_TRUE((f.get<float, 2>("w", {2, 3}, &wv).is_ok()));
  EXPECT_EQ(wv(1, 2), 6.0f);
  EXPECT_EQ(wv.extent(0), 2);
  EXPECT_TRUE(wv.is_contiguous());
  HostView<const moe::bfloat16, 2> bv;
  ASSERT_TRUE((f.get<moe::bfloat16, 2>("b", {3, 2}, &bv).is_ok()));
  EXPECT_EQ(bv(2, 1).bits, moe::bfloat16(6.0f).bits);
  HostView<const std::int32_t, 1> iv;
  ASSERT_TRUE((f.get<std::int32_t, 1>("ids", {3}, &iv).is_ok()));
  EXPECT_EQ(iv(1), -1);
  // Binding through moe::bind works too, to a const view.
  AnyTensor t;
  ASSERT_TRUE(f.tensor("w", &t).is_ok());
  HostView<const float, 2> bound;
  ASSERT_TRUE(moe::bind(t, "w", &bound).is_ok());
  EXPECT_EQ(bound(0, 1), 2.0f);
}

TEST(Safetensors, EmptyAndScalarTensors) {
  const std::string dir = test_dir();
  const std::string path = dir + "/e.safetensors";
  const float scalar = 3.5f;
  const std::int64_t one = 42;
  ASSERT_TRUE(write_safetensors(path, {{"empty", DType::kF32, {0}, nullptr},
                                       {"empty3", DType::kBF16, {4, 0, 2}, nullptr},
                                       {"scalar", DType::kF32, {}, &scalar},
                                       {"one", DType::kI64, {1}, &one}})
                  .is_ok());
  SafetensorsFile f;
  const Status st = SafetensorsFile::open(path, &f);
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  AnyTensor t;
  ASSERT_TRUE(f.tensor("empty", &t).is_ok());
  EXPECT_EQ(t.extents, (std::vector<std::int64_t>{0}));
  ASSERT_TRUE(f.tensor("empty3", &t).is_ok());
  EXPECT_EQ(t.extents, (std::vector<std::int64_t>{4, 0, 2}));
  EXPECT_EQ(t.dtype, DType::kBF16);
  HostView<const moe::bfloat16, 3> ev;
  ASSERT_TRUE((f.get<moe::bfloat16, 3>("empty3", {4, 0, 2}, &ev).is_ok()));
  EXPECT_TRUE(ev.empty());
  ASSERT_TRUE(f.tensor("scalar", &t).is_ok());
  EXPECT_TRUE(t.extents.empty());
  EXPECT_EQ(*static_cast<const float*>(t.data), 3.5f);
  ASSERT_TRUE(f.tensor("one", &t).is_ok());
  EXPECT_EQ(*static_cast<const std::int64_t*>(t.data), 42);
  EXPECT_TRUE(f.metadata().empty());
  EXPECT_EQ(read_bytes(path).substr(8, 14), "{\"empty\":{\"dty");  // no __metadata__ when there is none

  // A file with no tensors at all.
  const std::string none = dir + "/none.safetensors";
  ASSERT_TRUE(write_safetensors(none, {}, {{"k", "v"}}).is_ok());
  SafetensorsFile g;
  ASSERT_TRUE(SafetensorsFile::open(none, &g).is_ok());
  EXPECT_EQ(g.size(), 0u);
  EXPECT_EQ(g.metadata().at("k"), "v");
}

TEST(Safetensors, ReadsForeignLayout) {
  // Unpadded header, entries out of data order, an empty tensor between two others, a gap, and
  // extra keys that are ignored.
  const std::string dir = test_dir();
  const std::string path = dir + "/foreign.safetensors";
  const std::string header =
      R"({"b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
      R"("a":{"shape":[3],"dtype":"U8","data_offsets":[2,5],"extra":1},)"
      R"("z":{"dtype":"F32","shape":[0,7],"data_offsets":[1,1]},)"
      R"("__metadata__":{"format":"np"},)"
      R"("c":{"dtype":"I8","shape":[1],"data_offsets":[6,7]}})";
  write_bytes(path, raw_file(header, std::string("\x01\x02\x03\x04\x05\x00\x06\x07", 8)));
  SafetensorsFile f;
  const Status st = SafetensorsFile::open(path, &f);
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  EXPECT_EQ(f.names(), (std::vector<std::string>{"b", "a", "z", "c"}));
  EXPECT_EQ(f.metadata().at("format"), "np");
  AnyTensor t;
  ASSERT_TRUE(f.tensor("a", &t).is_ok());
  EXPECT_EQ(std::string(static_cast<const char*>(t.data), 3), "\x03\x04\x05");
  ASSERT_TRUE(f.tensor("c", &t).is_ok());
  EXPECT_EQ(*static_cast<const std::int8_t*>(t.data), 6);
  ASSERT_NE(f.info("a"), nullptr);
  EXPECT_EQ(f.info("a")->begin, 2u);
  EXPECT_EQ(f.info("a")->end, 5u);
}

TEST(Safetensors, MoveKeepsMappingValid) {
  const std::string dir = test_dir();
  const std::string path = dir + "/m.safetensors";
  const std::vector<float> w = {1, 2, 3};
  ASSERT_TRUE(write_safetensors(path, {{"w", DType::kF32, {3}, w.data()}}).is_ok());
  SafetensorsFile a;
  ASSERT_TRUE(SafetensorsFile::open(path, &a).is_ok());
  AnyTensor t;
  ASSERT_TRUE(a.tensor("w", &t).is_ok());
  SafetensorsFile b(std::move(a));
  EXPECT_FALSE(a.is_open());
  EXPECT_TRUE(a.names().empty());
  EXPECT_TRUE(b.is_open());
  EXPECT_EQ(static_cast<const float*>(t.data)[2], 3.0f);  // same mapping
  SafetensorsFile c;
  c = std::move(b);
  EXPECT_FALSE(b.is_open());
  AnyTensor u;
  ASSERT_TRUE(c.tensor("w", &u).is_ok());
  EXPECT_EQ(u.data, t.data);
  // Re-opening over an open file replaces (and unmaps) the old one.
  ASSERT_TRUE(SafetensorsFile::open(path, &c).is_ok());
  ASSERT_TRUE(c.tensor("w", &u).is_ok());
  EXPECT_EQ(static_cast<const float*>(u.data)[0], 1.0f);
}

// ---------------------------------------------------------------------------------------------
// Errors at open

TEST(SafetensorsErrors, MissingOrNotAFile) {
  const std::string dir = test_dir();
  expect_open_error(dir + "/absent.safetensors", {"cannot open", "No such file or directory"});
  expect_open_error(dir, {"expected a regular file, found a directory"});
}

TEST(SafetensorsErrors, TruncatedFile) {
  const std::string dir = test_dir();
  const std::string good = dir + "/good.safetensors";
  const std::vector<float> w(16, 1.0f);
  const std::vector<std::uint8_t> u(5, 7);
  ASSERT_TRUE(write_safetensors(good, {{"w", DType::kF32, {4, 4}, w.data()}, {"u", DType::kU8, {5}, u.data()}}).is_ok());
  const std::string bytes = read_bytes(good);
  std::uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | static_cast<unsigned char>(bytes[k]);
  ASSERT_EQ(bytes.size(), 8 + n + 64 + 5);

  const std::string cut = dir + "/cut.safetensors";
  for (std::size_t size : {std::size_t{0}, std::size_t{1}, std::size_t{7}}) {
    SCOPED_TRACE(size);
    write_bytes(cut, bytes.substr(0, size));
    expect_open_error(cut, {"file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length"});
  }
  for (std::size_t size : {std::size_t{8}, std::size_t{9}, static_cast<std::size_t>(8 + n / 2),
                           static_cast<std::size_t>(8 + n - 1)}) {
    SCOPED_TRACE(size);
    write_bytes(cut, bytes.substr(0, size));
    expect_open_error(cut, {"header length " + std::to_string(n) + " is larger than the rest of the file (" +
                            std::to_string(size - 8) + " bytes"});
  }
  // Cut inside the data: the last tensor (u, after w) no longer fits.
  for (std::size_t data : {std::size_t{0}, std::size_t{64}, std::size_t{68}}) {
    SCOPED_TRACE(data);
    write_bytes(cut, bytes.substr(0, 8 + n + data));
    expect_open_error(cut, {"tensor \"", "data_offsets", "lie outside the data buffer of " + std::to_string(data) + " bytes"});
  }
  write_bytes(cut, bytes.substr(0, bytes.size() - 1));
  expect_open_error(cut, {"tensor \"u\": data_offsets [64, 69] lie outside the data buffer of 68 bytes"});
  // Trailing bytes after the last tensor are accepted.
  write_bytes(cut, bytes + "xyz");
  SafetensorsFile f;
  EXPECT_TRUE(SafetensorsFile::open(cut, &f).is_ok());
}

TEST(SafetensorsErrors, HeaderLengthBeyondFile) {
  const std::string dir = test_dir();
  const std::string path = dir + "/len.safetensors";
  write_bytes(path, le64(1ull << 40) + "{}");
  expect_open_error(path, {"header length 1099511627776 is larger than the rest of the file (2 bytes"});
  write_bytes(path, le64(~0ull) + "{}");
  expect_open_error(path, {"header length 18446744073709551615 is larger"});
  write_bytes(path, le64(3) + "{}");
  expect_open_error(path, {"header length 3 is larger than the rest of the file (2 bytes"});
}

TEST(SafetensorsErrors, BadJsonHeader) {
  const std::string dir = test_dir();
  expect_header_error(dir, R"({"a": {"dtype": "F32",}})", "",
                      {"header is not valid JSON: line 1, column 23: syntax error while parsing object key - "
                       "unexpected '}'; expected string literal"});
  expect_header_error(dir, "", "",
                      {"header is not valid JSON: line 1, column 1: syntax error while parsing value - "
                       "unexpected end of input; expected '[', '{', or a literal"});
  expect_header_error(dir, "{} x", "",
                      {"header is not valid JSON: line 1, column 4: syntax error while parsing value - "
                       "invalid literal; got 'x'; expected end of input"});
  expect_header_error(dir, std::string_view("{}\0\0", 4), "", {"header is not valid JSON", "byte 0x00"});
  expect_header_error(dir, R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{}})", "x",
                      {"header is not valid JSON", "duplicate key \"a\""});
  expect_header_error(dir, "[1, 2]", "", {"header must be a JSON object, got array"});
  // Padding spaces (and other JSON whitespace) around the object are fine.
  const std::string path = dir + "/padded.safetensors";
  write_bytes(path, raw_file(" \n{}      ", ""));
  SafetensorsFile f;
  const Status st = SafetensorsFile::open(path, &f);
  EXPECT_TRUE(st.is_ok()) << st.to_string();
}

TEST(SafetensorsErrors, BadEntries) {
  const std::string dir = test_dir();
  const std::string d8(8, '\0');
  expect_header_error(dir, R"({"t": 5})", d8,
                      {"tensor \"t\": expected an object with dtype, shape and data_offsets, got number"});
  expect_header_error(dir, R"({"t": {"shape": [2], "data_offsets": [0, 8]}})", d8,
                      {"tensor \"t\": missing required key \"dtype\""});
  expect_header_error(dir, R"({"t": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}})", d8,
                      {"tensor \"t\": dtype: expected a string, got number 4"});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "data_offsets": [0, 8]}})", d8,
                      {"tensor \"t\": missing required key \"shape\""});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}})", d8,
                      {"tensor \"t\": shape: expected an array, got number 2"});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}})", d8,
                      {"tensor \"t\": shape[1] is negative (-1)"});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 8]}})", d8,
                      {"tensor \"t\": shape[0]: expected an integer, got number 1.5"});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}})", d8,
                      {"tensor \"t\": shape[0]: expected an integer, got string \"2\""});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}})",
                      d8, {"tensor \"t\": shape [4294967296, 4294967296] of F32 overflows a 64-bit byte count"});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": [2]}})", d8,
                      {"tensor \"t\": missing required key \"data_offsets\""});
  expect_header_error(dir, R"({"__metadata__": {"format": 1}})", "",
                      {"\"__metadata__\" value of \"format\" must be a string, got number"});
  expect_header_error(dir, R"({"__metadata__": ["pt"]})", "", {"\"__metadata__\" must be an object of strings, got array"});
}

TEST(SafetensorsErrors, WrongDataOffsets) {
  const std::string dir = test_dir();
  const std::string d8(8, '\0');
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})", d8,
                      {"tensor \"t\": data_offsets must have 2 entries [begin, end], got 1"});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": {"begin": 0}}})", d8,
                      {"tensor \"t\": data_offsets: expected an array, got object"});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}})", d8,
                      {"tensor \"t\": data_offsets[0] is negative (-8)"});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]}})", d8,
                      {"tensor \"t\": data_offsets[1]: expected an integer, got string \"8\""});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}})", d8,
                      {"tensor \"t\": data_offsets [8, 0] has begin > end"});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", d8,
                      {"tensor \"t\": data_offsets [0, 16] lie outside the data buffer of 8 bytes"});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [9, 9]}})", d8,
                      {"tensor \"t\": data_offsets [9, 9] lie outside the data buffer of 8 bytes"});
  expect_header_error(dir, R"({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", d8,
                      {"tensor \"t\": data_offsets [0, 8] span 8 bytes, but shape [3] of F32 needs 12"});
  expect_header_error(dir, R"({"t": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8]}})", d8,
                      {"tensor \"t\": data_offsets [0, 8] span 8 bytes, but shape [2, 3] of BF16 needs 12"});
  expect_header_error(dir, R"({"t": {"dtype": "U8", "shape": [], "data_offsets": [0, 0]}})", d8,
                      {"tensor \"t\": data_offsets [0, 0] span 0 bytes, but shape [] of U8 needs 1"});
}

TEST(SafetensorsErrors, UnknownDType) {
  const std::string dir = test_dir();
  const std::string d8(8, '\0');
  expect_header_error(dir, R"({"t": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}})", d8,
                      {"tensor \"t\": unknown dtype \"Q7\" (supported: F32, F16, BF16, F8_E4M3, I8, U8, I32, I64)"});
  expect_header_error(dir, R"({"t": {"dtype": "f32", "shape": [2], "data_offsets": [0, 8]}})", d8,
                      {"tensor \"t\": unknown dtype \"f32\""});
  expect_header_error(dir, R"({"t": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}})", d8,
                      {"tensor \"t\": dtype \"F64\" is not supported"}, StatusCode::kUnsupported);
  expect_header_error(dir, R"({"t": {"dtype": "F8_E5M2", "shape": [8], "data_offsets": [0, 8]}})", d8,
                      {"tensor \"t\": dtype \"F8_E5M2\" is not supported"}, StatusCode::kUnsupported);
}

TEST(SafetensorsErrors, OverlappingTensors) {
  const std::string dir = test_dir();
  const std::string d16(16, '\0');
  expect_header_error(dir,
                      R"({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},)"
                      R"( "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}})",
                      d16, {"tensors \"a\" (data_offsets [0, 8]) and \"b\" (data_offsets [4, 12]) overlap"});
  // Identical ranges, given in reverse order.
  expect_header_error(dir,
                      R"({"y": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]},)"
                      R"( "x": {"dtype": "I32", "shape": [1], "data_offsets": [8, 12]}})",
                      d16, {"overlap", "\"x\"", "\"y\"", "[8, 12]"});
  // One tensor inside a larger one that is not its neighbour in offset order.
  expect_header_error(dir,
                      R"({"big": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},)"
                      R"( "s1": {"dtype": "U8", "shape": [0], "data_offsets": [16, 16]},)"
                      R"( "s2": {"dtype": "U8", "shape": [2], "data_offsets": [10, 12]}})",
                      d16 + "xx", {"tensors \"big\" (data_offsets [0, 16]) and \"s2\" (data_offsets [10, 12]) overlap"});
  // Empty tensors overlap nothing; adjacent ranges are fine.
  const std::string path = dir + "/ok.safetensors";
  write_bytes(path, raw_file(R"({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},)"
                             R"( "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},)"
                             R"( "b": {"dtype": "U8", "shape": [8], "data_offsets": [8, 16]}})",
                             d16));
  SafetensorsFile f;
  const Status st = SafetensorsFile::open(path, &f);
  EXPECT_TRUE(st.is_ok()) << st.to_string();
}

TEST(SafetensorsErrors, MisalignedData) {
  // A foreign file whose buffer starts at an odd offset: tensor() works, get<float> refuses.
  const std::string dir = test_dir();
  const std::string path = dir + "/odd.safetensors";
  const std::string header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";  // 53 bytes
  ASSERT_NE((8 + header.size()) % 4, 0u);
  write_bytes(path, raw_file(header, std::string(8, '\0')));
  SafetensorsFile f;
  ASSERT_TRUE(SafetensorsFile::open(path, &f).is_ok());
  AnyTensor t;
  EXPECT_TRUE(f.tensor("w", &t).is_ok());
  HostView<const float, 1> v;
  const Status s = f.get<float, 1>("w", {2}, &v);
  EXPECT_EQ(s.message(), "tensor \"w\" in " + path + ": data at byte offset " + std::to_string(8 + header.size()) +
                             " of the file is not aligned to 4 bytes");
}

// ---------------------------------------------------------------------------------------------
// Writing

TEST(SafetensorsWrite, FailureLeavesNoFile) {
  const std::string dir = test_dir();
  const float x = 1;
  // Into a directory that does not exist.
  const std::string path = dir + "/missing_dir/out.safetensors";
  Status s = write_safetensors(path, {{"x", DType::kF32, {1}, &x}});
  ASSERT_FALSE(s.is_ok());
  EXPECT_TRUE(contains(s.message(), path)) << s.message();
  EXPECT_TRUE(contains(s.message(), "No such file or directory")) << s.message();
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(list_dir(dir).empty());

  // Over a directory: the rename fails, and the temporary is removed.
  fs::create_directory(dir + "/a_dir");
  s = write_safetensors(dir + "/a_dir", {{"x", DType::kF32, {1}, &x}});
  ASSERT_FALSE(s.is_ok());
  EXPECT_TRUE(contains(s.message(), "cannot rename")) << s.message();
  EXPECT_EQ(list_dir(dir), std::vector<std::string>{"a_dir"});
  EXPECT_TRUE(list_dir(dir + "/a_dir").empty());
}

TEST(SafetensorsWrite, InvalidInputWritesNothing) {
  const std::string dir = test_dir();
  const std::string path = dir + "/x.safetensors";
  const float x[2] = {1, 2};
  struct Bad {
    std::vector<NamedTensor> tensors;
    std::string message;
  };
  const std::vector<Bad> cases = {
      {{{"a", DType::kF32, {1}, x}, {"a", DType::kF32, {1}, x}}, "tensor \"a\" is given twice"},
      {{{"", DType::kF32, {1}, x}}, "tensor 0 has an empty name"},
      {{{"__metadata__", DType::kF32, {1}, x}}, "is named \"__metadata__\", which is reserved"},
      {{{"a", DType::kF32, {2, -1}, x}}, "tensor \"a\": negative extent in shape [2, -1]"},
      {{{"a", DType::kF32, {2}, nullptr}}, "tensor \"a\": data is null for 8 bytes"},
      {{{"a", DType::kF32, {1LL << 40, 1LL << 40}, x}}, "overflows a 64-bit byte count"},
  };
  for (const Bad& b : cases) {
    const Status s = write_safetensors(path, b.tensors);
    ASSERT_FALSE(s.is_ok()) << b.message;
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(contains(s.message(), path + ": ")) << s.message();
    EXPECT_TRUE(contains(s.message(), b.message)) << s.message();
    EXPECT_TRUE(list_dir(dir).empty());
  }
}

TEST(SafetensorsWrite, ReplacesExistingFile) {
  const std::string dir = test_dir();
  const std::string path = dir + "/x.safetensors";
  const std::int32_t a = 1, b = 2;
  ASSERT_TRUE(write_safetensors(path, {{"old", DType::kI32, {1}, &a}}).is_ok());
  SafetensorsFile before;
  ASSERT_TRUE(SafetensorsFile::open(path, &before).is_ok());
  ASSERT_TRUE(write_safetensors(path, {{"new", DType::kI32, {1}, &b}}).is_ok());
  EXPECT_EQ(list_dir(dir), std::vector<std::string>{"x.safetensors"});
  SafetensorsFile after;
  ASSERT_TRUE(SafetensorsFile::open(path, &after).is_ok());
  EXPECT_EQ(after.names(), std::vector<std::string>{"new"});
  // The old mapping still reads the old (renamed-over) file.
  AnyTensor t;
  ASSERT_TRUE(before.tensor("old", &t).is_ok());
  EXPECT_EQ(*static_cast<const std::int32_t*>(t.data), 1);
}

// ---------------------------------------------------------------------------------------------
// Checkpoint

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test_dir();
    a_ = dir_ + "/a.safetensors";
    b_ = dir_ + "/b.safetensors";
    ASSERT_TRUE(write_safetensors(a_, {{"layers.0.w13", DType::kF32, {2, 3}, w_.data()},
                                       {"layers.0.gate", DType::kBF16, {4}, g_.data()}})
                    .is_ok());
    ASSERT_TRUE(write_safetensors(b_, {{"layers.1.w13", DType::kF32, {3, 2}, w_.data()}}).is_ok());
  }
  std::string dir_, a_, b_;
  std::vector<float> w_ = {1, 2, 3, 4, 5, 6};
  std::vector<moe::bfloat16> g_ = std::vector<moe::bfloat16>(4, moe::bfloat16(0.5f));
};

TEST_F(CheckpointTest, TwoFiles) {
  Checkpoint c;
  const Status st = Checkpoint::open({a_, b_}, &c);
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  EXPECT_EQ(c.files().size(), 2u);
  EXPECT_EQ(c.names(), (std::vector<std::string>{"layers.0.gate", "layers.0.w13", "layers.1.w13"}));
  EXPECT_TRUE(c.contains("layers.1.w13"));
  ASSERT_NE(c.file_of("layers.1.w13"), nullptr);
  EXPECT_EQ(c.file_of("layers.1.w13")->path(), b_);
  EXPECT_EQ(c.file_of("nope"), nullptr);
  AnyTensor t;
  ASSERT_TRUE(c.tensor("layers.1.w13", &t).is_ok());
  EXPECT_EQ(t.extents, (std::vector<std::int64_t>{3, 2}));
  HostView<const float, 2> v;
  ASSERT_TRUE((c.get<float, 2>("layers.0.w13", {2, 3}, &v).is_ok()));
  EXPECT_EQ(v(1, 0), 4.0f);
  HostView<const moe::bfloat16, 1> g;
  ASSERT_TRUE((c.get<moe::bfloat16, 1>("layers.0.gate", {4}, &g).is_ok()));
  EXPECT_EQ(g(3).bits, moe::bfloat16(0.5f).bits);
  EXPECT_EQ(c.index_metadata(), moe::io::Json::object());
  // The same file twice is opened once.
  Checkpoint twice;
  ASSERT_TRUE(Checkpoint::open({a_, dir_ + "/./a.safetensors"}, &twice).is_ok());
  EXPECT_EQ(twice.files().size(), 1u);
}

TEST_F(CheckpointTest, MissingTensor) {
  Checkpoint c;
  ASSERT_TRUE(Checkpoint::open({a_, b_}, &c).is_ok());
  AnyTensor t;
  const Status s = c.tensor("layers.2.w13", &t);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "tensor \"layers.2.w13\" not found in the checkpoint (searched 2 files: " + a_ + ", " + b_ + ")");
  HostView<const float, 2> v;
  EXPECT_EQ((c.get<float, 2>("layers.2.w13", {2, 3}, &v).message()), s.message());
  Checkpoint empty;
  ASSERT_TRUE(Checkpoint::open({}, &empty).is_ok());
  EXPECT_EQ(empty.tensor("x", &t).message(), "tensor \"x\" not found in the checkpoint (searched 0 files: no files)");
}

TEST_F(CheckpointTest, DuplicateTensor) {
  const std::string c_path = dir_ + "/c.safetensors";
  ASSERT_TRUE(write_safetensors(c_path, {{"layers.0.w13", DType::kF32, {6}, w_.data()}}).is_ok());
  Checkpoint c;
  const Status s = Checkpoint::open({a_, b_, c_path}, &c);
  EXPECT_EQ(s.message(), "tensor \"layers.0.w13\" is in two files: " + a_ + " and " + c_path);
  EXPECT_TRUE(c.files().empty());  // untouched
}

TEST_F(CheckpointTest, BadFileNamesIt) {
  const std::string bad = dir_ + "/bad.safetensors";
  write_bytes(bad, "abc");
  Checkpoint c;
  const Status s = Checkpoint::open({a_, bad}, &c);
  EXPECT_TRUE(contains(s.message(), bad + ": file is 3 bytes")) << s.message();
}

TEST_F(CheckpointTest, GetMismatchMessages) {
  Checkpoint c;
  ASSERT_TRUE(Checkpoint::open({a_, b_}, &c).is_ok());
  HostView<const float, 2> v;
  EXPECT_EQ((c.get<float, 2>("layers.1.w13", {2, 3}, &v).message()),
            "tensor \"layers.1.w13\" in " + b_ + ": expected shape [2, 3], got [3, 2] (dtype F32)");
  HostView<const float, 1> v1;
  EXPECT_EQ((c.get<float, 1>("layers.0.w13", {6}, &v1).message()),
            "tensor \"layers.0.w13\" in " + a_ + ": expected shape [6], got [2, 3] (dtype F32)");
  HostView<const float, 3> v3;
  EXPECT_EQ((c.get<float, 3>("layers.0.w13", {1, 2, 3}, &v3).message()),
            "tensor \"layers.0.w13\" in " + a_ + ": expected shape [1, 2, 3], got [2, 3] (dtype F32)");
  HostView<const moe::bfloat16, 2> b;
  EXPECT_EQ((c.get<moe::bfloat16, 2>("layers.0.w13", {2, 3}, &b).message()),
            "tensor \"layers.0.w13\" in " + a_ + ": expected dtype BF16, got F32 (shape [2, 3])");
  HostView<const float, 1> g;
  EXPECT_EQ((c.get<float, 1>("layers.0.gate", {4}, &g).message()),
            "tensor \"layers.0.gate\" in " + a_ + ": expected dtype F32, got BF16 (shape [4])");
  EXPECT_EQ(v.data(), nullptr);  // untouched on error
}

TEST_F(CheckpointTest, HuggingFaceIndex) {
  const std::string model = dir_ + "/model";
  fs::create_directories(model);
  const std::string s1 = model + "/model-00001-of-00002.safetensors";
  const std::string s2 = model + "/model-00002-of-00002.safetensors";
  const std::vector<std::int64_t> ids = {1, 2, 3};
  ASSERT_TRUE(write_safetensors(s1, {{"embed", DType::kF32, {2, 3}, w_.data()},
                                     {"norm", DType::kF32, {6}, w_.data()}})
                  .is_ok());
  ASSERT_TRUE(write_safetensors(s2, {{"ids", DType::kI64, {3}, ids.data()}}).is_ok());
  const std::string index = model + "/model.safetensors.index.json";
  write_bytes(index, R"({
  "metadata": {"total_size": 72, "format": "pt"},
  "weight_map": {
    "embed": "model-00001-of-00002.safetensors",
    "ids": "model-00002-of-00002.safetensors",
    "norm": "model-00001-of-00002.safetensors"
  }
})");
  Checkpoint c;
  Status st = Checkpoint::open({index}, &c);
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  EXPECT_EQ(c.files().size(), 2u);
  EXPECT_EQ(c.names(), (std::vector<std::string>{"embed", "ids", "norm"}));
  EXPECT_EQ(c.file_of("ids")->path(), s2);
  HostView<const std::int64_t, 1> v;
  ASSERT_TRUE((c.get<std::int64_t, 1>("ids", {3}, &v).is_ok()));
  EXPECT_EQ(v(2), 3);
  std::int64_t total = 0;
  ASSERT_TRUE(get_int(c.index_metadata(), "total_size", &total).is_ok());
  EXPECT_EQ(total, 72);

  // An index plus one of its shards named directly, plus another file: each opened once.
  Checkpoint mixed;
  st = Checkpoint::open({index, s2, a_}, &mixed);
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  EXPECT_EQ(mixed.files().size(), 3u);
  EXPECT_TRUE(mixed.contains("layers.0.w13"));
  AnyTensor t;
  EXPECT_EQ(mixed.tensor("absent", &t).message(), "tensor \"absent\" not found in the checkpoint (searched 3 files: " +
                                                      s1 + ", " + s2 + ", " + a_ + ")");
}

TEST_F(CheckpointTest, IndexErrors) {
  const std::string index = dir_ + "/model.safetensors.index.json";
  Checkpoint c;
  auto open_index = [&](std::string_view text) {
    write_bytes(index, text);
    return Checkpoint::open({index}, &c);
  };
  Status s = open_index(R"({"weight_map": {"x": "missing.safetensors"}})");
  EXPECT_TRUE(contains(s.message(), dir_ + "/missing.safetensors: cannot open")) << s.message();
  EXPECT_TRUE(contains(s.message(), "(a shard of " + index + ")")) << s.message();

  s = open_index(R"({"weight_map": {"layers.0.w13": "a.safetensors", "layers.9.w2": "a.safetensors"}})");
  EXPECT_EQ(s.message(), index + ": weight_map puts tensor \"layers.9.w2\" in " + dir_ +
                             "/a.safetensors, which does not contain it");

  s = open_index(R"({"metadata": {}})");
  EXPECT_EQ(s.message(), index + ": missing required key \"weight_map\"");
  s = open_index(R"({"weight_map": {"x": 3}})");
  EXPECT_EQ(s.message(), index + ": weight_map.x: expected a file name string, got number");
  s = open_index(R"({"weight_map": {}, "metadata": "x"})");
  EXPECT_EQ(s.message(), index + ": metadata: expected an object, got string");
  s = open_index(R"({"weight_map": {},})");
  EXPECT_EQ(s.message(), index + ": not valid JSON: line 1, column 19: syntax error while parsing object key - "
                                 "unexpected '}'; expected string literal");
  s = Checkpoint::open({dir_ + "/absent.index.json"}, &c);
  EXPECT_TRUE(contains(s.message(), dir_ + "/absent.index.json: cannot open")) << s.message();

  // Shards named outside the index's folder are refused before anything is opened.
  for (const char* shard : {"/etc/passwd", "../a.safetensors", "sub/../../a.safetensors", ".."}) {
    s = open_index(std::string(R"({"weight_map": {"layers.0.w13": ")") + shard + R"("}})");
    EXPECT_EQ(s.message(), index + ": weight_map.layers.0.w13: shard \"" + shard +
                               "\" must be a relative path inside the index's folder (no absolute path, no \"..\")")
        << shard;
  }

  // A shard holding a tensor also held by another file given directly.
  s = open_index(R"({"weight_map": {"layers.0.w13": "a.safetensors"}})");
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  const std::string copy = dir_ + "/copy.safetensors";
  fs::copy_file(a_, copy);
  s = Checkpoint::open({index, copy}, &c);
  EXPECT_EQ(s.message(), "tensor \"layers.0.gate\" is in two files: " + a_ + " and " + copy);
}

// Files that are not regular are refused without blocking: a FIFO (opening one for reading would
// wait for a writer forever), a character device such as /dev/zero (endless reads), a directory.
// A test that hangs here fails by its Bazel timeout.
TEST_F(CheckpointTest, NonRegularFilesNeverBlock) {
  const std::string fifo = dir_ + "/fifo.safetensors";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  Checkpoint c;
  Status s = Checkpoint::open({fifo}, &c);
  EXPECT_EQ(s.message(), "safetensors file " + fifo + ": expected a regular file, found a FIFO");
  const std::string fifo_index = dir_ + "/fifo.index.json";
  ASSERT_EQ(::mkfifo(fifo_index.c_str(), 0600), 0);
  s = Checkpoint::open({fifo_index}, &c);
  EXPECT_EQ(s.message(), "checkpoint index " + fifo_index + ": expected a regular file, found a FIFO");
  s = Checkpoint::open({"/dev/zero"}, &c);
  EXPECT_EQ(s.message(), "safetensors file /dev/zero: expected a regular file, found a character device");
  // A link to /dev/zero named like an index: links are followed, then the target is checked.
  const std::string zero_index = dir_ + "/zero.index.json";
  fs::create_symlink("/dev/zero", zero_index);
  s = Checkpoint::open({zero_index}, &c);
  EXPECT_EQ(s.message(), "checkpoint index " + zero_index + ": expected a regular file, found a character device");
  // A shard that is a FIFO inside the folder.
  write_bytes(dir_ + "/model.safetensors.index.json", R"({"weight_map": {"layers.0.w13": "fifo.safetensors"}})");
  s = Checkpoint::open({dir_ + "/model.safetensors.index.json"}, &c);
  EXPECT_TRUE(contains(s.message(), "expected a regular file, found a FIFO")) << s.message();
}

// The Hugging Face cache layout: every file of snapshots/<rev>/ is a link to ../../blobs/<hash>.
// Links whose names stay in the folder keep working, wherever they point.
TEST_F(CheckpointTest, HuggingFaceCacheLinksWork) {
  const fs::path root = fs::path(dir_) / "hub";
  fs::create_directories(root / "blobs");
  fs::create_directories(root / "snapshots" / "rev");
  fs::copy_file(a_, root / "blobs" / "0123abcd");
  fs::create_symlink("../../blobs/0123abcd", root / "snapshots" / "rev" / "a.safetensors");
  const std::string index = (root / "snapshots" / "rev" / "model.safetensors.index.json").string();
  write_bytes((root / "blobs" / "4567ef01").string(), R"({"weight_map": {"layers.0.w13": "a.safetensors"}})");
  fs::create_symlink("../../blobs/4567ef01", index);
  Checkpoint c;
  const Status s = Checkpoint::open({index}, &c);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_TRUE(c.contains("layers.0.w13"));
}

// An index with 300,000 metadata keys (8 MB) loads in linear time: the merge once compared every
// key with every earlier one (10^5 keys took 34 s), which would run into this test's timeout.
TEST_F(CheckpointTest, HugeIndexMetadataIsLinear) {
  std::string text = R"({"weight_map": {"layers.0.w13": "a.safetensors"}, "metadata": {)";
  for (int i = 0; i < 300000; ++i) text += (i ? ",\"k" : "\"k") + std::to_string(i) + "\": " + std::to_string(i);
  text += "}}";
  const std::string index = dir_ + "/model.safetensors.index.json";
  write_bytes(index, text);
  Checkpoint c;
  const Status s = Checkpoint::open({index}, &c);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  ASSERT_EQ(c.index_metadata().members().size(), 300000u);
  EXPECT_EQ(c.index_metadata().members().back().first, "k299999");
}

// JSON files are read up to a cap; a larger one is refused by its size, before reading it.
TEST(TextFiles, SizeCap) {
  const std::string path = test_dir() + "/big.json";
  write_bytes(path, std::string(1000, ' '));
  std::string text;
  EXPECT_TRUE(moe::io::read_text_file(path, "--model-config", 1000, &text).is_ok());
  EXPECT_EQ(text.size(), 1000u);
  EXPECT_EQ(moe::io::read_text_file(path, "--model-config", 999, &text).message(),
            "--model-config " + path + ": 1000 bytes, more than the 999 accepted");
}

TEST(TextFiles, ContainedRelativePaths) {
  using moe::io::is_contained_relative_path;
  for (const char* ok : {"a.safetensors", "sub/a.safetensors", "..a", "a..", "./a", "a/./b"}) {
    EXPECT_TRUE(is_contained_relative_path(ok)) << ok;
  }
  for (const char* bad : {"", "/a", "..", "../a", "a/..", "a/../b", "a/../../b"}) {
    EXPECT_FALSE(is_contained_relative_path(bad)) << bad;
  }
  EXPECT_FALSE(is_contained_relative_path(std::string_view("a\0b", 3)));
}

}  // namespace
