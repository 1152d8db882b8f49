// moe::io::Json: parse/dump round trips, escapes, numbers, the index of large objects, every parse
// error with its position, and the typed accessors' messages.
#include "moe/io/json.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>

namespace {

using moe::Status;
using moe::StatusCode;
using moe::io::Json;
using moe::io::parse_json;

Json parse_ok(std::string_view text) {
  Json v;
  const Status s = parse_json(text, &v);
  EXPECT_TRUE(s.is_ok()) << "input: " << text << "\n" << s.to_string();
  return v;
}

// Expects a parse error whose message is exactly `message` (after "invalid argument: ").
void expect_parse_error(std::string_view text, const std::string& message) {
  Json v = Json("untouched");
  const Status s = parse_json(text, &v);
  ASSERT_FALSE(s.is_ok()) << "accepted: " << text;
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), message) << "input: " << text;
  EXPECT_EQ(v, Json("untouched")) << "output written on error";
}

void expect_round_trip(std::string_view text) {
  const Json a = parse_ok(text);
  const std::string dumped = a.dump();
  const Json b = parse_ok(dumped);
  EXPECT_EQ(a, b) << text << " -> " << dumped;
  EXPECT_EQ(b.dump(), dumped);  // dump is a fixed point
}

// ---------------------------------------------------------------------------------------------
// Values and round trips

TEST(Json, ParsesEveryType) {
  const Json v = parse_ok(R"( {"n": null, "t": true, "f": false, "i": 42, "d": 2.5, "s": "x", "a": [1, [2]], "o": {}} )");
  ASSERT_TRUE(v.is_object());
  ASSERT_EQ(v.size(), 8u);
  EXPECT_TRUE(v.find("n")->is_null());
  EXPECT_TRUE(v.find("t")->as_bool());
  EXPECT_FALSE(v.find("f")->as_bool());
  EXPECT_TRUE(v.find("i")->is_integer());
  EXPECT_EQ(v.find("i")->as_int(), 42);
  EXPECT_FALSE(v.find("d")->is_integer());
  EXPECT_EQ(v.find("d")->as_double(), 2.5);
  EXPECT_EQ(v.find("s")->as_string(), "x");
  EXPECT_EQ(v.find("a")->size(), 2u);
  EXPECT_EQ((*v.find("a"))[1][0].as_int(), 2);
  EXPECT_TRUE(v.find("o")->is_object());
  EXPECT_EQ(v.find("o")->size(), 0u);
  EXPECT_EQ(v.find("missing"), nullptr);
  EXPECT_EQ(Json(3).find("x"), nullptr);
}

TEST(Json, KeepsKeyOrder) {
  const Json v = parse_ok(R"({"zeta": 1, "alpha": 2, "mid": 3})");
  ASSERT_EQ(v.members().size(), 3u);
  EXPECT_EQ(v.members()[0].first, "zeta");
  EXPECT_EQ(v.members()[1].first, "alpha");
  EXPECT_EQ(v.members()[2].first, "mid");
  EXPECT_EQ(v.dump(), R"({"zeta":1,"alpha":2,"mid":3})");
}

TEST(Json, DumpIsCompact) {
  EXPECT_EQ(parse_ok(" [ 1 , { \"a\" : [ ] , \"b\" : { } } , \"s\" , null , true , false ] ").dump(),
            R"([1,{"a":[],"b":{}},"s",null,true,false])");
  EXPECT_EQ(Json().dump(), "null");
  EXPECT_EQ(Json::array().dump(), "[]");
  EXPECT_EQ(Json::object().dump(), "{}");
}

TEST(Json, RoundTrips) {
  for (const char* text : {
           "null", "true", "false", "0", "-1", "123456789012345", "9223372036854775807", "-9223372036854775808",
           "1.5", "-0.25", "1e300", "2.2250738585072014e-308", "4.9e-324", "0.1", "1.7976931348623157e308",
           "-0", "-0.0", "1.0", "100.0", "1e2", "18446744073709551616", R"("")", R"("a\"b\\c\/d")",
           R"("\b\f\n\r\t\u0001\u001f\u007f")", R"("\u00e9\u20ac\ud83d\ude00")", "\"caf\xc3\xa9 \xe2\x82\xac\"",
           R"("\u0000x")", "[]", "{}", "[[[[]]]]", R"({"a":{"b":{"c":[1,2.5,"x",null,true]}}})",
           R"({"":0,"k":[{},[]]})",
       }) {
    expect_round_trip(text);
  }
}

