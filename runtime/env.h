// Environment variables: every MOEJIT_* setting is read through env_value<T>(), so parsing and
// the error for a malformed value are the same everywhere.
//
//   env_value<std::string>("MOEJIT_CACHE_DIR")     -> the text, or nullopt when unset or empty
//   env_value<bool>("MOEJIT_JIT")                  -> 1/0, on/off, true/false, yes/no
//   env_value<ByteCount>("MOEJIT_CACHE_MAX_BYTES") -> "1073741824", "512M", "4G" (powers of 1024)
//   env_value<double>("MOEJIT_CACHE_LOCK_TIMEOUT_S")
// A value that does not parse throws Error(InvalidArgument) naming the variable, the value and
// the accepted forms.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace moejit::runtime {

struct ByteCount {
  uint64_t bytes = 0;
};

template <class T>
std::optional<T> env_value(const char* name);

template <>
std::optional<std::string> env_value<std::string>(const char* name);
template <>
std::optional<bool> env_value<bool>(const char* name);
template <>
std::optional<ByteCount> env_value<ByteCount>(const char* name);
template <>
std::optional<double> env_value<double>(const char* name);

// The parsers behind env_value (what names the variable in errors).
bool parse_bool(const std::string& text, const char* what);
uint64_t parse_byte_count(const std::string& text, const char* what);

}  // namespace moejit::runtime
