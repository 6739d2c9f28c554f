// The on-disk level of the kernel cache: a content-addressed directory shared by the processes
// of one user (layout in include/moejit/cache.h).
//
// Protocol for one key (DiskCache::get):
//   1. shared flock on locks/<key>.lock, read and verify entries/<key>.entry; valid -> done
//   2. exclusive flock, read again (another process may have published meanwhile); a bad entry
//      is moved to quarantine/; compile; publish: write entries/.tmp.<key>.<pid>.<n>, fsync,
//      rename without replacing (an existing entry counts as success), fsync the directory
//   3. a lock wait is bounded: past the timeout the waiter compiles without the lock
// Locks die with their process (flock), so a killed compile never blocks anyone; a killed
// publish leaves at most a temporary file, which is never read as an entry.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "moejit/cache.h"
#include "runtime/kernel_cache.h"

namespace moejit::runtime {

constexpr int kEntryFormatVersion = 1;
constexpr uint64_t kMaxEntryBytes = uint64_t(1) << 30;  // refuse to read anything larger

// One entry's content.
struct EntryContents {
  std::string key;       // SHA-256 of preimage, hex
  std::string kernel;    // plan kernel name (informational; not in the key)
  std::string preimage;  // key_preimage()
  std::vector<char> cubin;
  std::string log;
  double compile_ms = 0;
};

// Serialised entry:
//   moejit-cache-entry 1
//   key <hex>
//   kernel <name>
//   compile-ms <ms>
//   preimage-bytes <n>
//   cubin-bytes <n>
//   log-bytes <n>
//   cubin-sha256 <hex>
//   manifest-sha256 <hex>     over the lines above, the preimage and the log
//   <empty line>
//   <preimage><cubin><log>
// Every byte is covered by a checksum, and the sizes must add up to the file's size exactly.
std::string encode_entry(const EntryContents& e);
// Verifies everything (format, sizes, both checksums, key = SHA-256(preimage), the key expected
// from the file name when expected_key is not empty). On failure returns false and says why.
bool decode_entry(std::string_view bytes, std::string_view expected_key, EntryContents* out,
                  std::string* problem);
// A "field value" line of a preimage ("" when absent).
std::string preimage_field(std::string_view preimage, std::string_view field);

// Counters of one KernelCache (the disk level adds its events to them).
struct CacheCounters {
  std::atomic<uint64_t> memory_hits{0}, disk_hits{0}, misses{0}, compiles{0}, failed_compiles{0},
      quarantined{0}, lock_timeouts{0};
  std::atomic<uint64_t> compile_us{0}, disk_load_us{0};
  cache::Counters snapshot() const;
};

class DiskCache {
 public:
  enum class Mode { ReadWrite, ReadOnly, Off };

  // Opens dir, creating it (and missing parents) with mode 0700. Never throws for I/O: a
  // directory that cannot be used gives Mode::Off and one warning; one that cannot be written
  // gives Mode::ReadOnly (valid entries are still loaded) and one warning when a compiled kernel
  // could not be stored. An empty dir means Mode::Off without a warning.
  DiskCache(const std::string& dir, uint64_t max_bytes, double lock_timeout_s);
  ~DiskCache();  // adds this process's pending counters to DIR/stats
  DiskCache(const DiskCache&) = delete;
  DiskCache& operator=(const DiskCache&) = delete;

  Mode mode() const { return mode_.load(); }
  std::string mode_text() const;
  const std::string& dir() const { return dir_; }

  struct Request {
    std::string key;       // cache_key()
    std::string preimage;  // key_preimage()
    std::string kernel;    // for messages and the manifest
    std::string describe;  // "kernel 'gemm1_b0' (moejit_gemm1_b0, sm_90a)", for errors
    bool jit = true;       // false: a miss throws Error(Cache)
  };
  // Loads req.key or compiles and publishes it (protocol above). compile's exceptions propagate
  // and nothing is published.
  KernelBinary get(const Request& req, const std::function<KernelBinary()>& compile,
                   CacheCounters& counters);

  // Administration (moejit::cache).
  std::vector<cache::Entry> list();
  std::vector<cache::Problem> verify(bool quarantine);
  cache::PruneResult prune(uint64_t max_bytes);
  cache::PruneResult clear();
  uint64_t export_to(const std::string& file);
  cache::ImportResult import_from(const std::string& file);
  uint64_t quarantined_files(uint64_t* bytes);
  cache::Counters persisted_counters();
  void flush_counters();

  // Holds the shared lock a loader holds on key until the handle is dropped (prune leaves the
  // entry alone meanwhile).
  std::shared_ptr<void> pin(const std::string& key);

  // Test seam: called with the name of each step of get() ("missing", "locked", "compiled",
  // "temp-partial", "temp-written", "temp-synced", "published"), so a test can kill the process
  // at a chosen point or widen a race window. Not for production use.
  static void set_fault_hook_for_testing(void (*hook)(const char* step));

  // For the kernel cache's fork handlers: this object's mutex held across fork(), so that a
  // child never finds it held by a thread it does not have (its sections nest no other lock).
  void lock_for_fork() { mu_.lock(); }
  void unlock_after_fork() { mu_.unlock(); }

 private:
  enum class Read { Ok, Missing, Bad, Refused };
  struct Pending;

  std::string entry_path(const std::string& key) const;
  std::string lock_path(const std::string& key) const;
  Read read_entry(const std::string& key, EntryContents* out, std::string* problem,
                  bool touch) const;
  // 0, or the errno of the failed step (with *error saying what failed).
  int publish(const EntryContents& e, std::string* error);
  void quarantine(const std::string& key, const std::string& problem, CacheCounters* counters);
  void degrade(const std::string& why);
  void warn_once(const std::string& message);
  void note_event(const cache::Counters& delta, bool flush_now);
  // Under the directory's prune lock: waits for it up to the lock timeout (wait), or returns
  // nothing removed when another process holds it (!wait: the prune after a compile).
  cache::PruneResult remove_until(uint64_t max_bytes, bool everything, bool wait);
  KernelBinary compile_and_publish(const Request& req, const std::function<KernelBinary()>& compile,
                                   CacheCounters& counters);

  std::string dir_;
  uint64_t max_bytes_ = 0;
  double lock_timeout_s_ = 0;
  std::atomic<Mode> mode_{Mode::Off};
  std::string off_reason_;
  std::atomic<bool> warned_{false};
  mutable std::mutex mu_;  // pending_, logged_
  std::unique_ptr<Pending> pending_;
  std::set<std::string> logged_;  // messages already printed by this process
};

}  // namespace moejit::runtime