TEST(Json, BuildAndDump) {
  Json o = Json::object();
  o.set("name", "w13");
  o.set("shape", Json(Json::Array{Json(128), Json(1536), Json(2048)}));
  o.set("scale", 0.5);
  o.set("ok", true);
  o.set("none", nullptr);
  o.set("name", "w2");  // replaces, keeps position
  Json a;
  a.push_back(Json(std::uint64_t{7}));
  a.push_back(Json(std::string("s")));
  o.set("list", a);
  EXPECT_EQ(o.dump(), R"({"name":"w2","shape":[128,1536,2048],"scale":0.5,"ok":true,"none":null,"list":[7,"s"]})");
  EXPECT_EQ(parse_ok(o.dump()), o);
  // A uint64 beyond int64 becomes a double; an integral double keeps ".0" so it stays one.
  EXPECT_FALSE(Json(std::numeric_limits<std::uint64_t>::max()).is_integer());
  EXPECT_EQ(Json(3.0).dump(), "3.0");
  EXPECT_FALSE(parse_ok(Json(3.0).dump()).is_integer());
  // Not representable in JSON: written as null.
  EXPECT_EQ(Json(std::numeric_limits<double>::infinity()).dump(), "null");
}

// Objects of 10^5 keys: every key found, through the index. Parsing and looking up all of them
// takes about 0.1 s here (a linear find made the lookups 12 s, n²); no time is asserted, the
// index is what the test checks.
TEST(Json, LargeObject) {
  constexpr int kKeys = 100000;
  std::string text = "{";
  for (int i = 0; i < kKeys; ++i) text += (i == 0 ? "\"k" : ",\"k") + std::to_string(i) + "\":" + std::to_string(i);
  text += "}";
  const Json v = parse_ok(text);
  ASSERT_EQ(v.size(), static_cast<std::size_t>(kKeys));
  for (int i = 0; i < kKeys; ++i) {
    const Json* found = v.find("k" + std::to_string(i));
    ASSERT_NE(found, nullptr) << i;
    ASSERT_EQ(found->as_int(), i);
  }
  EXPECT_EQ(v.find("k"), nullptr);
  EXPECT_EQ(v.find("k100000"), nullptr);
  EXPECT_EQ(v.find("k-1"), nullptr);
  EXPECT_EQ(v.members()[0].first, "k0");  // order kept
  EXPECT_EQ(v.members().back().first, "k99999");
  EXPECT_EQ(v.dump(), text);

  // A duplicate deep in it is found by the index too.
  text.back() = ',';
  expect_parse_error(text + "\"k77777\":0}",
                     "line 1, column " + std::to_string(text.size() + 1) + ": duplicate key \"k77777\" in object");
}

// Objects built in code keep the index right through set, emplace_back and copies.
TEST(Json, ObjectIndex) {
  for (const int n : {3, 15, 16, 17, 1000}) {  // below, at and above the size that starts an index
    Json o = Json::object();
    for (int i = 0; i < n; ++i) o.set("k" + std::to_string(i), i);
    ASSERT_EQ(o.size(), static_cast<std::size_t>(n));
    o.set("k0", "first");  // replaces in place
    o.members().emplace_back("k" + std::to_string(n - 1), "second of that name");
    EXPECT_EQ(o.size(), static_cast<std::size_t>(n + 1));
    EXPECT_EQ(o.find("k0")->as_string(), "first");
    EXPECT_EQ(o.find("k" + std::to_string(n - 1))->as_int(), n - 1) << "the first of a name wins";
    EXPECT_EQ(o.members()[0].second.as_string(), "first");
    EXPECT_EQ(o.members().back().second.as_string(), "second of that name");

    Json copy = o;
    o.set("k1", "changed");
    o.set("new", true);
    EXPECT_EQ(copy.find("k1")->as_int(), 1) << n;
    EXPECT_EQ(copy.find("new"), nullptr);
    EXPECT_EQ(o.find("k1")->as_string(), "changed");
    EXPECT_TRUE(o.find("new")->as_bool());
    copy = o;
    EXPECT_EQ(copy, o);
    EXPECT_TRUE(copy.find("new")->as_bool());
    Json moved = std::move(copy);
    EXPECT_EQ(moved.find("k1")->as_string(), "changed");
    *moved.find("k2") = Json(-2);  // values change in place
    EXPECT_EQ(moved.find("k2")->as_int(), -2);
    EXPECT_NE(moved, o);
  }
  // Self-assignment and assigning a member's copy to its own object.
  Json o = parse_ok(R"({"a": {"b": 1}, "c": 2})");
  Json& self = o;
  o = self;
  EXPECT_EQ(o.dump(), R"({"a":{"b":1},"c":2})");
  o = *o.find("a");
  EXPECT_EQ(o.dump(), R"({"b":1})");
}

// ---------------------------------------------------------------------------------------------
// Strings

TEST(Json, StringEscapes) {
  EXPECT_EQ(parse_ok(R"("\"\\\/\b\f\n\r\t")").as_string(), "\"\\/\b\f\n\r\t");
  EXPECT_EQ(parse_ok(R"("\u0041\u00e9\u00E9")").as_string(), "A\xc3\xa9\xc3\xa9");
  EXPECT_EQ(parse_ok(R"("\u20ac")").as_string(), "\xe2\x82\xac");
  EXPECT_EQ(parse_ok(R"("\uffff")").as_string(), "\xef\xbf\xbf");
  // Surrogate pairs: U+1F600 and the extremes U+10000 and U+10FFFF.
  EXPECT_EQ(parse_ok(R"("\ud83d\ude00")").as_string(), "\xf0\x9f\x98\x80");
  EXPECT_EQ(parse_ok(R"("\uD800\uDC00")").as_string(), "\xf0\x90\x80\x80");
  EXPECT_EQ(parse_ok(R"("\udbff\udfff")").as_string(), "\xf4\x8f\xbf\xbf");
  // NUL is kept.
  const std::string nul = parse_ok(R"("a\u0000b")").as_string();
  EXPECT_EQ(nul, std::string("a\0b", 3));
  // Raw UTF-8 passes through.
  EXPECT_EQ(parse_ok("\"\xe4\xb8\xad\xf0\x9f\x98\x80\"").as_string(), "\xe4\xb8\xad\xf0\x9f\x98\x80");
}

