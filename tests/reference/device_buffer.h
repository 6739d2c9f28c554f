// Device buffers and checked CUDA runtime calls for the GPU references, the GPU tests and the
// CLI. Host-only code: include from .cpp or .cu files alike.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#define CUDA_OK(expr)                                                                  \
  do {                                                                                 \
    cudaError_t e_ = (expr);                                                           \
    if (e_ != cudaSuccess)                                                             \
      throw std::runtime_error(std::string(#expr) + ": " + cudaGetErrorString(e_));    \
  } while (0)

namespace moejit::ref {

// A device allocation freed on scope exit.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes) CUDA_OK(cudaMalloc(&ptr_, bytes));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  template <class T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

  template <class V>
  static DeviceBuffer upload(const V& host) {
    DeviceBuffer b(host.size() * sizeof(host[0]));
    if (b.bytes_) CUDA_OK(cudaMemcpy(b.ptr_, host.data(), b.bytes_, cudaMemcpyHostToDevice));
    return b;
  }
  template <class T>
  std::vector<T> download() const {
    std::vector<T> out(bytes_ / sizeof(T));
    if (bytes_) CUDA_OK(cudaMemcpy(out.data(), ptr_, bytes_, cudaMemcpyDeviceToHost));
    return out;
  }
  // NaN-filled (0xFF bytes) so that an unwritten element shows (scratch, and outputs compared
  // bitwise against each other).
  void poison() const {
    if (bytes_) CUDA_OK(cudaMemset(ptr_, 0xff, bytes_));
  }
  // 0x7F bytes, for outputs checked against a reference: ~3.4e38 in float and bf16 elements (a
  // finite value, so that an unwritten element fails where the reference is NaN too, not only
  // where it is finite) and 0x7f7f7f7f in int32 ones (never -1 or an id).
  void poison_finite() const {
    if (bytes_) CUDA_OK(cudaMemset(ptr_, 0x7f, bytes_));
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace moejit::ref
