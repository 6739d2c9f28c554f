// NumPy .npy (format version 1.0) files and a JSON manifest, for `moejit check --save DIR`:
// each tensor goes to DIR/<name>.npy and DIR/manifest.json lists them with shapes, dtypes and
// the run's metadata. Written by hand (no library); little-endian hosts only.
//
// bf16 has no NumPy dtype: it is stored as its bit pattern, '<u2', and the manifest marks it
// "bfloat16". In Python: (np.load(f).astype(np.uint32) << 16).view(np.float32).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace moejit::ref {

enum class NpyType { F32, F64, I32, U8, BF16 };

const char* npy_descr(NpyType type);  // "<f4", "<f8", "<i4", "|u1", "<u2" (BF16)
size_t npy_itemsize(NpyType type);

// The complete .npy header (magic, version 1.0, length, dict, padding to a 64-byte boundary).
std::string npy_header(NpyType type, const std::vector<size_t>& shape);

// Writes `data` (product(shape) elements of `type`) to `path`. Throws std::runtime_error
// naming the path and the OS error.
void write_npy(const std::string& path, NpyType type, const void* data,
               const std::vector<size_t>& shape);

// JSON string literal of s (quotes included; ", \ and control characters escaped).
std::string json_quote(const std::string& s);

// A directory of .npy files plus manifest.json:
//   {"meta": {"spec": "...", "tokens": 64, ...},
//    "tensors": [{"name": "out", "file": "out.npy", "dtype": "bfloat16", "npy_dtype": "<u2",
//                 "shape": [64, 7168], "note": "..."}, ...]}
class NpyDir {
 public:
  explicit NpyDir(std::string dir);  // creates the directory (and parents) if missing

  void save(const std::string& name, NpyType type, const void* data,
            const std::vector<size_t>& shape, const std::string& note = "");
  template <class T>
  void save(const std::string& name, NpyType type, const std::vector<T>& v,
            const std::vector<size_t>& shape, const std::string& note = "") {
    save(name, type, static_cast<const void*>(v.data()), shape, note);
  }

  // Metadata entries (later values for the same key replace earlier ones).
  void meta(const std::string& key, const std::string& value);
  void meta(const std::string& key, const char* value) { meta(key, std::string(value)); }
  void meta(const std::string& key, double value);
  void meta(const std::string& key, long long value);
  void meta(const std::string& key, int value) { meta(key, static_cast<long long>(value)); }
  void meta(const std::string& key, bool value);

  std::string manifest_json() const;
  void write_manifest() const;  // DIR/manifest.json
  const std::string& dir() const { return dir_; }

 private:
  void set_meta(const std::string& key, std::string json_value);
  struct Entry {
    std::string name, file, dtype, npy_dtype, note;
    std::vector<size_t> shape;
  };
  std::string dir_;
  std::vector<std::pair<std::string, std::string>> meta_;  // key, JSON value
  std::vector<Entry> tensors_;
};

}  // namespace moejit::ref