TEST(Json, DumpEscapes) {
  EXPECT_EQ(Json(std::string("q\"b\\n\n\t\x01\x1f/")).dump(), R"("q\"b\\n\n\t\u0001\u001f/")");
  EXPECT_EQ(Json(std::string("a\0b", 3)).dump(), R"("a\u0000b")");
  EXPECT_EQ(Json("\xe2\x82\xac").dump(), "\"\xe2\x82\xac\"");  // non-ASCII stays raw UTF-8
  // Invalid UTF-8 in a value built in code is written as U+FFFD, so the output stays valid.
  EXPECT_EQ(Json("a\xff" "b\xc3").dump(), R"("a\ufffdb\ufffd")");
  Json back;
  ASSERT_TRUE(parse_json(Json("\xc0\x80").dump(), &back).is_ok());
  EXPECT_EQ(back.as_string(), "\xef\xbf\xbd\xef\xbf\xbd");
}

// ---------------------------------------------------------------------------------------------
// Numbers

TEST(Json, Integers) {
  EXPECT_EQ(parse_ok("0").as_int(), 0);
  EXPECT_EQ(parse_ok("-7").as_int(), -7);
  const Json max = parse_ok("9223372036854775807");
  EXPECT_TRUE(max.is_integer());
  EXPECT_EQ(max.as_int(), std::numeric_limits<std::int64_t>::max());
  EXPECT_EQ(max.dump(), "9223372036854775807");
  const Json min = parse_ok("-9223372036854775808");
  EXPECT_TRUE(min.is_integer());
  EXPECT_EQ(min.as_int(), std::numeric_limits<std::int64_t>::min());
  // 2^53 + 1 is exact as an integer (a double would round it).
  EXPECT_EQ(parse_ok("9007199254740993").as_int(), 9007199254740993);
  // Beyond int64: a double.
  const Json big = parse_ok("9223372036854775808");
  EXPECT_FALSE(big.is_integer());
  EXPECT_EQ(big.as_double(), 9223372036854775808.0);
  EXPECT_FALSE(parse_ok("-9223372036854775809").is_integer());
}

// Every integer without fraction or exponent that fits keeps its exact int64 value, however deep;
// one just outside the range is a double (the nearest), as are unsigned 64-bit values above it.
TEST(Json, Int64Extremes) {
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  constexpr std::int64_t kMin = std::numeric_limits<std::int64_t>::min();
  const Json v = parse_ok(R"({"max": 9223372036854775807, "max1": 9223372036854775806, "min": -9223372036854775808,
                             "min1": -9223372036854775807, "a": [[-1, 0, 1, 4294967298, -4294967298]]})");
  std::int64_t i = 0;
  ASSERT_TRUE(get_int(v, "max", &i).is_ok());
  EXPECT_EQ(i, kMax);
  ASSERT_TRUE(get_int(v, "max1", &i).is_ok());
  EXPECT_EQ(i, kMax - 1);
  ASSERT_TRUE(get_int(v, "min", &i).is_ok());
  EXPECT_EQ(i, kMin);
  ASSERT_TRUE(get_int(v, "min1", &i).is_ok());
  EXPECT_EQ(i, kMin + 1);
  const Json& a = (*v.find("a"))[0];
  EXPECT_EQ(a[0].as_int(), -1);
  EXPECT_EQ(a[2].as_int(), 1);
  EXPECT_EQ(a[3].as_int(), 4294967298);
  EXPECT_EQ(a[4].as_int(), -4294967298);
  for (std::size_t k = 0; k < a.size(); ++k) EXPECT_TRUE(a[k].is_integer()) << k;
  EXPECT_EQ(v.dump(), R"({"max":9223372036854775807,"max1":9223372036854775806,"min":-9223372036854775808,)"
                      R"("min1":-9223372036854775807,"a":[[-1,0,1,4294967298,-4294967298]]})");

  // Outside int64 (nlohmann reads these as unsigned or, past 64 bits, as doubles): the nearest
  // double. Those from 2^63 up are beyond what get_int accepts.
  for (const char* text : {"9223372036854775808", "18446744073709551615", "18446744073709551616",
                           "-9223372036854775809", "100000000000000000000000"}) {
    const Json big = parse_ok(text);
    EXPECT_TRUE(big.is_number()) << text;
    EXPECT_FALSE(big.is_integer()) << text;
    EXPECT_EQ(big.as_double(), std::strtod(text, nullptr)) << text;
    if (text[0] != '-') {
      EXPECT_FALSE(moe::io::as_int(big, "n", &i).is_ok()) << text;
    }
  }
  EXPECT_EQ(parse_ok("18446744073709551615").dump(), "18446744073709551616.0");
  EXPECT_EQ(parse_ok("9223372036854775808").dump(), "9223372036854775808.0");
  EXPECT_EQ(parse_ok("-9223372036854775809").dump(), "-9223372036854775808.0");
  EXPECT_EQ(moe::io::as_int(parse_ok("18446744073709551615"), "n", &i).message(),
            "n: expected an integer, got number 18446744073709551616.0");
}

