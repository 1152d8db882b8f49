// A small JSON value, parser and serializer, for checkpoint headers and model configs.
//
// - Numbers are doubles. A number written without a fraction or an exponent that fits in int64
//   also keeps its exact int64 value (is_integer()), so 64-bit offsets survive a round trip.
// - Objects keep their keys in the order they were read or inserted. Duplicate keys are a parse
//   error. Objects of more than a few members carry an index by key: find is O(log n), so
//   parsing or merging 10^5 keys is n·log n, not n².
// - Strings hold UTF-8. The parser (nlohmann-json's, fuzzed upstream, driven through its SAX
//   interface) decodes every escape, \uXXXX surrogate pairs included, and rejects invalid UTF-8,
//   unpaired surrogates, raw control characters and a byte order mark.
// - parse_json's errors give the line and column (1-based, columns count code points) and what
//   was expected there. Nesting deeper than kMaxJsonDepth is an error, not a stack overflow.
// - dump() writes compact, valid JSON that parses back to an equal value: integral doubles get a
//   ".0" so they stay doubles, and invalid UTF-8 in a string is written as U+FFFD.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "moe/status.h"

namespace moe::io {

inline constexpr int kMaxJsonDepth = 512;

class Json {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
  using Array = std::vector<Json>;
  using Member = std::pair<std::string, Json>;

  // An object's members in order, like a std::vector<Member> that only appends. Keys cannot be
  // changed in place (iteration and indexing are const), which keeps the index by key right;
  // values change through Json::find and Json::set.
  class Object {
   public:
    using value_type = Member;
    using const_iterator = std::vector<Member>::const_iterator;
    using iterator = const_iterator;

    Object() = default;
    Object(const Object& other);
    Object& operator=(const Object& other);
    Object(Object&&) noexcept = default;
    Object& operator=(Object&&) noexcept = default;
    ~Object() = default;

    std::size_t size() const { return items_.size(); }
    bool empty() const { return items_.empty(); }
    const_iterator begin() const { return items_.begin(); }
    const_iterator end() const { return items_.end(); }
    const Member& operator[](std::size_t i) const { return items_[i]; }
    const Member& front() const { return items_.front(); }
    const Member& back() const { return items_.back(); }
    void reserve(std::size_t n) { items_.reserve(n); }

    // Appends a member and returns its value. A key that is already present is appended all the
    // same (as a vector would); find and set see the first member of that name.
    Json& emplace_back(std::string key, Json value);

    // The value of the first member named `key`, or nullptr.
    const Json* find(std::string_view key) const;
    Json* find(std::string_view key);

    // Members in order.
    friend bool operator==(const Object& a, const Object& b);

   private:
    // Smaller objects are scanned: cheaper than an index for the few keys of a config entry.
    static constexpr std::size_t kIndexFrom = 16;
    using Index = std::map<std::string, std::size_t, std::less<>>;

    std::vector<Member> items_;
    // Key -> position of its first member, once there are kIndexFrom members. A tree rather than
    // a hash table: keys come from untrusted files, and no choice of keys makes a tree slow.
    std::unique_ptr<Index> index_;
  };

  Json() = default;  // null
  Json(std::nullptr_t) {}
  Json(bool b) : v_(b) {}
  Json(double d) : v_(Number{d, 0, false}) {}
  template <class I>
    requires(std::is_integral_v<I> && !std::is_same_v<I, bool>)
  Json(I i) : v_(make_integer(i)) {}
  Json(const char* s) : v_(std::string(s)) {}
  Json(std::string_view s) : v_(std::string(s)) {}
  Json(std::string s) : v_(std::move(s)) {}
  Json(Array a) : v_(std::move(a)) {}
  Json(Object o) : v_(std::move(o)) {}

  static Json array() { return Json(Array{}); }
  static Json object() { return Json(Object{}); }

  Type type() const { return static_cast<Type>(v_.index()); }
  bool is_null() const { return type() == Type::kNull; }
  bool is_bool() const { return type() == Type::kBool; }
  bool is_number() const { return type() == Type::kNumber; }
  // A number written without fraction or exponent that fits in int64.
  bool is_integer() const { return is_number() && std::get<Number>(v_).is_int; }
  bool is_string() const { return type() == Type::kString; }
  bool is_array() const { return type() == Type::kArray; }
  bool is_object() const { return type() == Type::kObject; }

