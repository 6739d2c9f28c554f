// The JIT cache seam: every compiled kernel binary is obtained through KernelCache::get().
//
// Level 1 is an in-memory, thread-safe map with single-flight per request: threads asking for
// one kernel at once compile it once. Level 2 is the on-disk content-addressed store
// (runtime/disk_cache.h), shared by the processes of a user through per-key file locks.
//
// The disk key is SHA-256 of a key preimage (key_preimage below) that names everything that
// changes the binary and nothing else: no absolute path, no time, no host name.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "moejit/cache.h"
#include "runtime/once_map.h"

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

// What the key hashes besides the request: constant for a process.
struct KeyContext {
  std::string moejit_version;  // moejit::version()
  int nvrtc_major = 0;         // nvrtcVersion()
  int nvrtc_minor = 0;
  std::string nvrtc_build;       // GNU build id of the loaded libnvrtc ("gnu-build-id:65be0d...")
  std::string templates_sha256;  // over the name and text of every embedded template

  // This process's context: the global kernel cache's, computed once (the first call costs
  // about 0.1 ms).
  static const KeyContext& current();
  // The same, computed afresh.
  static KeyContext build();
};

// The key preimage: one "field value" line per input, e.g.
//   moejit-kernel-key 1
//   moejit 0.1.0
//   nvrtc 13.0 gnu-build-id:65be0db342ad51a06876e71e210bccc5aa8322cf
//   templates 5d41402abc4b2a76b9719d911017c592...
//   arch sm_90a
//   entry moejit_gemm1_b0
//   option --gpu-architecture=sm_90a
//   option -std=c++17
//   source-bytes 5123
//   source-sha256 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
// The plan name is not part of it: equal sources share one entry.
// Throws Error(InvalidArgument) for a malformed arch or entry, Error(Internal) for an option
// holding a path, whitespace or a newline (options must never carry paths into the key).
std::string key_preimage(const KernelRequest& req, const KeyContext& ctx);
// 64 lower-case hex digits: SHA-256 of the preimage.
std::string cache_key(const KernelRequest& req, const KeyContext& ctx);

class DiskCache;
struct CacheCounters;

class KernelCache {
 public:
  // The process's cache: settings from the environment (read on first use), or the directory
  // given to moejit::cache::set_directory().
  static KernelCache& global();

  // A separate cache with its own memory level (tools and tests). An empty settings.directory
  // means memory only.
  explicit KernelCache(cache::Settings settings, KeyContext context = KeyContext::current());
  ~KernelCache();
  KernelCache(const KernelCache&) = delete;
  KernelCache& operator=(const KernelCache&) = delete;

  // Returns the binary for req, calling compile at most once per key across the threads of this
  // process and, through the disk level, across processes. An exception from compile (an
  // Error(Compile) with NVRTC's log) reaches every waiting caller and nothing is cached, so a
  // later call tries again. With MOEJIT_JIT=off a miss throws Error(Cache) naming the kernel.
  std::shared_ptr<const KernelBinary> get(const KernelRequest& req, const CompileFn& compile);

  std::string key(const KernelRequest& req) const { return cache_key(req, context()); }
  // The key context: the given one, or (global()) KeyContext::build() on first use, under the
  // cache's lock, which the fork handlers hold across fork(), so a child never waits for a
  // computation of a thread it does not have.
  const KeyContext& context() const;

  // Settings in force (the environment is read here on first use; throws Error(InvalidArgument)
  // for a malformed variable).
  cache::Settings settings();
  // Switches the disk level to dir (kernels already in memory stay: they are keyed by content).
  void set_directory(const std::string& dir);
  // The disk level for the current directory, opened on first use; never null.
  std::shared_ptr<DiskCache> disk();
  // This process's counters.
  cache::Counters counters() const;
  // Drops the memory level (benchmarks measure the disk level with it).
  void clear_memory();

  // pthread_atfork handlers of global(), which is built and registered when the library loads:
  // a child forked while another thread compiles drops that kernel's pending entry (no thread
  // of the child would complete it; a request in the child compiles or loads it itself) and
  // gets the locks (this cache's and its disk level's) free.
  static void before_fork();
  static void after_fork(bool child);

 private:
  KernelCache();  // global(): settings and key context computed on first use

  std::shared_ptr<const KernelBinary> fill(const KernelRequest& req, const CompileFn& compile);

  mutable std::optional<KeyContext> context_;  // (under mu_)
  mutable std::mutex mu_;
  bool settings_from_env_ = false;
  bool have_settings_ = false;
  cache::Settings settings_;
  std::shared_ptr<DiskCache> disk_;
  OnceMap<KernelBinary> memory_;  // by memory_key (its own lock)
  std::unique_ptr<CacheCounters> counters_;
};

}  // namespace moejit::runtime