TEST(Json, DoublesAndExponents) {
  EXPECT_EQ(parse_ok("1e3").as_double(), 1000.0);
  EXPECT_FALSE(parse_ok("1e3").is_integer());
  EXPECT_EQ(parse_ok("1E+3").as_double(), 1000.0);
  EXPECT_EQ(parse_ok("25e-1").as_double(), 2.5);
  EXPECT_EQ(parse_ok("-1.5e-3").as_double(), -0.0015);
  EXPECT_EQ(parse_ok("0.1").as_double(), 0.1);
  EXPECT_EQ(parse_ok("1.7976931348623157e308").as_double(), std::numeric_limits<double>::max());
  EXPECT_EQ(parse_ok("4.9e-324").as_double(), std::numeric_limits<double>::denorm_min());
  // Underflow rounds to zero; overflow is an error.
  EXPECT_EQ(parse_ok("1e-400").as_double(), 0.0);
  expect_parse_error("1e400", "line 1, column 1: number 1e400 is out of the range of a double");
  expect_parse_error("[0, -2e999]", "line 1, column 5: number -2e999 is out of the range of a double");
  EXPECT_EQ(parse_ok("2.5").dump(), "2.5");
  EXPECT_EQ(parse_ok("1e300").dump(), "1e+300");
  EXPECT_EQ(parse_ok("1e2").dump(), "100.0");
}

TEST(Json, NegativeZero) {
  for (const char* text : {"-0", "-0.0", "-0e5"}) {
    const Json z = parse_ok(text);
    EXPECT_FALSE(z.is_integer()) << text;
    EXPECT_EQ(z.as_double(), 0.0);
    EXPECT_TRUE(std::signbit(z.as_double())) << text;
    EXPECT_EQ(z.dump(), "-0.0");
  }
  EXPECT_TRUE(parse_ok("0").is_integer());
  EXPECT_FALSE(std::signbit(parse_ok("0.0").as_double()));
  EXPECT_NE(parse_ok("-0.0"), parse_ok("0.0"));
}

// ---------------------------------------------------------------------------------------------
// Parse errors: each with its line and column. After the position the wording is nlohmann-json's
// (its syntax and lexer errors) except for "got ..." and our own checks (duplicate keys, depth,
// numbers out of range, byte order mark, NUL bytes).

// nlohmann's contexts, and its name for "a value".
const std::string kValue = "syntax error while parsing value - ";
const std::string kArray = "syntax error while parsing array - ";
const std::string kObject = "syntax error while parsing object - ";
const std::string kKey = "syntax error while parsing object key - ";
const std::string kSeparator = "syntax error while parsing object separator - ";
const std::string kString = kValue + "invalid string: ";
const std::string kExpectedValue = "expected '[', '{', or a literal";

