#include "moe/io/json.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <unordered_set>

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

const Json* Json::find(std::string_view key) const {
  if (!is_object()) return nullptr;
  for (const Member& m : members()) {
    if (m.first == key) return &m.second;
  }
  return nullptr;
}

Json* Json::find(std::string_view key) { return const_cast<Json*>(static_cast<const Json*>(this)->find(key)); }

Json& Json::set(std::string key, Json value) {
  if (is_null()) v_ = Object{};
  if (Json* existing = find(key)) {
    *existing = std::move(value);
    return *existing;
  }
  Object& o = members();
  o.emplace_back(std::move(key), std::move(value));
  return o.back().second;
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
// Parsing

class JsonParser {
 public:
  explicit JsonParser(std::string_view text) : s_(text) {}

  Status parse(Json* out) {
    skip_ws();
    Json v;
    MOE_RETURN_IF_ERROR(parse_value(&v, 0));
    skip_ws();
    if (pos_ != s_.size()) return expected("end of input after the value");
    *out = std::move(v);
    return Status::ok();
  }

 private:
  bool at_end() const { return pos_ >= s_.size(); }
  char peek() const { return s_[pos_]; }

  void skip_ws() {
    while (!at_end()) {
      const char c = peek();
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }

  // What is at `at`, for messages: "end of input", "'x'", or "byte 0xNN".
  std::string describe(std::size_t at) const {
    if (at >= s_.size()) return "end of input";
    const unsigned char c = static_cast<unsigned char>(s_[at]);
    if (c >= 0x20 && c < 0x7f) return std::string("'") + static_cast<char>(c) + "'";
    static constexpr char kHex[] = "0123456789abcdef";
    if (c == '\n') return "a newline";
    if (c == '\t') return "a tab";
    return std::string("byte 0x") + kHex[c >> 4] + kHex[c & 0xF];
  }

  // "line L, column C: <what>", C counting code points from 1.
  Status error(std::size_t at, std::string_view what) const {
    at = std::min(at, s_.size());
    std::size_t line = 1, column = 1;
    for (std::size_t i = 0; i < at; ++i) {
      const unsigned char c = static_cast<unsigned char>(s_[i]);
      if (c == '\n') {
        ++line;
        column = 1;
      } else if ((c & 0xC0u) != 0x80u) {
        ++column;
      }
    }
    return invalid_argument("line ", line, ", column ", column, ": ", what);
  }
  Status expected(std::string_view what) const {
    return error(pos_, std::string("expected ") + std::string(what) + ", got " + describe(pos_));
  }

  Status parse_value(Json* out, int depth) {
    if (at_end()) return expected("a value");
    switch (peek()) {
      case '{': return parse_object(out, depth + 1);
      case '[': return parse_array(out, depth + 1);
      case '"': {
        std::string s;
        MOE_RETURN_IF_ERROR(parse_string(&s));
        out->v_ = std::move(s);
        return Status::ok();
      }
      case 't': return parse_literal("true", Json(true), out);
      case 'f': return parse_literal("false", Json(false), out);
      case 'n': return parse_literal("null", Json(), out);
      default:
        if (peek() == '-' || (peek() >= '0' && peek() <= '9')) return parse_number(out);
        return expected("a value (object, array, string, number, true, false or null)");
    }
  }

  Status parse_literal(std::string_view word, Json value, Json* out) {
    for (std::size_t k = 0; k < word.size(); ++k) {
      if (pos_ + k >= s_.size() || s_[pos_ + k] != word[k]) {
        return error(pos_ + k, std::string("invalid literal, expected '") + std::string(word) + "', got " +
                                   describe(pos_ + k));
      }
    }
    pos_ += word.size();
    *out = std::move(value);
    return Status::ok();
  }

  Status check_depth(int depth) const {
    if (depth > kMaxJsonDepth) {
      return error(pos_, "nesting deeper than " + std::to_string(kMaxJsonDepth) + " levels");
    }
    return Status::ok();
  }

  Status parse_array(Json* out, int depth) {
    MOE_RETURN_IF_ERROR(check_depth(depth));
    ++pos_;  // '['
    Json::Array a;
    skip_ws();
    if (!at_end() && peek() == ']') {
      ++pos_;
      out->v_ = std::move(a);
      return Status::ok();
    }
    while (true) {
      skip_ws();
      Json e;
      if (at_end() || peek() == ']' || peek() == ',') return expected("a value in array");
      MOE_RETURN_IF_ERROR(parse_value(&e, depth));
      a.push_back(std::move(e));
      skip_ws();
      if (at_end() || (peek() != ',' && peek() != ']')) return expected("',' or ']' in array");
      if (s_[pos_++] == ']') break;
    }
    out->v_ = std::move(a);
    return Status::ok();
  }

  Status parse_object(Json* out, int depth) {
    MOE_RETURN_IF_ERROR(check_depth(depth));
    ++pos_;  // '{'
    Json::Object o;
    std::unordered_set<std::string> keys;
    skip_ws();
    if (!at_end() && peek() == '}') {
      ++pos_;
      out->v_ = std::move(o);
      return Status::ok();
    }
    while (true) {
      skip_ws();
      if (at_end() || peek() != '"') return expected("a string key in object");
      const std::size_t key_pos = pos_;
      std::string key;
      MOE_RETURN_IF_ERROR(parse_string(&key));
      // Duplicate check: a linear scan for small objects, a hash set once they grow.
      bool duplicate = false;
      if (o.size() < 16) {
        for (const Json::Member& m : o) duplicate = duplicate || m.first == key;
      } else {
        if (keys.empty()) {
          for (const Json::Member& m : o) keys.insert(m.first);
        }
        duplicate = !keys.insert(key).second;
      }
      if (duplicate) {
        std::string shown;
        dump_string(key, &shown);
        return error(key_pos, "duplicate key " + shown + " in object");
      }
      skip_ws();
      if (at_end() || peek() != ':') return expected("':' after key in object");
      ++pos_;
      skip_ws();
      Json v;
      MOE_RETURN_IF_ERROR(parse_value(&v, depth));
      o.emplace_back(std::move(key), std::move(v));
      skip_ws();
      if (at_end() || (peek() != ',' && peek() != '}')) return expected("',' or '}' in object");
      if (s_[pos_++] == '}') break;
    }
    out->v_ = std::move(o);
    return Status::ok();
  }

  static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  // Reads the 4 hex digits after "\u" at pos_ (pointing at the backslash).
  Status read_u_escape(std::uint32_t* out) {
    std::uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      const std::size_t at = pos_ + 2 + static_cast<std::size_t>(k);
      const int h = at < s_.size() ? hex_value(s_[at]) : -1;
      if (h < 0) return error(at, "expected 4 hex digits after \\u, got " + describe(at));
      v = (v << 4) | static_cast<std::uint32_t>(h);
    }
    pos_ += 6;
    *out = v;
    return Status::ok();
  }

  static void append_utf8(std::uint32_t cp, std::string* out) {
    if (cp < 0x80) {
      out->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  Status parse_string(std::string* out) {
    const std::size_t start = pos_;
    ++pos_;  // opening quote
    std::string s;
    while (true) {
      if (at_end()) return error(start, "unterminated string (expected '\"' before end of input)");
      const unsigned char c = static_cast<unsigned char>(peek());
      if (c == '"') {
        ++pos_;
        break;
      }
      if (c < 0x20) return error(pos_, "control character " + describe(pos_) + " in string (must be escaped)");
      if (c >= 0x80) {
        const std::size_t n = utf8_sequence_length(s_, pos_);
        if (n == 0) return error(pos_, "invalid UTF-8 (" + describe(pos_) + ") in string");
        s.append(s_.substr(pos_, n));
        pos_ += n;
        continue;
      }
      if (c != '\\') {
        s.push_back(static_cast<char>(c));
        ++pos_;
        continue;
      }
      // Escape sequence.
      if (pos_ + 1 >= s_.size()) return error(pos_ + 1, "expected an escape character after '\\', got end of input");
      const char e = s_[pos_ + 1];
      switch (e) {
        case '"': s.push_back('"'); pos_ += 2; break;
        case '\\': s.push_back('\\'); pos_ += 2; break;
        case '/': s.push_back('/'); pos_ += 2; break;
        case 'b': s.push_back('\b'); pos_ += 2; break;
        case 'f': s.push_back('\f'); pos_ += 2; break;
        case 'n': s.push_back('\n'); pos_ += 2; break;
        case 'r': s.push_back('\r'); pos_ += 2; break;
        case 't': s.push_back('\t'); pos_ += 2; break;
        case 'u': {
          const std::size_t esc = pos_;
          std::uint32_t cp = 0;
          MOE_RETURN_IF_ERROR(read_u_escape(&cp));
          if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return error(esc, "unpaired low surrogate \\u" + std::string(s_.substr(esc + 2, 4)) + " in string");
          }
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (pos_ + 1 >= s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u') {
              return error(pos_, "expected a \\u low surrogate after high surrogate \\u" +
                                     std::string(s_.substr(esc + 2, 4)) + ", got " + describe(pos_));
            }
            const std::size_t low_pos = pos_;
            std::uint32_t low = 0;
            MOE_RETURN_IF_ERROR(read_u_escape(&low));
            if (low < 0xDC00 || low > 0xDFFF) {
              return error(low_pos, "expected a low surrogate (\\udc00-\\udfff) after high surrogate \\u" +
                                        std::string(s_.substr(esc + 2, 4)) + ", got \\u" +
                                        std::string(s_.substr(low_pos + 2, 4)));
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(cp, &s);
          break;
        }
        default:
          return error(pos_ + 1, "invalid escape, expected one of \"\\/bfnrtu after '\\', got " + describe(pos_ + 1));
      }
    }
    *out = std::move(s);
    return Status::ok();
  }

  static bool is_digit(char c) { return c >= '0' && c <= '9'; }

  Status parse_number(Json* out) {
    const std::size_t start = pos_;
    bool integral = true;
    if (peek() == '-') ++pos_;
    if (at_end() || !is_digit(peek())) return expected("a digit after '-'");
    if (peek() == '0') {
      ++pos_;
      if (!at_end() && is_digit(peek())) return error(pos_, "leading zeros are not allowed in numbers");
    } else {
      while (!at_end() && is_digit(peek())) ++pos_;
    }
    if (!at_end() && peek() == '.') {
      integral = false;
      ++pos_;
      if (at_end() || !is_digit(peek())) return expected("a digit after '.' in number");
      while (!at_end() && is_digit(peek())) ++pos_;
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      integral = false;
      ++pos_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
      if (at_end() || !is_digit(peek())) return expected("a digit in the exponent of number");
      while (!at_end() && is_digit(peek())) ++pos_;
    }
    const std::string_view text = s_.substr(start, pos_ - start);
    const char* first = text.data();
    const char* last = text.data() + text.size();
    Json::Number n;
    if (integral && text != "-0") {  // "-0" is kept as the double -0.0
      std::int64_t i = 0;
      const auto r = std::from_chars(first, last, i);
      if (r.ec == std::errc() && r.ptr == last) {
        n.is_int = true;
        n.i = i;
        n.d = static_cast<double>(i);
        out->v_ = n;
        return Status::ok();
      }
      // Out of int64's range: falls through to a double.
    }
    double d = 0;
    const auto r = std::from_chars(first, last, d);
    if (r.ec == std::errc::result_out_of_range) {
      // Overflow or underflow; strtod tells which (its result is ±HUGE_VAL on overflow).
      const std::string copy(text);
      d = std::strtod(copy.c_str(), nullptr);
      if (std::isinf(d)) return error(start, "number " + copy + " is out of the range of a double");
    } else if (r.ec != std::errc() || r.ptr != last) {
      return error(start, "invalid number " + std::string(text));
    }
    n.d = d;
    out->v_ = n;
    return Status::ok();
  }

  std::string_view s_;
  std::size_t pos_ = 0;
};

Status parse_json(std::string_view text, Json* out) { return JsonParser(text).parse(out); }

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
