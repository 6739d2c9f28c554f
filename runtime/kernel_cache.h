// The JIT cache seam: every compiled kernel binary is obtained through KernelCache::get().
// Level 1 is an in-memory, thread-safe map; level 2 an on-disk content-addressed store.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace moejit::runtime {

struct KernelRequest {
  std::string name;                  // plan kernel name, for messages ("gemm1_b0")
  std::string entry;                 // extern "C" symbol of the kernel
  std::string source;                // generated CUDA translation unit
  std::string arch;                  // exact arch, "sm_90a"
  std::vector<std::string> options;  // normalised NVRTC options; never holds a path
};

struct KernelBinary {
  std::vector<char> cubin;
  std::string compile_log;  // NVRTC + ptxas -v log (resource usage is parsed from it)
  double compile_ms = 0;    // 0 when served from a cache
};

using CompileFn = std::function<KernelBinary(const KernelRequest&)>;

class KernelCache {
 public:
  static KernelCache& global();
  // Returns the binary for req, calling compile at most once per key across the threads of this
  // process (and, with the disk level, across processes).
  std::shared_ptr<const KernelBinary> get(const KernelRequest& req, const CompileFn& compile);
};

}  // namespace moejit::runtime
