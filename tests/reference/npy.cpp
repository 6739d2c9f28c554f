#include "reference/npy.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>

#include <fmt/format.h>

namespace moejit::ref {
namespace {

bool little_endian() {
  const uint16_t one = 1;
  uint8_t b;
  std::memcpy(&b, &one, 1);
  return b == 1;
}

void write_file(const std::string& path, const std::string& head, const void* data, size_t bytes) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw std::runtime_error(fmt::format("cannot open {} for writing: {}", path, std::strerror(errno)));
  bool ok = std::fwrite(head.data(), 1, head.size(), f) == head.size();
  if (ok && bytes) ok = std::fwrite(data, 1, bytes, f) == bytes;
  const int saved = errno;
  if (std::fclose(f) != 0) ok = false;
  if (!ok) throw std::runtime_error(fmt::format("cannot write {}: {}", path, std::strerror(saved ? saved : errno)));
}

std::string shape_json(const std::vector<size_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += fmt::format("{}{}", i ? ", " : "", shape[i]);
  return s + "]";
}

}  // namespace

const char* npy_descr(NpyType t) {
  switch (t) {
    case NpyType::F32: return "<f4";
    case NpyType::F64: return "<f8";
    case NpyType::I32: return "<i4";
    case NpyType::U8: return "|u1";
    case NpyType::BF16: return "<u2";
  }
  return "?";
}

size_t npy_itemsize(NpyType t) {
  switch (t) {
    case NpyType::F32: return 4;
    case NpyType::F64: return 8;
    case NpyType::I32: return 4;
    case NpyType::U8: return 1;
    case NpyType::BF16: return 2;
  }
  return 0;
}

std::string npy_header(NpyType type, const std::vector<size_t>& shape) {
  std::string tuple = "(";
  for (size_t i = 0; i < shape.size(); ++i) tuple += fmt::format("{}{}", i ? ", " : "", shape[i]);
  if (shape.size() == 1) tuple += ",";
  tuple += ")";
  std::string dict =
      fmt::format("{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}", npy_descr(type), tuple);
  // magic (6) + version (2) + length (2) + dict + padding + '\n' is a multiple of 64.
  const size_t unpadded = 10 + dict.size() + 1;
  dict.append((64 - unpadded % 64) % 64, ' ');
  dict += '\n';
  if (dict.size() > 0xffff) throw std::runtime_error("npy header longer than 65535 bytes");
  std::string head("\x93NUMPY\x01\x00", 8);
  head += static_cast<char>(dict.size() & 0xff);
  head += static_cast<char>(dict.size() >> 8);
  return head + dict;
}

void write_npy(const std::string& path, NpyType type, const void* data, const std::vector<size_t>& shape) {
  if (!little_endian()) throw std::runtime_error("write_npy: big-endian hosts are not supported");
  size_t n = 1;
  for (size_t d : shape) n *= d;
  if (n && !data) throw std::invalid_argument("write_npy: null data for " + path);
  write_file(path, npy_header(type, shape), data, n * npy_itemsize(type));
}

std::string json_quote(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20)
          out += fmt::format("\\u{:04x}", static_cast<unsigned>(static_cast<unsigned char>(c)));
        else
          out += c;
    }
  }
  return out + "\"";
}

NpyDir::NpyDir(std::string dir) : dir_(std::move(dir)) {
  std::error_code ec;
  std::filesystem::create_directories(dir_, ec);
  if (ec) throw std::runtime_error(fmt::format("cannot create {}: {}", dir_, ec.message()));
}

void NpyDir::save(const std::string& name, NpyType type, const void* data,
                  const std::vector<size_t>& shape, const std::string& note) {
  Entry e;
  e.name = name;
  e.file = name + ".npy";
  e.dtype = type == NpyType::BF16 ? "bfloat16" : npy_descr(type);
  e.npy_dtype = npy_descr(type);
  e.shape = shape;
  e.note = type == NpyType::BF16 && note.empty() ? "bf16 bit patterns stored as <u2" : note;
  write_npy((std::filesystem::path(dir_) / e.file).string(), type, data, shape);
  for (Entry& old : tensors_)
    if (old.name == name) {
      old = e;
      return;
    }
  tensors_.push_back(e);
}

void NpyDir::set_meta(const std::string& key, std::string json_value) {
  for (auto& kv : meta_)
    if (kv.first == key) {
      kv.second = std::move(json_value);
      return;
    }
  meta_.emplace_back(key, std::move(json_value));
}

void NpyDir::meta(const std::string& key, const std::string& value) { set_meta(key, json_quote(value)); }
void NpyDir::meta(const std::string& key, long long value) { set_meta(key, std::to_string(value)); }
void NpyDir::meta(const std::string& key, bool value) { set_meta(key, value ? "true" : "false"); }
void NpyDir::meta(const std::string& key, double value) {
  // JSON has no NaN/Inf: those are written as strings.
  if (std::isnan(value)) return set_meta(key, "\"NaN\"");
  if (std::isinf(value)) return set_meta(key, value > 0 ? "\"Infinity\"" : "\"-Infinity\"");
  set_meta(key, fmt::format("{:.17g}", value));
}

std::string NpyDir::manifest_json() const {
  std::string s = "{\n  \"meta\": {";
  for (size_t i = 0; i < meta_.size(); ++i)
    s += fmt::format("{}\n    {}: {}", i ? "," : "", json_quote(meta_[i].first), meta_[i].second);
  s += meta_.empty() ? "},\n" : "\n  },\n";
  s += "  \"tensors\": [";
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const Entry& e = tensors_[i];
    s += fmt::format(
        "{}\n    {{\"name\": {}, \"file\": {}, \"dtype\": {}, \"npy_dtype\": {}, \"shape\": {}, "
        "\"note\": {}}}",
        i ? "," : "", json_quote(e.name), json_quote(e.file), json_quote(e.dtype),
        json_quote(e.npy_dtype), shape_json(e.shape), json_quote(e.note));
  }
  s += tensors_.empty() ? "]\n}\n" : "\n  ]\n}\n";
  return s;
}

void NpyDir::write_manifest() const {
  const std::string json = manifest_json();
  write_file((std::filesystem::path(dir_) / "manifest.json").string(), json, nullptr, 0);
}

}  // namespace moejit::ref
