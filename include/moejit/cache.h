// moejit's kernel cache: administration (the `moejit cache` commands) and settings.
//
// Compiled kernels are kept in memory for the process and in a content-addressed directory
// shared by the user's processes:
//   DIR/entries/<key>.entry   one kernel: manifest (format, key preimage, sizes, checksums) + CUBIN
//   DIR/locks/<key>.lock      flock'ed while a process compiles (exclusive) or loads (shared)
//   DIR/quarantine/           entries that failed verification, kept for inspection
//   DIR/stats                 counters summed over all processes (advisory)
// DIR is private (0700). Entries are published atomically and verified on every load; a bad
// entry is quarantined and recompiled, never loaded.
//
// Environment (read once, on first use):
//   MOEJIT_CACHE_DIR            the directory (default $XDG_CACHE_HOME/moejit, else
//                               $HOME/.cache/moejit)
//   MOEJIT_CACHE_MAX_BYTES      bound on DIR's size, e.g. 4G; least recently used entries go first
//   MOEJIT_JIT=off              never compile: a kernel missing from the cache is an Error(Cache)
//   MOEJIT_CACHE_LOCK_TIMEOUT_S seconds to wait for another process's compile (default 300)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moejit::cache {

struct Settings {
  std::string directory;        // empty: memory only
  uint64_t max_bytes = 0;       // 0: no bound
  bool jit = true;              // false: a miss is an Error(Cache)
  double lock_timeout_s = 300;  // then the waiter compiles itself
};

// The settings from the environment (throws Error(InvalidArgument) naming a malformed variable).
Settings settings_from_env();
// The settings in force for this process (the environment, with set_directory() applied).
Settings settings();
// The directory in force for this process.
std::string directory();
// Uses dir for the rest of this process (the CLI's --cache-dir); kernels in memory stay.
void set_directory(const std::string& dir);

struct Counters {
  uint64_t memory_hits = 0;
  uint64_t disk_hits = 0;
  uint64_t misses = 0;    // found in neither level
  uint64_t compiles = 0;  // successful compiles (misses that compiled)
  uint64_t failed_compiles = 0;
  uint64_t quarantined = 0;    // bad entries moved aside
  uint64_t lock_timeouts = 0;  // waits on another process that ran out
  double compile_ms = 0;       // summed compile time
  double disk_load_ms = 0;     // summed time reading and verifying entries
};

struct Entry {
  std::string key;     // 64 hex digits
  std::string kernel;  // plan kernel name of the process that compiled it
  std::string arch;
  std::string moejit_version;
  std::string nvrtc_version;
  uint64_t bytes = 0;  // file size
  uint64_t cubin_bytes = 0;
  double compile_ms = 0;
  int64_t last_used = 0;  // unix seconds; the LRU order
  std::string problem;    // empty when the entry verifies
};

struct Stats {
  std::string directory;
  std::string mode;  // "read-write", or why the disk level is read-only or off
  uint64_t entries = 0;
  uint64_t bytes = 0;  // entries only
  uint64_t quarantined_files = 0;
  uint64_t quarantined_bytes = 0;
  uint64_t max_bytes = 0;
  bool jit = true;
  Counters all_processes;  // DIR/stats: flushed by every process (killed ones lose a little)
  Counters this_process;
};

struct Problem {
  std::string path;  // relative to the directory, e.g. "entries/<key>.entry"
  std::string what;
};

struct PruneResult {
  uint64_t removed = 0;  // entries, quarantined files and stale temporaries removed
  uint64_t removed_bytes = 0;
  uint64_t kept = 0;  // entries left
  uint64_t kept_bytes = 0;
  uint64_t busy = 0;  // entries skipped because a process was loading or writing them
};

struct ImportResult {
  uint64_t imported = 0;
  uint64_t already_present = 0;
  std::vector<Problem> rejected;  // entries of the file that failed verification
};

// Entries of the directory, each verified, least recently used first.
std::vector<Entry> list();
Stats stats();
// Verifies every entry; quarantine = true also moves the bad ones to quarantine/.
std::vector<Problem> verify(bool quarantine = false);
// Removes quarantined files, then least recently used entries, until the directory holds at
// most max_bytes; never an entry another process is loading or writing. One prune runs at a
// time per directory (a second waits up to the lock timeout, then throws Error(Cache)).
PruneResult prune(uint64_t max_bytes);
// Removes every entry (except busy ones), the quarantine and stale temporaries.
PruneResult clear();
// Writes every valid entry to one file (atomically); returns the number written.
uint64_t export_to(const std::string& file);
// Verifies and adds every entry of a file written by export_to.
ImportResult import_from(const std::string& file);
// Drops this process's memory level (to measure loads from disk).
void clear_memory();
// "4096", "512M", "4G" (powers of 1024) -> bytes; throws Error(InvalidArgument).
uint64_t parse_bytes(const std::string& text);

}  // namespace moejit::cache