TEST(JsonErrors, Structure) {
  expect_parse_error("", "line 1, column 1: " + kValue + "unexpected end of input; " + kExpectedValue);
  expect_parse_error("   \n  ", "line 2, column 3: " + kValue + "unexpected end of input; " + kExpectedValue);
  expect_parse_error("{\n  \"a\": 1,\n  \"b\": 2 ]",
                     "line 3, column 10: " + kObject + "unexpected ']'; expected ',' or '}'");
  expect_parse_error("{\"a\": 1", "line 1, column 8: " + kObject + "unexpected end of input; expected ',' or '}'");
  expect_parse_error("{\"a\" 1}", "line 1, column 6: " + kSeparator + "unexpected number literal; expected ':'");
  expect_parse_error("{1: 2}", "line 1, column 2: " + kKey + "unexpected number literal; expected string literal");
  expect_parse_error("{\"a\": 1,}", "line 1, column 9: " + kKey + "unexpected '}'; expected string literal");
  expect_parse_error("{\"a\":}", "line 1, column 6: " + kValue + "unexpected '}'; " + kExpectedValue);
  expect_parse_error("{", "line 1, column 2: " + kKey + "unexpected end of input; expected string literal");
  expect_parse_error("{\"a\": 1, \"a\": 2}", "line 1, column 10: duplicate key \"a\" in object");
  {
    std::string many = "{";  // large objects check duplicates through their index
    for (int i = 0; i < 40; ++i) many += "\"k" + std::to_string(i) + "\":" + std::to_string(i) + ",";
    EXPECT_EQ(parse_ok(many + "\"last\":0}").size(), 41u);
    expect_parse_error(many + "\"k3\":0}",
                       "line 1, column " + std::to_string(many.size() + 1) + ": duplicate key \"k3\" in object");
    expect_parse_error(many.substr(0, 71) + "\"k0\":0}", "line 1, column 72: duplicate key \"k0\" in object");
  }
  expect_parse_error("[1 2]", "line 1, column 4: " + kArray + "unexpected number literal; expected ',' or ']'");
  expect_parse_error("[1,]", "line 1, column 4: " + kValue + "unexpected ']'; " + kExpectedValue);
  expect_parse_error("[1,\n\n   ,2]", "line 3, column 4: " + kValue + "unexpected ','; " + kExpectedValue);
  expect_parse_error("[", "line 1, column 2: " + kValue + "unexpected end of input; " + kExpectedValue);
  expect_parse_error("[1", "line 1, column 3: " + kArray + "unexpected end of input; expected ',' or ']'");
  expect_parse_error("]", "line 1, column 1: " + kValue + "unexpected ']'; " + kExpectedValue);
  expect_parse_error("'a'", "line 1, column 1: " + kValue + "invalid literal; got '''");
  // A byte order mark is refused (nlohmann would skip it), as Python's json.loads does.
  expect_parse_error("\xef\xbb\xbf{}", "line 1, column 1: " + kValue + "unexpected byte order mark; " + kExpectedValue);
  expect_parse_error("\xef{}", "line 1, column 1: " + kValue + "unexpected byte 0xef; " + kExpectedValue);
  expect_parse_error(" \xef\xbb\xbf{}", "line 1, column 2: " + kValue + "invalid literal; got U+FEFF");
}

TEST(JsonErrors, DuplicateKeys) {
  // Named and placed at the second key's opening quote, in any object however deep.
  expect_parse_error(R"({"x": {"a": 1, "b": 2, "a": 3}})", "line 1, column 24: duplicate key \"a\" in object");
  expect_parse_error("[{},\n {\"a\": [], \"a\": {}}]", "line 2, column 12: duplicate key \"a\" in object");
  // Keys compare decoded: an escape and the character itself are the same key.
  expect_parse_error(R"({"a": 1, "\u0061": 2})", "line 1, column 10: duplicate key \"a\" in object");
  expect_parse_error(R"({"\"q\\": 1, "\"q\\": 2})", "line 1, column 14: duplicate key \"\\\"q\\\\\" in object");
  // Long keys are cut in the message.
  const std::string key(100, 'k');
  expect_parse_error("{\"" + key + "\":1,\"" + key + "\":2}",
                     "line 1, column 107: duplicate key \"" + std::string(36, 'k') + "... in object");
  // The same key in different objects, or differing only in case, is fine.
  EXPECT_EQ(parse_ok(R"({"a": {"a": 1}, "b": [{"a": 2}, {"a": 3}], "A": 4})").size(), 3u);
}

TEST(JsonErrors, TrailingGarbage) {
  expect_parse_error("1 2", "line 1, column 3: " + kValue + "unexpected number literal; expected end of input");
  expect_parse_error("{} x", "line 1, column 4: " + kValue + "invalid literal; got 'x'; expected end of input");
  expect_parse_error("[]]", "line 1, column 3: " + kValue + "unexpected ']'; expected end of input");
  expect_parse_error("null\n\n  ,", "line 3, column 3: " + kValue + "unexpected ','; expected end of input");
  // nlohmann stops at a NUL byte as at the end of a C string; the text goes on after it here.
  expect_parse_error(std::string_view("0\0", 2),
                     "line 1, column 2: " + kValue + "unexpected byte 0x00; expected end of input");
  expect_parse_error(std::string_view("{}\0{}", 5),
                     "line 1, column 3: " + kValue + "unexpected byte 0x00; expected end of input");
  expect_parse_error(std::string_view("[1,\0 2]", 7),
                     "line 1, column 4: " + kValue + "unexpected byte 0x00; " + kExpectedValue);
  expect_parse_error(
      std::string_view("\"a\0\"", 4),
      "line 1, column 3: " + kString + "control character U+0000 (NUL) must be escaped to \\u0000; got byte 0x00");
  parse_ok(" \t\r\n{} \t\r\n");  // whitespace is fine
}

TEST(JsonErrors, Literals) {
  expect_parse_error("tru", "line 1, column 4: " + kValue + "invalid literal; got end of input");
  expect_parse_error("trUe", "line 1, column 3: " + kValue + "invalid literal; got 'U'");
  expect_parse_error("[fals]", "line 1, column 6: " + kValue + "invalid literal; got ']'");
  expect_parse_error("nul", "line 1, column 4: " + kValue + "invalid literal; got end of input");
  expect_parse_error("[null, nan]", "line 1, column 9: " + kValue + "invalid literal; got 'a'");
  expect_parse_error("truex", "line 1, column 5: " + kValue + "invalid literal; got 'x'; expected end of input");
  expect_parse_error("Infinity", "line 1, column 1: " + kValue + "invalid literal; got 'I'");
  expect_parse_error("[\xc3\xa9]", "line 1, column 2: " + kValue + "invalid literal; got U+00E9");  // by number
}

