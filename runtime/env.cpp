#include "runtime/env.h"

#include <fmt/format.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>

#include "moejit/moejit.h"

namespace moejit::runtime {

namespace {

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

bool parse_bool(const std::string& text, const char* what) {
  const std::string v = lower(text);
  if (v == "1" || v == "on" || v == "true" || v == "yes") return true;
  if (v == "0" || v == "off" || v == "false" || v == "no") return false;
  throw Error(ErrorKind::InvalidArgument,
              fmt::format("{} = '{}' is not a switch; use on or off (also 1/0, true/false, yes/no)",
                          what, text));
}

uint64_t parse_byte_count(const std::string& text, const char* what) {
  const auto fail = [&] {
    return Error(ErrorKind::InvalidArgument,
                 fmt::format("{} = '{}' is not a byte count; use a whole number of bytes, "
                             "optionally with a K, M, G or T suffix (powers of 1024), e.g. 4G",
                             what, text));
  };
  size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) ++digits;
  if (digits == 0 || digits > 19) throw fail();
  uint64_t value = std::strtoull(text.substr(0, digits).c_str(), nullptr, 10);
  std::string suffix = lower(text.substr(digits));
  if (suffix.size() == 2 && suffix[1] == 'b') suffix.pop_back();  // "4GB" = "4G"
  int shift = 0;
  if (suffix.empty() || suffix == "b")
    shift = 0;
  else if (suffix == "k")
    shift = 10;
  else if (suffix == "m")
    shift = 20;
  else if (suffix == "g")
    shift = 30;
  else if (suffix == "t")
    shift = 40;
  else
    throw fail();
  if (shift > 0 && value > (UINT64_MAX >> shift)) throw fail();
  return value << shift;
}

template <>
std::optional<std::string> env_value<std::string>(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

template <>
std::optional<bool> env_value<bool>(const char* name) {
  auto text = env_value<std::string>(name);
  if (!text) return std::nullopt;
  return parse_bool(*text, name);
}

template <>
std::optional<ByteCount> env_value<ByteCount>(const char* name) {
  auto text = env_value<std::string>(name);
  if (!text) return std::nullopt;
  return ByteCount{parse_byte_count(*text, name)};
}

template <>
std::optional<double> env_value<double>(const char* name) {
  auto text = env_value<std::string>(name);
  if (!text) return std::nullopt;
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(text->c_str(), &end);
  if (errno != 0 || end == text->c_str() || *end != '\0' || !(v >= 0) || v > 1e9)
    throw Error(ErrorKind::InvalidArgument,
                fmt::format("{} = '{}' is not a non-negative number", name, *text));
  return v;
}

}  // namespace moejit::runtime
