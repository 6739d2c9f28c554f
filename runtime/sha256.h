// SHA-256 (FIPS 180-4), used for cache keys and entry checksums. Written for moejit; checked
// against the NIST test vectors in tests/cpu/test_cache.cpp.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace moejit::runtime {

class Sha256 {
 public:
  using Digest = std::array<uint8_t, 32>;

  Sha256();
  void update(const void* data, size_t bytes);
  void update(std::string_view text) { update(text.data(), text.size()); }
  // Ends the message; the object must not be updated afterwards.
  Digest finish();
  std::string finish_hex();

 private:
  void compress(const uint8_t* blocks, size_t count);

  std::array<uint32_t, 8> state_;
  std::array<uint8_t, 64> buffer_{};
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

std::string to_hex(const Sha256::Digest& digest);
// Lower-case hex SHA-256 of data.
std::string sha256_hex(std::string_view data);
std::string sha256_hex(const void* data, size_t bytes);
// True when s is exactly 64 lower-case hex digits (a key: safe to use as a file name).
bool is_sha256_hex(std::string_view s);

// Whether the x86 SHA extensions are used (detected at run time). Tests force the portable code
// to check both paths against each other.
bool sha256_uses_cpu_extensions();
void sha256_force_portable(bool on);

}  // namespace moejit::runtime