TEST(JsonErrors, Numbers) {
  // A leading zero is a whole number, and the digits after it another.
  expect_parse_error("01", "line 1, column 2: " + kValue + "unexpected number literal; expected end of input");
  expect_parse_error("-01", "line 1, column 3: " + kValue + "unexpected number literal; expected end of input");
  expect_parse_error("[01]", "line 1, column 3: " + kArray + "unexpected number literal; expected ',' or ']'");
  expect_parse_error("-", "line 1, column 2: " + kValue + "invalid number; expected digit after '-'; got end of input");
  expect_parse_error("-x", "line 1, column 2: " + kValue + "invalid number; expected digit after '-'; got 'x'");
  expect_parse_error("1.",
                     "line 1, column 3: " + kValue + "invalid number; expected digit after '.'; got end of input");
  expect_parse_error("1.e5", "line 1, column 3: " + kValue + "invalid number; expected digit after '.'; got 'e'");
  expect_parse_error(".5", "line 1, column 1: " + kValue + "invalid literal; got '.'");
  expect_parse_error("1e", "line 1, column 3: " + kValue +
                               "invalid number; expected '+', '-', or digit after exponent; got end of input");
  expect_parse_error(
      "1e+", "line 1, column 4: " + kValue + "invalid number; expected digit after exponent sign; got end of input");
  expect_parse_error("[1E-x]",
                     "line 1, column 5: " + kValue + "invalid number; expected digit after exponent sign; got 'x'");
  expect_parse_error("+1", "line 1, column 1: " + kValue + "invalid literal; got '+'");
  expect_parse_error("0x10", "line 1, column 2: " + kValue + "invalid literal; got 'x'; expected end of input");
  // Out of a double's range: the number is named, at most 40 characters of it.
  expect_parse_error(std::string(400, '1'),
                     "line 1, column 1: number " + std::string(37, '1') + "... is out of the range of a double");
}

TEST(JsonErrors, Strings) {
  expect_parse_error("\"abc", "line 1, column 5: " + kString + "missing closing quote; got end of input");
  expect_parse_error("[1,\n \"abc", "line 2, column 6: " + kString + "missing closing quote; got end of input");
  expect_parse_error("\"a\nb\"", "line 1, column 3: " + kString +
                                     "control character U+000A (LF) must be escaped to \\u000A or \\n; got a newline");
  expect_parse_error("\"a\tb\"", "line 1, column 3: " + kString +
                                     "control character U+0009 (HT) must be escaped to \\u0009 or \\t; got a tab");
  expect_parse_error("\"\x01\"", "line 1, column 2: " + kString +
                                     "control character U+0001 (SOH) must be escaped to \\u0001; got byte 0x01");
  expect_parse_error(R"("\x")", "line 1, column 3: " + kString + "forbidden character after backslash; got 'x'");
  expect_parse_error(R"("\')", "line 1, column 3: " + kString + "forbidden character after backslash; got '''");
  expect_parse_error("\"\\", "line 1, column 3: " + kString + "forbidden character after backslash; got end of input");
  expect_parse_error(R"("\u12G4")", "line 1, column 6: " + kString + "'\\u' must be followed by 4 hex digits; got 'G'");
  expect_parse_error(R"("\u12")", "line 1, column 6: " + kString + "'\\u' must be followed by 4 hex digits; got '\"'");
  expect_parse_error("\"\\u1",
                     "line 1, column 5: " + kString + "'\\u' must be followed by 4 hex digits; got end of input");
  // Short however long the string (nlohmann's own message quotes all of it).
  expect_parse_error("\"" + std::string(100000, 'a'),
                     "line 1, column 100002: " + kString + "missing closing quote; got end of input");
}

TEST(JsonErrors, Surrogates) {
  // At the escape's last hex digit, where nlohmann sees the problem.
  const std::string follow = kString + "surrogate U+DC00..U+DFFF must follow U+D800..U+DBFF";
  const std::string followed = kString + "surrogate U+D800..U+DBFF must be followed by U+DC00..U+DFFF";
  expect_parse_error(R"("\udc00")", "line 1, column 7: " + follow);
  expect_parse_error(R"("x\ud800")", "line 1, column 9: " + followed);
  expect_parse_error(R"("\ud800x")", "line 1, column 8: " + followed);
  expect_parse_error(R"("\ud800\n")", "line 1, column 9: " + followed);
  expect_parse_error(R"("\ud800\u0041")", "line 1, column 13: " + followed);
  expect_parse_error(R"("\ud800\ud800")", "line 1, column 13: " + followed);
  expect_parse_error(R"("\ud800\u00)",
                     "line 1, column 12: " + kString + "'\\u' must be followed by 4 hex digits; got end of input");
}

