#include "moe/io/json.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <nlohmann/json.hpp>

namespace moe::io {

// ---------------------------------------------------------------------------------------------
// Value

std::int64_t Json::as_int() const {
  const Number& n = std::get<Number>(v_);
  if (n.is_int) return n.i;
  if (!(n.d >= -9223372036854775808.0 && n.d < 9223372036854775808.0)) return 0;
  return static_cast<std::int64_t>(n.d);
}

std::size_t Json::size() const {
  if (is_array()) return as_array().size();
  if (is_object()) return members().size();
  return 0;
}

Json::Object::Object(const Object& other)
    : items_(other.items_), index_(other.index_ ? std::make_unique<Index>(*other.index_) : nullptr) {}

Json::Object& Json::Object::operator=(const Object& other) {
  if (this != &other) *this = Object(other);  // copy first: `other` may live inside *this
  return *this;
}

Json& Json::Object::emplace_back(std::string key, Json value) {
  items_.emplace_back(std::move(key), std::move(value));
  if (index_) {
    index_->try_emplace(items_.back().first, items_.size() - 1);  // the first of a name wins
  } else if (items_.size() >= kIndexFrom) {
    index_ = std::make_unique<Index>();
    for (std::size_t i = 0; i < items_.size(); ++i) index_->try_emplace(items_[i].first, i);
  }
  return items_.back().second;
}

const Json* Json::Object::find(std::string_view key) const {
  if (index_) {
    const auto it = index_->find(key);
    return it == index_->end() ? nullptr : &items_[it->second].second;
  }
  for (const Member& m : items_) {
    if (m.first == key) return &m.second;
  }
  return nullptr;
}

Json* Json::Object::find(std::string_view key) {
  return const_cast<Json*>(static_cast<const Object*>(this)->find(key));
}

bool operator==(const Json::Object& a, const Json::Object& b) { return a.items_ == b.items_; }

// Growing arrays and objects move their elements instead of copying them (and their indexes).
static_assert(std::is_nothrow_move_constructible_v<Json>);

const Json* Json::find(std::string_view key) const { return is_object() ? members().find(key) : nullptr; }

Json* Json::find(std::string_view key) { return is_object() ? members().find(key) : nullptr; }

Json& Json::set(std::string key, Json value) {
  if (is_null()) v_ = Object{};
  Object& o = members();
  if (Json* existing = o.find(key)) {
    *existing = std::move(value);
    return *existing;
  }
  return o.emplace_back(std::move(key), std::move(value));
}

void Json::push_back(Json value) {
  if (is_null()) v_ = Array{};
  as_array().push_back(std::move(value));
}

bool operator==(const Json& a, const Json& b) {
  if (a.type() != b.type()) return false;
  switch (a.type()) {
    case Json::Type::kNull: return true;
    case Json::Type::kBool: return a.as_bool() == b.as_bool();
    case Json::Type::kNumber: {
      const auto& x = std::get<Json::Number>(a.v_);
      const auto& y = std::get<Json::Number>(b.v_);
      if (x.is_int != y.is_int) return false;
      if (x.is_int) return x.i == y.i;
      // Bitwise for doubles, so that -0.0 and 0.0 differ (and NaN, never parsed, equals itself).
      return std::memcmp(&x.d, &y.d, sizeof(double)) == 0;
    }
    case Json::Type::kString: return a.as_string() == b.as_string();
    case Json::Type::kArray: return a.as_array() == b.as_array();
    case Json::Type::kObject: return a.members() == b.members();
  }
  return false;
}

std::string_view Json::type_name(Type t) {
  switch (t) {
    case Type::kNull: return "null";
    case Type::kBool: return "bool";
    case Type::kNumber: return "number";
    case Type::kString: return "string";
    case Type::kArray: return "array";
    case Type::kObject: return "object";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------
// Serialization

namespace {

// Length of the valid UTF-8 sequence starting at s[i], or 0 when it is invalid (overlong forms,
// surrogates and code points above U+10FFFF are invalid).
std::size_t utf8_sequence_length(std::string_view s, std::size_t i) {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  std::size_t n = 0;
  std::uint32_t cp = 0;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
    cp = c & 0x1Fu;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    cp = c & 0x0Fu;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    cp = c & 0x07u;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (std::size_t k = 1; k < n; ++k) {
    if ((b(i + k) & 0xC0u) != 0x80u) return 0;
    cp = (cp << 6) | (b(i + k) & 0x3Fu);
  }
  if (n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) return 0;
  if (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) return 0;
  return n;
}

void dump_string(std::string_view s, std::string* out) {
  static constexpr char kHex[] = "0123456789abcdef";
  out->push_back('"');
  for (std::size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      const std::size_t n = utf8_sequence_length(s, i);
      if (n == 0) {
        out->append("\\ufffd");
        ++i;
      } else {
        out->append(s.substr(i, n));
        i += n;
      }
      continue;
    }
    switch (c) {
      case '"': out->append("\\\""); break;
      case '\\': out->append("\\\\"); break;
      case '\b': out->append("\\b"); break;
      case '\f': out->append("\\f"); break;
      case '\n': out->append("\\n"); break;
      case '\r': out->append("\\r"); break;
      case '\t': out->append("\\t"); break;
      default:
        if (c < 0x20) {
          out->append("\\u00");
          out->push_back(kHex[c >> 4]);
          out->push_back(kHex[c & 0xF]);
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
    ++i;
  }
  out->push_back('"');
}

void dump_double(double d, std::string* out) {
  if (!std::isfinite(d)) {  // JSON has no inf/nan; only reachable from values built in code
    out->append("null");
    return;
  }
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof(buf), d);  // shortest text that round-trips
  std::string_view text(buf, static_cast<std::size_t>(r.ptr - buf));
  out->append(text);
  if (text.find_first_of(".eE") == std::string_view::npos) out->append(".0");  // stays a double
}

}  // namespace

void Json::dump_to(std::string* out) const {
  switch (type()) {
    case Type::kNull: out->append("null"); break;
    case Type::kBool: out->append(as_bool() ? "true" : "false"); break;
    case Type::kNumber: {
      const Number& n = std::get<Number>(v_);
      if (n.is_int) {
        char buf[32];
        const auto r = std::to_chars(buf, buf + sizeof(buf), n.i);
        out->append(buf, r.ptr);
      } else {
        dump_double(n.d, out);
      }
      break;
    }
    case Type::kString: dump_string(as_string(), out); break;
    case Type::kArray: {
      out->push_back('[');
      bool first = true;
      for (const Json& e : as_array()) {
        if (!first) out->push_back(',');
        first = false;
        e.dump_to(out);
      }
      out->push_back(']');
      break;
    }
    case Type::kObject: {
      out->push_back('{');
      bool first = true;
      for (const Member& m : members()) {
        if (!first) out->push_back(',');
        first = false;
        dump_string(m.first, out);
        out->push_back(':');
        m.second.dump_to(out);
      }
      out->push_back('}');
      break;
    }
  }
}

std::string Json::dump() const {
  std::string out;
  dump_to(&out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Parsing: nlohmann-json's lexer and parser (fuzzed upstream) through its SAX interface, building
// Json directly. The handler adds what the tool needs on top: duplicate keys, the depth limit,
// exact integers and -0, and positions that count code points.

namespace {

// The input as nlohmann's lexer reads it, a byte at a time. SAX events carry no position, so the
// iterator records how far the lexer has read: at an event, up to the end of the token just read
// (after a number, one byte more).
class TrackingIterator {
 public:
  using iterator_category = std::input_iterator_tag;
  using value_type = char;
  using difference_type = std::ptrdiff_t;
  using pointer = const char*;
  using reference = const char&;

  TrackingIterator(const char* p, const char** read_end) : p_(p), read_end_(read_end) {}
  reference operator*() const { return *p_; }
  TrackingIterator& operator++() {
    *read_end_ = ++p_;
    return *this;
  }
  TrackingIterator operator++(int) {
    TrackingIterator old = *this;
    ++*this;
    return old;
  }
  friend bool operator==(const TrackingIterator& a, const TrackingIterator& b) { return a.p_ == b.p_; }

 private:
  const char* p_;
  const char** read_end_;
};

// "0xNN".
std::string hex_byte(char c) {
  static constexpr char kHex[] = "0123456789abcdef";
  const unsigned char b = static_cast<unsigned char>(c);
  return std::string("0x") + kHex[b >> 4] + kHex[b & 0xF];
}

void replace_once(std::string* s, std::string_view from, std::string_view to) {
  if (const std::size_t p = s->find(from); p != std::string::npos) s->replace(p, from.size(), to);
}

// At most 40 characters of `s` for a message.
std::string shorten(std::string s) {
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return s;
}

class JsonBuilder final : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit JsonBuilder(std::string_view text) : text_(text), read_end_(text.data()) {}

  Status parse(Json* out) {
    // nlohmann skips a byte order mark (and reads any other leading 0xef as a broken one); JSON
    // text must not start with one (RFC 8259), and Python's json refuses it too.
    if (!text_.empty() && text_[0] == '\xef') {
      fail(0, std::string("syntax error while parsing value - unexpected ") +
                  (text_.substr(0, 3) == "\xef\xbb\xbf" ? "byte order mark" : "byte 0xef") +
                  "; expected '[', '{', or a literal");
      return error_;
    }
    const TrackingIterator first(text_.data(), &read_end_);
    const TrackingIterator last(text_.data() + text_.size(), &read_end_);
    if (!nlohmann::json::sax_parse(first, last, this)) {
      return error_.is_ok() ? invalid_argument("invalid JSON") : error_;
    }
    // nlohmann ends its input at a NUL byte (as in a C string); here the text goes on after it.
    if (const std::size_t nul = text_.find('\0'); nul != std::string_view::npos) {
      fail(nul, "syntax error while parsing value - unexpected byte 0x00; expected end of input");
      return error_;
    }
    *out = std::move(root_);
    return Status::ok();
  }

  bool null() override { return put(Json()); }
  bool boolean(bool b) override { return put(Json(b)); }
  // nlohmann reports every integer from 0 up as unsigned, so a 0 here was written "-0": that
  // stays the double -0.0.
  bool number_integer(std::int64_t i) override { return put(i == 0 ? Json(-0.0) : Json(i)); }
  // Above int64's range Json keeps the nearest double.
  bool number_unsigned(std::uint64_t u) override { return put(Json(u)); }
  bool number_float(double d, const std::string&) override { return put(Json(d)); }
  bool string(std::string& s) override { return put(Json(std::move(s))); }
  bool binary(binary_t&) override { return fail(read_pos(), "unexpected binary value"); }  // not in JSON text

  bool start_object(std::size_t) override { return open(Json::object()); }
  bool start_array(std::size_t) override { return open(Json::array()); }
  bool end_object() override { return close(); }
  bool end_array() override { return close(); }

  bool key(std::string& k) override {
    Json::Object& o = open_.back()->members();
    if (o.find(k) != nullptr) {
      std::string shown;
      dump_string(k, &shown);
      return fail(key_start(), "duplicate key " + shorten(std::move(shown)) + " in object");
    }
    value_ = &o.emplace_back(std::move(k), Json());
    return true;
  }

  // `position` counts the bytes read, an end of input as one more: the error is at the last.
  bool parse_error(std::size_t position, const std::string& last_token,
                   const nlohmann::detail::exception& ex) override {
    std::size_t at = position == 0 ? 0 : position - 1;
    if (ex.id == 406) {  // a number beyond double's range, the token just read
      const std::size_t start = position > last_token.size() ? position - last_token.size() : 0;
      return fail(start, "number " + shorten(last_token) + " is out of the range of a double");
    }
    // "[json.exception.parse_error.101] parse error at line L, column C: <what>": positions are
    // counted here instead (in code points, and a newline ends its line).
    std::string what = ex.what();
    if (const std::size_t colon = what.find(": "); colon != std::string::npos) what.erase(0, colon + 2);
    // A lexer error ends with what it read since the token began: raw bytes, and megabytes for an
    // unterminated string. Name the bytes that stopped it instead.
    const std::string last_read = "; last read: '" + last_token + "'";
    if (const std::size_t p = what.find(last_read); p != std::string::npos) {
      const std::string_view problem(what.data(), p);
      std::string got;
      if (problem.find("ill-formed UTF-8") != std::string_view::npos) {
        at = utf8_sequence_start(at);  // e.g. Latin-1 "é" (0xe9) stops at the byte after it
        const std::size_t end = std::min(position, text_.size());
        got = end - at > 1 ? "; got bytes" : end - at == 1 ? "; got byte" : "; got";
        for (std::size_t i = at; i < end; ++i) got += " " + hex_byte(text_[i]);
        if (position > text_.size()) got += at < end ? ", then end of input" : " end of input";
      } else if (problem.find("surrogate") == std::string_view::npos) {
        got = "; got " + describe(at);  // (a surrogate message names the problem; its byte is a hex digit)
      }
      what.replace(p, last_read.size(), got);
    } else if (at < text_.size() && text_[at] == '\0') {
      // nlohmann takes a NUL byte for the end of the input.
      replace_once(&what, "unexpected end of input", "unexpected byte 0x00");
    }
    // After an element or a member nlohmann names only the closing bracket; a comma fits too.
    if (what.starts_with("syntax error while parsing array - ")) {
      replace_once(&what, "; expected ']'", "; expected ',' or ']'");
    } else if (what.starts_with("syntax error while parsing object - ")) {
      replace_once(&what, "; expected '}'", "; expected ',' or '}'");
    }
    return fail(at, what);
  }

 private:
  std::size_t read_pos() const { return static_cast<std::size_t>(read_end_ - text_.data()); }

  // Where the next value goes: the root, a new element of the innermost array, or the value of the
  // key just read. Only the innermost container grows, so the pointers in open_ stay valid.
  Json* slot() {
    if (open_.empty()) return &root_;
    if (Json* top = open_.back(); top->is_array()) {
      top->as_array().emplace_back();
      return &top->as_array().back();
    }
    return value_;
  }

  bool put(Json v) {
    *slot() = std::move(v);
    return true;
  }

  bool open(Json container) {
    // The lexer stopped right after the bracket.
    if (open_.size() >= static_cast<std::size_t>(kMaxJsonDepth)) {
      return fail(read_pos() - 1, "nesting deeper than " + std::to_string(kMaxJsonDepth) + " levels");
    }
    Json* s = slot();
    *s = std::move(container);
    open_.push_back(s);
    return true;
  }

  bool close() {
    open_.pop_back();
    return true;
  }

  // The opening quote of the key just read (the lexer stopped at its closing quote). Inside a
  // string a quote is escaped: an odd run of backslashes precedes it.
  std::size_t key_start() const {
    std::size_t i = read_pos() - 1;
    while (i > 0) {
      --i;
      if (text_[i] != '"') continue;
      std::size_t backslashes = 0;
      while (backslashes < i && text_[i - 1 - backslashes] == '\\') ++backslashes;
      if (backslashes % 2 == 0) return i;
    }
    return 0;
  }

  // What is at `at`, for messages: "end of input", "'x'", "U+00E9", "a newline", or "byte 0xNN".
  std::string describe(std::size_t at) const {
    if (at >= text_.size()) return "end of input";
    const unsigned char c = static_cast<unsigned char>(text_[at]);
    if (c >= 0x20 && c < 0x7f) return std::string("'") + static_cast<char>(c) + "'";
    if (c == '\n') return "a newline";
    if (c == '\t') return "a tab";
    if (const std::size_t n = utf8_sequence_length(text_, at); c >= 0x80 && n > 0) {
      // By number: the character may be invisible or reorder the terminal's text.
      std::uint32_t cp = c & (0x7Fu >> n);
      for (std::size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(text_[at + k]) & 0x3Fu);
      char buf[16];
      std::snprintf(buf, sizeof(buf), "U+%04X", static_cast<unsigned>(cp));
      return buf;
    }
    return "byte " + hex_byte(text_[at]);
  }

  // Where the UTF-8 sequence that byte `at` broke began: at the lead byte before it when `at`
  // falls inside the length that lead announces, else at `at`.
  std::size_t utf8_sequence_start(std::size_t at) const {
    for (std::size_t back = 1; back <= 3 && back <= at; ++back) {
      const unsigned char c = static_cast<unsigned char>(text_[at - back]);
      if ((c & 0xC0u) == 0x80u) continue;  // a continuation byte: look further back
      const std::size_t length = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
      return back < length ? at - back : at;
    }
    return at;
  }

  // Records "line L, column C: <what>" (C counts code points from 1) and stops the parser.
  bool fail(std::size_t at, std::string_view what) {
    at = std::min(at, text_.size());
    std::size_t line = 1, column = 1;
    for (std::size_t i = 0; i < at; ++i) {
      const unsigned char c = static_cast<unsigned char>(text_[i]);
      if (c == '\n') {
        ++line;
        column = 1;
      } else if ((c & 0xC0u) != 0x80u) {
        ++column;
      }
    }
    error_ = invalid_argument("line ", line, ", column ", column, ": ", what);
    return false;
  }

  std::string_view text_;
  const char* read_end_;  // how far the lexer has read
  Json root_;
  std::vector<Json*> open_;  // the containers being filled, innermost last
  Json* value_ = nullptr;    // the value of the key just read
  Status error_ = Status::ok();
};

}  // namespace

Status parse_json(std::string_view text, Json* out) { return JsonBuilder(text).parse(out); }

// ---------------------------------------------------------------------------------------------
// Typed access

namespace {

std::string key_path(std::string_view where, std::string_view key) {
  std::string p(where);
  if (!p.empty()) p.push_back('.');
  p.append(key);
  return p;
}

// "string \"abc\"", "number 3.5", "array", "object", "null", "bool true".
std::string describe_value(const Json& v) {
  std::string s(Json::type_name(v.type()));
  if (v.is_array() || v.is_object() || v.is_null()) return s;
  std::string text = v.dump();
  if (text.size() > 40) text = text.substr(0, 37) + "...";
  return s + " " + text;
}

// Finds `key` in `obj`; *value is nullptr when it is missing and `required` is false.
Status lookup(const Json& obj, std::string_view key, std::string_view where, bool required, const Json** value) {
  if (!obj.is_object()) {
    return invalid_argument(where.empty() ? std::string("value") : std::string(where), ": expected an object, got ",
                            describe_value(obj), " (looking up \"", key, "\")");
  }
  *value = obj.find(key);
  if (*value == nullptr && required) {
    if (where.empty()) return invalid_argument("missing required key \"", key, "\"");
    return invalid_argument(where, ": missing required key \"", key, "\"");
  }
  return Status::ok();
}

Status wrong_type(std::string_view where, std::string_view key, std::string_view expected, const Json& v) {
  return invalid_argument(key_path(where, key), ": expected ", expected, ", got ", describe_value(v));
}

Status to_int(const Json& v, std::string_view path, std::int64_t* out) {
  if (v.is_integer()) {
    *out = v.as_int();
    return Status::ok();
  }
  if (v.is_number()) {
    const double d = v.as_double();
    if (d == std::trunc(d) && d >= -9223372036854775808.0 && d < 9223372036854775808.0) {
      *out = static_cast<std::int64_t>(d);
      return Status::ok();
    }
  }
  return invalid_argument(path, ": expected an integer, got ", describe_value(v));
}

}  // namespace

Status as_int(const Json& value, std::string_view path, std::int64_t* out) { return to_int(value, path, out); }

Status get_int(const Json& obj, std::string_view key, std::int64_t* out, std::string_view where) {
  const Json* v = nullptr;
  MOE_RETURN_IF_ERROR(lookup(obj, key, where, true, &v));
  return to_int(*v, key_path(where, key), out);
}

Status get_double(const Json& obj, std::string_view key, double* out, std::string_view where) {
  const Json* v = nullptr;
  MOE_RETURN_IF_ERROR(lookup(obj, key, where, true, &v));
  if (!v->is_number()) return wrong_type(where, key, "a number", *v);
  *out = v->as_double();
  return Status::ok();
}

Status get_bool(const Json& obj, std::string_view key, bool* out, std::string_view where) {
  const Json* v = nullptr;
  MOE_RETURN_IF_ERROR(lookup(obj, key, where, true, &v));
  if (!v->is_bool()) return wrong_type(where, key, "a bool", *v);
  *out = v->as_bool();
  return Status::ok();
}

Status get_string(const Json& obj, std::string_view key, std::string* out, std::string_view where) {
  const Json* v = nullptr;
  MOE_RETURN_IF_ERROR(lookup(obj, key, where, true, &v));
  if (!v->is_string()) return wrong_type(where, key, "a string", *v);
  *out = v->as_string();
  return Status::ok();
}

Status get_array(const Json& obj, std::string_view key, const Json** out, std::string_view where) {
  const Json* v = nullptr;
  MOE_RETURN_IF_ERROR(lookup(obj, key, where, true, &v));
  if (!v->is_array()) return wrong_type(where, key, "an array", *v);
  *out = v;
  return Status::ok();
}

Status get_object(const Json& obj, std::string_view key, const Json** out, std::string_view where) {
  const Json* v = nullptr;
  MOE_RETURN_IF_ERROR(lookup(obj, key, where, true, &v));
  if (!v->is_object()) return wrong_type(where, key, "an object", *v);
  *out = v;
  return Status::ok();
}

Status get_int_or(const Json& obj, std::string_view key, std::int64_t default_value, std::int64_t* out,
                  std::string_view where) {
  const Json* v = nullptr;
  MOE_RETURN_IF_ERROR(lookup(obj, key, where, false, &v));
  if (v == nullptr || v->is_null()) {
    *out = default_value;
    return Status::ok();
  }
  return to_int(*v, key_path(where, key), out);
}

Status get_double_or(const Json& obj, std::string_view key, double default_value, double* out,
                     std::string_view where) {
  const Json* v = nullptr;
  MOE_RETURN_IF_ERROR(lookup(obj, key, where, false, &v));
  if (v == nullptr || v->is_null()) {
    *out = default_value;
    return Status::ok();
  }
  if (!v->is_number()) return wrong_type(where, key, "a number", *v);
  *out = v->as_double();
  return Status::ok();
}

Status get_bool_or(const Json& obj, std::string_view key, bool default_value, bool* out, std::string_view where) {
  const Json* v = nullptr;
  MOE_RETURN_IF_ERROR(lookup(obj, key, where, false, &v));
  if (v == nullptr || v->is_null()) {
    *out = default_value;
    return Status::ok();
  }
  if (!v->is_bool()) return wrong_type(where, key, "a bool", *v);
  *out = v->as_bool();
  return Status::ok();
}

Status get_string_or(const Json& obj, std::string_view key, std::string_view default_value, std::string* out,
                     std::string_view where) {
  const Json* v = nullptr;
  MOE_RETURN_IF_ERROR(lookup(obj, key, where, false, &v));
  if (v == nullptr || v->is_null()) {
    *out = std::string(default_value);
    return Status::ok();
  }
  if (!v->is_string()) return wrong_type(where, key, "a string", *v);
  *out = v->as_string();
  return Status::ok();
}

}  // namespace moe::io