  // Accessors: the value must have the matching type (checked with std::get; a mismatch throws
  // std::bad_variant_access). Use the get_* functions below for checked, reported access.
  bool as_bool() const { return std::get<bool>(v_); }
  double as_double() const { return std::get<Number>(v_).d; }
  // The exact value when is_integer(), else the double truncated toward zero (when in range).
  std::int64_t as_int() const;
  const std::string& as_string() const { return std::get<std::string>(v_); }
  const Array& as_array() const { return std::get<Array>(v_); }
  Array& as_array() { return std::get<Array>(v_); }
  const Object& members() const { return std::get<Object>(v_); }
  Object& members() { return std::get<Object>(v_); }

  // Elements of an array or members of an object; 0 for the other types.
  std::size_t size() const;
  // An array's element.
  const Json& operator[](std::size_t i) const { return as_array()[i]; }
  // An object's value for `key` (its first member of that name), or nullptr when this is not an
  // object or has no such key.
  const Json* find(std::string_view key) const;
  Json* find(std::string_view key);
  // Objects: replaces the value of `key`, or appends it. Turns a null into an object first.
  Json& set(std::string key, Json value);
  // Arrays: appends. Turns a null into an array first.
  void push_back(Json value);

  // Compact JSON text.
  std::string dump() const;
  void dump_to(std::string* out) const;

  // Structural equality; numbers compare by value (and integers by their int64), objects by
  // members in order.
  friend bool operator==(const Json& a, const Json& b);

  // "null", "bool", "number", "string", "array", "object".
  static std::string_view type_name(Type t);

 private:
  struct Number {
    double d = 0;
    std::int64_t i = 0;
    bool is_int = false;
  };
  template <class I>
  static Number make_integer(I i) {
    if constexpr (std::is_signed_v<I> || sizeof(I) < sizeof(std::int64_t)) {
      return Number{static_cast<double>(i), static_cast<std::int64_t>(i), true};
    } else {
      if (i <= static_cast<I>(INT64_MAX)) return Number{static_cast<double>(i), static_cast<std::int64_t>(i), true};
      return Number{static_cast<double>(i), 0, false};
    }
  }
  std::variant<std::monostate, bool, Number, std::string, Array, Object> v_;
};

// Parses `text` (one JSON value, surrounded only by whitespace) into `*out`. On error `*out` is
// unchanged and the message reads e.g. "line 3, column 14: syntax error while parsing object -
// unexpected ']'; expected ',' or '}'" (nlohmann-json's wording after the position).
Status parse_json(std::string_view text, Json* out);

// Typed access to a member of an object. `where` names the object for messages (e.g.
// "config.text_config"); the message then names the key path "config.text_config.num_experts".
// Errors: `obj` is not an object, the key is missing, or the value has another type.
// get_int accepts integers and integral doubles within int64's range; get_double any number.
Status get_int(const Json& obj, std::string_view key, std::int64_t* out, std::string_view where = {});
Status get_double(const Json& obj, std::string_view key, double* out, std::string_view where = {});
Status get_bool(const Json& obj, std::string_view key, bool* out, std::string_view where = {});
Status get_string(const Json& obj, std::string_view key, std::string* out, std::string_view where = {});
Status get_array(const Json& obj, std::string_view key, const Json** out, std::string_view where = {});
Status get_object(const Json& obj, std::string_view key, const Json** out, std::string_view where = {});

// Optional members: a missing key (or a null value) gives `default_value`; an error only when the
// key is present with the wrong type.
Status get_int_or(const Json& obj, std::string_view key, std::int64_t default_value, std::int64_t* out,
                  std::string_view where = {});
Status get_double_or(const Json& obj, std::string_view key, double default_value, double* out,
                     std::string_view where = {});
Status get_bool_or(const Json& obj, std::string_view key, bool default_value, bool* out, std::string_view where = {});
Status get_string_or(const Json& obj, std::string_view key, std::string_view default_value, std::string* out,
                     std::string_view where = {});

// Converts a value (not a member) with the same rules and messages; `path` names it.
Status as_int(const Json& value, std::string_view path, std::int64_t* out);

}  // namespace moe::io