TEST(JsonErrors, InvalidUtf8) {
  // At the first byte of the broken sequence, naming its bytes up to the one that broke it.
  const std::string bad = kString + "ill-formed UTF-8 byte; got ";
  expect_parse_error("\"\xff\"", "line 1, column 2: " + bad + "byte 0xff");
  expect_parse_error("\"\x80\"", "line 1, column 2: " + bad + "byte 0x80");
  expect_parse_error("\"\xc0\x80\"", "line 1, column 2: " + bad + "byte 0xc0");                // overlong NUL
  expect_parse_error("\"\xe0\x80\x80\"", "line 1, column 2: " + bad + "bytes 0xe0 0x80");      // overlong
  expect_parse_error("\"\xed\xa0\x80\"", "line 1, column 2: " + bad + "bytes 0xed 0xa0");      // surrogate
  expect_parse_error("\"\xf4\x90\x80\x80\"", "line 1, column 2: " + bad + "bytes 0xf4 0x90");  // > U+10FFFF
  expect_parse_error("\"\xc3\"", "line 1, column 2: " + bad + "bytes 0xc3 0x22");              // truncated
  expect_parse_error("\"\xc3", "line 1, column 2: " + bad + "byte 0xc3, then end of input");
  expect_parse_error("\"caf\xe9\"", "line 1, column 5: " + bad + "bytes 0xe9 0x22");  // Latin-1 "é"
  expect_parse_error("\"\xc3\xa9\x80\"", "line 1, column 3: " + bad + "byte 0x80");   // after a whole "é"
}

TEST(JsonErrors, ColumnsCountCodePoints) {
  // "é" is two bytes but one column; "😀" is four bytes, one column.
  expect_parse_error("[\"\xc3\xa9\" x]",
                     "line 1, column 6: " + kArray + "invalid literal; got 'x'; expected ',' or ']'");
  expect_parse_error("{\"\xf0\x9f\x98\x80\": 1,\n\"\xc3\xa9\" 2}",
                     "line 2, column 5: " + kSeparator + "unexpected number literal; expected ':'");
}

TEST(JsonErrors, DepthLimit) {
  const int limit = moe::io::kMaxJsonDepth;
  std::string ok = std::string(limit, '[') + std::string(limit, ']');
  EXPECT_EQ(parse_ok(ok).dump(), ok);
  std::string objects;
  for (int i = 0; i < limit; ++i) objects += "{\"a\":";
  objects += "1" + std::string(limit, '}');
  EXPECT_EQ(parse_ok(objects).dump(), objects);

  expect_parse_error(std::string(limit + 1, '[') + std::string(limit + 1, ']'),
                     "line 1, column " + std::to_string(limit + 1) + ": nesting deeper than 512 levels");
  // Far deeper input fails the same way instead of exhausting the stack.
  expect_parse_error(std::string(1000000, '['), "line 1, column 513: nesting deeper than 512 levels");
  std::string deep_objects;
  for (int i = 0; i < 100000; ++i) deep_objects += "{\"a\":";
  expect_parse_error(deep_objects, "line 1, column 2561: nesting deeper than 512 levels");
  // Arrays and objects count together; closed siblings do not.
  std::string mixed;
  for (int i = 0; i < limit / 2; ++i) mixed += "[{\"k\":";
  expect_parse_error(mixed + "[]",
                     "line 1, column " + std::to_string(limit / 2 * 6 + 1) + ": nesting deeper than 512 levels");
  const std::string siblings = "[" + std::string(limit - 1, '[') + std::string(limit - 1, ']') + "," +
                               std::string(limit - 1, '[') + std::string(limit - 1, ']') + "]";
  EXPECT_EQ(parse_ok(siblings).dump(), siblings);
  expect_parse_error("\n\n  " + std::string(limit + 1, '['), "line 3, column 515: nesting deeper than 512 levels");
}

// ---------------------------------------------------------------------------------------------
// Typed accessors

TEST(JsonAccess, Required) {
  const Json cfg = parse_ok(R"({"n": 128, "big": 9223372036854775807, "f": 3.0, "x": 2.5, "b": true, "s": "silu",
                                "a": [1], "o": {"k": 1}, "z": null})");
  std::int64_t i = 0;
  ASSERT_TRUE(get_int(cfg, "n", &i).is_ok());
  EXPECT_EQ(i, 128);
  ASSERT_TRUE(get_int(cfg, "big", &i).is_ok());
  EXPECT_EQ(i, std::numeric_limits<std::int64_t>::max());
  ASSERT_TRUE(get_int(cfg, "f", &i).is_ok());  // integral double
  EXPECT_EQ(i, 3);
  double d = 0;
  ASSERT_TRUE(get_double(cfg, "x", &d).is_ok());
  EXPECT_EQ(d, 2.5);
  ASSERT_TRUE(get_double(cfg, "n", &d).is_ok());  // integers are numbers
  EXPECT_EQ(d, 128.0);
  bool b = false;
  ASSERT_TRUE(get_bool(cfg, "b", &b).is_ok());
  EXPECT_TRUE(b);
  std::string s;
  ASSERT_TRUE(get_string(cfg, "s", &s).is_ok());
  EXPECT_EQ(s, "silu");
  const Json* a = nullptr;
  ASSERT_TRUE(get_array(cfg, "a", &a).is_ok());
  EXPECT_EQ(a->size(), 1u);
  const Json* o = nullptr;
  ASSERT_TRUE(get_object(cfg, "o", &o).is_ok());
  ASSERT_TRUE(get_int(*o, "k", &i, "config.o").is_ok());
  EXPECT_EQ(i, 1);

  i = -1;
  Status st = get_int(cfg, "x", &i);
  EXPECT_EQ(st.message(), "x: expected an integer, got number 2.5");
  EXPECT_EQ(i, -1);  // untouched
  EXPECT_EQ(get_int(cfg, "s", &i).message(), "s: expected an integer, got string \"silu\"");
  EXPECT_EQ(get_int(cfg, "missing", &i).message(), "missing required key \"missing\"");
  EXPECT_EQ(get_double(cfg, "b", &d).message(), "b: expected a number, got bool true");
  EXPECT_EQ(get_bool(cfg, "z", &b).message(), "z: expected a bool, got null");
  EXPECT_EQ(get_string(cfg, "a", &s).message(), "a: expected a string, got array");
  EXPECT_EQ(get_array(cfg, "o", &a).message(), "o: expected an array, got object");
  EXPECT_EQ(get_object(cfg, "n", &o).message(), "n: expected an object, got number 128");
  EXPECT_EQ(get_int(parse_ok("{\"v\": 1e19}"), "v", &i).message(), "v: expected an integer, got number 1e+19");
  EXPECT_EQ(get_int(cfg, "n", &i, "").code(), StatusCode::kOk);
}

TEST(JsonAccess, KeyPathInMessages) {
  const Json cfg = parse_ok(R"({"text_config": {"num_experts": "128", "long": "0123456789012345678901234567890123456789"}})");
  const Json* text = nullptr;
  ASSERT_TRUE(get_object(cfg, "text_config", &text, "config").is_ok());
  std::int64_t i = 0;
  EXPECT_EQ(get_int(*text, "num_experts", &i, "config.text_config").message(),
            "config.text_config.num_experts: expected an integer, got string \"128\"");
  EXPECT_EQ(get_int(*text, "top_k", &i, "config.text_config").message(),
            "config.text_config: missing required key \"top_k\"");
  EXPECT_EQ(get_int(*text, "long", &i, "c").message(),
            "c.long: expected an integer, got string \"012345678901234567890123456789012345...");
  EXPECT_EQ(get_int(Json(5), "k", &i, "config.x").message(),
            "config.x: expected an object, got number 5 (looking up \"k\")");
  EXPECT_EQ(get_int(Json::array(), "k", &i).message(), "value: expected an object, got array (looking up \"k\")");
}

TEST(JsonAccess, Optional) {
  const Json cfg = parse_ok(R"({"n": 8, "x": 0.5, "b": false, "s": "gelu", "z": null, "bad": "8"})");
  std::int64_t i = 0;
  ASSERT_TRUE(get_int_or(cfg, "n", 1, &i).is_ok());
  EXPECT_EQ(i, 8);
  ASSERT_TRUE(get_int_or(cfg, "absent", 3, &i).is_ok());
  EXPECT_EQ(i, 3);
  ASSERT_TRUE(get_int_or(cfg, "z", 4, &i).is_ok());  // null counts as absent
  EXPECT_EQ(i, 4);
  i = 99;
  EXPECT_EQ(get_int_or(cfg, "bad", 1, &i, "cfg").message(), "cfg.bad: expected an integer, got string \"8\"");
  EXPECT_EQ(i, 99);

  double d = 0;
  ASSERT_TRUE(get_double_or(cfg, "x", 1.0, &d).is_ok());
  EXPECT_EQ(d, 0.5);
  ASSERT_TRUE(get_double_or(cfg, "absent", 1.25, &d).is_ok());
  EXPECT_EQ(d, 1.25);
  EXPECT_EQ(get_double_or(cfg, "s", 1.0, &d).message(), "s: expected a number, got string \"gelu\"");

  bool b = true;
  ASSERT_TRUE(get_bool_or(cfg, "b", true, &b).is_ok());
  EXPECT_FALSE(b);
  ASSERT_TRUE(get_bool_or(cfg, "absent", true, &b).is_ok());
  EXPECT_TRUE(b);
  EXPECT_EQ(get_bool_or(cfg, "n", true, &b).message(), "n: expected a bool, got number 8");

  std::string s;
  ASSERT_TRUE(get_string_or(cfg, "s", "silu", &s).is_ok());
  EXPECT_EQ(s, "gelu");
  ASSERT_TRUE(get_string_or(cfg, "absent", "silu", &s).is_ok());
  EXPECT_EQ(s, "silu");
  EXPECT_EQ(get_string_or(cfg, "x", "silu", &s).message(), "x: expected a string, got number 0.5");
  EXPECT_EQ(get_string_or(Json(true), "x", "silu", &s).message(),
            "value: expected an object, got bool true (looking up \"x\")");
}

}  // namespace
