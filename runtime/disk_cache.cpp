#include "runtime/disk_cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <mutex>
#include <set>
#include <thread>

#include "moejit/moejit.h"
#include "runtime/sha256.h"

namespace moejit::runtime {

namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kEntryMagic = "moejit-cache-entry";
constexpr const char* kArchiveMagic = "moejit-cache-archive 1";
constexpr const char* kStatsMagic = "moejit-cache-stats 1";
constexpr size_t kMaxHeaderBytes = 4096;
constexpr int64_t kStaleTempSeconds = 3600;  // a temporary this old belongs to a dead process
constexpr int64_t kTouchEverySeconds = 60;   // LRU time resolution (saves a write per load)

std::atomic<void (*)(const char*)> g_fault_hook{nullptr};
std::atomic<uint64_t> g_sequence{0};

void fault_point(const char* step) {
  if (auto* hook = g_fault_hook.load(std::memory_order_relaxed)) hook(step);
}

std::string errno_text(int err) {
  char buf[256];
  // GNU strerror_r returns the message (thread-safe, unlike strerror).
  return strerror_r(err, buf, sizeof buf);
}

std::string mode_octal(mode_t m) { return fmt::format("0{:o}", m & 07777); }

// One file descriptor, closed on scope exit.
class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = o.fd_;
      o.fd_ = -1;
    }
    return *this;
  }
  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  // close() reporting its error (a delayed write error on NFS shows up here).
  int close_checked() {
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc;
  }

 private:
  int fd_;
};

bool write_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// Reads exactly n bytes (fewer at end of file: *got says how many).
bool read_all(int fd, char* p, size_t n, size_t* got) {
  *got = 0;
  while (*got < n) {
    const ssize_t r = ::read(fd, p + *got, n - *got);
    if (r < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (r == 0) break;
    *got += static_cast<size_t>(r);
  }
  return true;
}

void fsync_dir(const std::string& dir) {
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd) ::fsync(fd.get());
}

// Names of dir's entries (no "." or "..").
std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return names;
  while (const dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

// "<64 hex>.entry" -> the key, else "".
std::string key_of_entry_name(const std::string& name) {
  constexpr std::string_view kSuffix = ".entry";
  if (name.size() != 64 + kSuffix.size() || name.compare(64, kSuffix.size(), kSuffix) != 0)
    return "";
  std::string key = name.substr(0, 64);
  return is_sha256_hex(key) ? key : "";
}

// The descriptors of the flocks this process holds. A flock belongs to the open file, which a
// child made by fork() shares: without this, a child forked while another thread compiles (a
// worker process, say) would keep that key locked for as long as it lives, and every other
// process would wait for it up to the lock timeout. In the child, each held descriptor is
// replaced by /dev/null (dup3), which drops the child's share of the lock and keeps the number
// taken, so a FileLock that the child later releases closes nothing of someone else's.
class HeldLocks {
 public:
  static HeldLocks& get() {
    static HeldLocks* h = [] {
      auto* p = new HeldLocks;  // never destroyed: the fork handlers may run at any time
      ::pthread_atfork([] { get().mu_.lock(); }, [] { get().mu_.unlock(); },
                       [] { get().in_child(); });
      return p;
    }();
    return *h;
  }
  // flock(fd, op | LOCK_NB), the descriptor recorded if it locked: 0 or the errno. Under the
  // mutex, so that no fork falls between the lock and its record.
  int try_lock(int fd, int op) {
    std::lock_guard<std::mutex> lock(mu_);
    if (::flock(fd, op | LOCK_NB) != 0) return errno;
    fds_.insert(fd);
    return 0;
  }
  // Closes a descriptor try_lock recorded (the same: no fork between the two).
  void close(Fd& fd) {
    std::lock_guard<std::mutex> lock(mu_);
    fds_.erase(fd.get());
    fd.reset();
  }

 private:
  void in_child() {
    // Only the forking thread runs here, and the prepare handler holds mu_ for it.
    const int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    for (int fd : fds_) {
      // Without /dev/null (no /dev, no free descriptor) close it: the number may then be
      // reused, and a FileLock of this thread released later would close that.
      if (null_fd < 0 || ::dup3(null_fd, fd, O_CLOEXEC) < 0) ::close(fd);
    }
    if (null_fd >= 0) ::close(null_fd);
    fds_.clear();
    mu_.unlock();
  }
  std::mutex mu_;
  std::set<int> fds_;
};
// Created (and the fork handlers registered) when the library loads, before any thread could
// fork during its construction.
[[maybe_unused]] HeldLocks& g_held_locks_at_load = HeldLocks::get();

// A flock on a lock file. The kernel drops it when the process dies, so a killed holder never
// blocks anyone. Waits poll with LOCK_NB so that they can end at a deadline.
class FileLock {
 public:
  enum class Result { Acquired, TimedOut, Unavailable };

  FileLock() = default;
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;
  ~FileLock() { release(); }

  // create = false opens an existing lock file read-only (a read-only cache directory).
  Result acquire(const std::string& path, bool exclusive, Clock::time_point deadline, bool create,
                 std::string* why) {
    release();
    for (;;) {
      Fd fd(::open(path.c_str(), (create ? O_RDWR | O_CREAT : O_RDONLY) | O_NOFOLLOW | O_CLOEXEC,
                   0600));
      if (!fd && create && (errno == EROFS || errno == EACCES || errno == EPERM))
        fd = Fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
      if (!fd) {
        if (why) *why = fmt::format("cannot open lock file {}: {}", path, errno_text(errno));
        return Result::Unavailable;
      }
      auto sleep = std::chrono::microseconds(500);
      for (int err; (err = HeldLocks::get().try_lock(fd.get(), exclusive ? LOCK_EX : LOCK_SH)) != 0;) {
        if (err == EINTR) continue;
        if (err != EWOULDBLOCK) {
          if (why) *why = fmt::format("cannot lock {}: {}", path, errno_text(err));
          return Result::Unavailable;
        }
        const auto now = Clock::now();
        if (now >= deadline) return Result::TimedOut;
        std::this_thread::sleep_for(std::min<Clock::duration>(sleep, deadline - now));
        sleep = std::min(sleep * 2, std::chrono::microseconds(50000));
      }
      // prune() unlinks lock files while holding them; a lock on an unlinked file locks nothing.
      struct stat held {
      }, now_at_path{};
      if (::fstat(fd.get(), &held) == 0 && ::stat(path.c_str(), &now_at_path) == 0 &&
          held.st_ino == now_at_path.st_ino && held.st_dev == now_at_path.st_dev) {
        fd_ = std::move(fd);
        return Result::Acquired;
      }
      HeldLocks::get().close(fd);
      if (!create) {
        if (why) *why = "lock file removed";
        return Result::Unavailable;
      }
    }
  }

  bool held() const { return static_cast<bool>(fd_); }
  void release() {
    if (fd_) HeldLocks::get().close(fd_);
  }
  // Removes the lock file while holding it (waiters notice and retry on a new file).
  void unlink_and_release(const std::string& path) {
    if (fd_) ::unlink(path.c_str());
    release();
  }

 private:
  Fd fd_;
};

bool parse_uint(std::string_view s, uint64_t* out) {
  if (s.empty() || s.size() > 15) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  *out = v;
  return true;
}

bool parse_ms(std::string_view s, double* out) {
  if (s.empty() || s.size() > 30) return false;
  const std::string text(s);
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (end != text.c_str() + text.size() || !std::isfinite(v) || v < 0) return false;
  *out = v;
  return true;
}

// Kernel names go into a manifest line: keep them to a safe character set.
std::string clean_name(const std::string& name) {
  std::string out;
  for (char c : name.substr(0, 120))
    out +=
        (std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.') ? c : '_';
  return out.empty() ? "unnamed" : out;
}

int64_t mtime_ns(const struct stat& st) {
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

std::string current_user() { return fmt::format("uid {}", ::geteuid()); }

// Checks that path (lstat'ed: no symlink) is a private directory of ours.
bool private_dir_ok(const std::string& path, bool follow, std::string* why) {
  struct stat st {};
  if ((follow ? ::stat(path.c_str(), &st) : ::lstat(path.c_str(), &st)) != 0) {
    *why = fmt::format("{}: {}", path, errno_text(errno));
    return false;
  }
  if (!S_ISDIR(st.st_mode)) {
    *why = fmt::format("{} is not a directory{}", path,
                       S_ISLNK(st.st_mode) ? " (a symbolic link)" : "");
    return false;
  }
  if (st.st_uid != ::geteuid()) {
    *why = fmt::format(
        "{} is owned by uid {}, not by you ({}); a cache another user can write "
        "could hand you any binary",
        path, st.st_uid, current_user());
    return false;
  }
  if (st.st_mode & (S_IWGRP | S_IWOTH)) {
    *why = fmt::format("{} is group- or world-writable (mode {}); run `chmod 700 {}`", path,
                       mode_octal(st.st_mode), path);
    return false;
  }
  return true;
}

// mkdir -p; directories it creates get mode 0700 whatever the umask.
bool make_dirs(const std::string& path, std::string* why) {
  std::string prefix;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    prefix = path.substr(0, pos);
    if (prefix.empty()) continue;
    if (::mkdir(prefix.c_str(), 0700) == 0) {
      ::chmod(prefix.c_str(), 0700);
    } else if (errno != EEXIST) {
      const int err = errno;
      struct stat st {};
      if (::stat(prefix.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) continue;  // EROFS, EACCES
      *why = fmt::format("cannot create {}: {}", prefix, errno_text(err));
      return false;
    }
  }
  return true;
}

cache::Counters add(cache::Counters a, const cache::Counters& b) {
  a.memory_hits += b.memory_hits;
  a.disk_hits += b.disk_hits;
  a.misses += b.misses;
  a.compiles += b.compiles;
  a.failed_compiles += b.failed_compiles;
  a.quarantined += b.quarantined;
  a.lock_timeouts += b.lock_timeouts;
  a.compile_ms += b.compile_ms;
  a.disk_load_ms += b.disk_load_ms;
  return a;
}

bool is_zero(const cache::Counters& c) {
  return c.memory_hits == 0 && c.disk_hits == 0 && c.misses == 0 && c.compiles == 0 &&
         c.failed_compiles == 0 && c.quarantined == 0 && c.lock_timeouts == 0 &&
         c.compile_ms == 0 && c.disk_load_ms == 0;
}

std::string encode_counters(const cache::Counters& c) {
  return fmt::format(
      "{}\nmemory_hits {}\ndisk_hits {}\nmisses {}\ncompiles {}\nfailed_compiles {}\n"
      "quarantined {}\nlock_timeouts {}\ncompile_ms {:.3f}\ndisk_load_ms {:.3f}\n",
      kStatsMagic, c.memory_hits, c.disk_hits, c.misses, c.compiles, c.failed_compiles,
      c.quarantined, c.lock_timeouts, c.compile_ms, c.disk_load_ms);
}

// Unknown or malformed text gives zeros: the statistics are advisory.
cache::Counters decode_counters(const std::string& text) {
  cache::Counters c;
  if (text.rfind(std::string(kStatsMagic) + "\n", 0) != 0) return c;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    const size_t sp = line.find(' ');
    if (sp == std::string::npos) continue;
    const std::string name = line.substr(0, sp), value = line.substr(sp + 1);
    uint64_t u = 0;
    double d = 0;
    if (name == "compile_ms" && parse_ms(value, &d))
      c.compile_ms = d;
    else if (name == "disk_load_ms" && parse_ms(value, &d))
      c.disk_load_ms = d;
    else if (!parse_uint(value, &u))
      continue;
    else if (name == "memory_hits")
      c.memory_hits = u;
    else if (name == "disk_hits")
      c.disk_hits = u;
    else if (name == "misses")
      c.misses = u;
    else if (name == "compiles")
      c.compiles = u;
    else if (name == "failed_compiles")
      c.failed_compiles = u;
    else if (name == "quarantined")
      c.quarantined = u;
    else if (name == "lock_timeouts")
      c.lock_timeouts = u;
  }
  return c;
}

std::string read_small_file(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK));
  if (!fd) return "";
  std::string text(8192, '\0');
  size_t got = 0;
  if (!read_all(fd.get(), text.data(), text.size(), &got)) return "";
  text.resize(got);
  return text;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry format.

std::string encode_entry(const EntryContents& e) {
  std::string header = fmt::format(
      "{} {}\nkey {}\nkernel {}\ncompile-ms {:.3f}\npreimage-bytes {}\ncubin-bytes {}\n"
      "log-bytes {}\ncubin-sha256 {}\n",
      kEntryMagic, kEntryFormatVersion, e.key, clean_name(e.kernel), e.compile_ms,
      e.preimage.size(), e.cubin.size(), e.log.size(), sha256_hex(e.cubin.data(), e.cubin.size()));
  Sha256 manifest;
  manifest.update(header);
  manifest.update(e.preimage);
  manifest.update(e.log);
  header += fmt::format("manifest-sha256 {}\n\n", manifest.finish_hex());
  std::string out;
  out.reserve(header.size() + e.preimage.size() + e.cubin.size() + e.log.size());
  out += header;
  out += e.preimage;
  out.append(e.cubin.data(), e.cubin.size());
  out += e.log;
  return out;
}

bool decode_entry(std::string_view b, std::string_view expected_key, EntryContents* out,
                  std::string* problem) {
  const auto fail = [&](std::string why) {
    *problem = std::move(why);
    return false;
  };
  if (b.empty()) return fail("is empty");
  const size_t header_end = b.substr(0, kMaxHeaderBytes).find("\n\n");
  if (header_end == std::string_view::npos)
    return fail(
        fmt::format("has no complete manifest ({} bytes; truncated, or not a moejit "
                    "cache entry)",
                    b.size()));
  static const char* const kFields[] = {
      kEntryMagic,   "key",       "kernel",       "compile-ms",     "preimage-bytes",
      "cubin-bytes", "log-bytes", "cubin-sha256", "manifest-sha256"};
  constexpr size_t kNumFields = sizeof kFields / sizeof kFields[0];
  std::string_view values[kNumFields];
  size_t manifest_line_start = 0;
  size_t pos = 0;
  for (size_t i = 0; i < kNumFields; ++i) {
    const size_t end = b.find('\n', pos);
    if (end == std::string_view::npos || end > header_end)
      return fail(fmt::format("has a malformed manifest (line {} missing)", i + 1));
    const std::string_view line = b.substr(pos, end - pos);
    const size_t sp = line.find(' ');
    if (sp == std::string_view::npos || line.substr(0, sp) != kFields[i])
      return fail(
          fmt::format("has a malformed manifest (line {} should be '{} ...')", i + 1, kFields[i]));
    values[i] = line.substr(sp + 1);
    if (i == kNumFields - 1) manifest_line_start = pos;
    pos = end + 1;
  }
  if (pos != header_end + 1) return fail("has a malformed manifest (extra lines)");
  uint64_t format = 0, preimage_bytes = 0, cubin_bytes = 0, log_bytes = 0;
  double compile_ms = 0;
  if (!parse_uint(values[0], &format)) return fail("has a malformed format version");
  if (format != static_cast<uint64_t>(kEntryFormatVersion))
    return fail(fmt::format("has format version {}, which this moejit ({}) does not read",
                            values[0], version()));
  if (!is_sha256_hex(values[1])) return fail("has a malformed key");
  if (!expected_key.empty() && values[1] != expected_key)
    return fail(fmt::format("holds key {} but is stored under key {}", values[1], expected_key));
  if (!parse_ms(values[3], &compile_ms) || !parse_uint(values[4], &preimage_bytes) ||
      !parse_uint(values[5], &cubin_bytes) || !parse_uint(values[6], &log_bytes) ||
      !is_sha256_hex(values[7]) || !is_sha256_hex(values[8]))
    return fail("has a malformed manifest (a size or checksum does not parse)");
  const size_t payload_start = header_end + 2;
  const uint64_t payload = b.size() - payload_start;
  const uint64_t expected = preimage_bytes + cubin_bytes + log_bytes;
  if (payload != expected)
    return fail(fmt::format("is {} ({} payload bytes, its manifest says {})",
                            payload < expected ? "truncated" : "padded", payload, expected));
  if (cubin_bytes == 0) return fail("holds an empty CUBIN");
  const std::string_view preimage = b.substr(payload_start, preimage_bytes);
  const std::string_view cubin = b.substr(payload_start + preimage_bytes, cubin_bytes);
  const std::string_view log = b.substr(payload_start + preimage_bytes + cubin_bytes, log_bytes);
  Sha256 manifest;
  manifest.update(b.substr(0, manifest_line_start));
  manifest.update(preimage);
  manifest.update(log);
  if (manifest.finish_hex() != values[8])
    return fail("fails its manifest checksum (manifest, preimage or log damaged)");
  if (sha256_hex(cubin) != values[7]) return fail("fails its CUBIN checksum (CUBIN damaged)");
  if (sha256_hex(preimage) != values[1])
    return fail("holds a preimage that does not hash to its key");
  if (out != nullptr) {
    out->key = std::string(values[1]);
    out->kernel = std::string(values[2]);
    out->compile_ms = compile_ms;
    out->preimage = std::string(preimage);
    out->cubin.assign(cubin.begin(), cubin.end());
    out->log = std::string(log);
  }
  return true;
}

std::string preimage_field(std::string_view preimage, std::string_view field) {
  size_t pos = 0;
  while (pos < preimage.size()) {
    size_t end = preimage.find('\n', pos);
    if (end == std::string_view::npos) end = preimage.size();
    const std::string_view line = preimage.substr(pos, end - pos);
    if (line.size() > field.size() && line.substr(0, field.size()) == field &&
        line[field.size()] == ' ')
      return std::string(line.substr(field.size() + 1));
    pos = end + 1;
  }
  return "";
}

cache::Counters CacheCounters::snapshot() const {
  cache::Counters c;
  c.memory_hits = memory_hits.load();
  c.disk_hits = disk_hits.load();
  c.misses = misses.load();
  c.compiles = compiles.load();
  c.failed_compiles = failed_compiles.load();
  c.quarantined = quarantined.load();
  c.lock_timeouts = lock_timeouts.load();
  c.compile_ms = static_cast<double>(compile_us.load()) / 1000.0;
  c.disk_load_ms = static_cast<double>(disk_load_us.load()) / 1000.0;
  return c;
}

// ---------------------------------------------------------------------------------------------
// DiskCache.

struct DiskCache::Pending {
  cache::Counters delta;  // not yet added to DIR/stats
  Clock::time_point last_flush = Clock::now();
  std::string read_only_reason;
};

void DiskCache::set_fault_hook_for_testing(void (*hook)(const char*)) { g_fault_hook = hook; }

DiskCache::DiskCache(const std::string& dir, uint64_t max_bytes, double lock_timeout_s)
    : max_bytes_(max_bytes),
      lock_timeout_s_(lock_timeout_s),
      pending_(std::make_unique<Pending>()) {
  if (dir.empty()) {
    off_reason_ = "no cache directory (memory only)";
    return;
  }
  std::error_code ec;
  std::filesystem::path p = std::filesystem::absolute(dir, ec);
  if (ec) p = dir;
  dir_ = p.lexically_normal().string();
  while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();

  const auto turn_off = [&](const std::string& why) {
    off_reason_ = why;
    warn_once(
        fmt::format("the kernel cache is off for this process: {}. Kernels are compiled "
                    "and kept in memory only; set MOEJIT_CACHE_DIR (or --cache-dir) to a "
                    "private directory of yours to keep them across runs.",
                    why));
  };
  std::string why;
  if (!make_dirs(dir_, &why)) {
    turn_off(why);
    return;
  }
  if (!private_dir_ok(dir_, /*follow=*/true, &why)) {
    turn_off(why);
    return;
  }
  std::string read_only;
  for (const char* sub : {"entries", "locks", "quarantine"}) {
    const std::string path = dir_ + "/" + sub;
    if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST && read_only.empty())
      read_only = fmt::format("cannot create {}: {}", path, errno_text(errno));
    struct stat st {};
    if (::lstat(path.c_str(), &st) == 0 && !private_dir_ok(path, /*follow=*/false, &why)) {
      turn_off(why);
      return;
    }
  }
  if (read_only.empty()) {
    // The permission bits do not say whether we can write (read-only mounts, ACLs, root): try.
    // The name holds the time and a per-process sequence: a probe left by a process killed
    // between open and unlink (prune removes those) is never taken for a read-only directory
    // by a later process of the same pid (containers often run as pid 1).
    Fd fd;
    std::string probe;
    for (int attempt = 0; attempt < 8 && !fd; ++attempt) {
      probe = fmt::format("{}/entries/.probe.{}.{}.{}", dir_, ::getpid(), g_sequence++,
                          std::chrono::system_clock::now().time_since_epoch().count());
      fd = Fd(::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
      if (!fd && errno != EEXIST) break;
    }
    if (fd) {
      ::unlink(probe.c_str());
    } else {
      read_only = fmt::format("cannot write in {}/entries: {}", dir_, errno_text(errno));
    }
  }
  pending_->read_only_reason = read_only;
  mode_ = read_only.empty() ? Mode::ReadWrite : Mode::ReadOnly;
}

DiskCache::~DiskCache() {
  try {
    flush_counters();
  } catch (...) {
    // Statistics are advisory; never throw from a destructor.
  }
}

std::string DiskCache::mode_text() const {
  switch (mode_.load()) {
    case Mode::ReadWrite:
      return "read-write";
    case Mode::ReadOnly: {
      std::lock_guard<std::mutex> lock(mu_);
      return "read-only (" + pending_->read_only_reason + "): new kernels stay in memory";
    }
    case Mode::Off:
      return "off (" + off_reason_ + ")";
  }
  return "";
}

std::string DiskCache::entry_path(const std::string& key) const {
  // Keys are checked to be hex before they name a file: nothing can leave the directory.
  if (!is_sha256_hex(key)) throw Error(ErrorKind::Internal, "malformed cache key '" + key + "'");
  return dir_ + "/entries/" + key + ".entry";
}

std::string DiskCache::lock_path(const std::string& key) const {
  if (!is_sha256_hex(key)) throw Error(ErrorKind::Internal, "malformed cache key '" + key + "'");
  return dir_ + "/locks/" + key + ".lock";
}

void DiskCache::warn_once(const std::string& message) {
  if (!warned_.exchange(true)) std::fprintf(stderr, "moejit: warning: %s\n", message.c_str());
}

void DiskCache::degrade(const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (pending_->read_only_reason.empty()) pending_->read_only_reason = why;
  }
  Mode expected = Mode::ReadWrite;
  mode_.compare_exchange_strong(expected, Mode::ReadOnly);
  warn_once(
      fmt::format("the kernel cache at {} cannot store new kernels ({}); they stay in "
                  "memory for this process. Free space, or set MOEJIT_CACHE_DIR (or "
                  "--cache-dir) to a writable directory, to keep them across runs.",
                  dir_, why));
}

DiskCache::Read DiskCache::read_entry(const std::string& key, EntryContents* out,
                                      std::string* problem, bool touch) const {
  const std::string path = entry_path(key);
  Fd fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK));
  if (!fd) {
    const int err = errno;
    if (err == ENOENT) return Read::Missing;
    if (err == ELOOP) {
      *problem = "is a symbolic link; entries must be regular files written by moejit";
      return Read::Refused;
    }
    *problem = "cannot be opened: " + errno_text(err);
    return Read::Bad;
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    *problem = "cannot be examined: " + errno_text(errno);
    return Read::Bad;
  }
  if (!S_ISREG(st.st_mode)) {
    *problem = "is not a regular file";
    return Read::Refused;
  }
  if (st.st_uid != ::geteuid()) {
    *problem = fmt::format(
        "is owned by uid {}, not by you ({}); an entry someone else wrote is "
        "never loaded",
        st.st_uid, current_user());
    return Read::Refused;
  }
  if (st.st_mode & (S_IWGRP | S_IWOTH)) {
    *problem = fmt::format(
        "is group- or world-writable (mode {}); an entry others could have "
        "changed is never loaded",
        mode_octal(st.st_mode));
    return Read::Refused;
  }
  if (static_cast<uint64_t>(st.st_size) > kMaxEntryBytes) {
    *problem = fmt::format("is {} bytes, larger than any entry moejit writes", st.st_size);
    return Read::Bad;
  }
  std::string bytes(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  if (!read_all(fd.get(), bytes.data(), bytes.size(), &got)) {
    *problem = "cannot be read: " + errno_text(errno);
    return Read::Bad;
  }
  bytes.resize(got);
  if (!decode_entry(bytes, key, out, problem)) return Read::Bad;
  if (touch && std::time(nullptr) - st.st_mtime > kTouchEverySeconds)
    ::futimens(fd.get(), nullptr);  // last use, for LRU eviction; failure is harmless
  return Read::Ok;
}

int DiskCache::publish(const EntryContents& e, std::string* error) {
  const std::string bytes = encode_entry(e);
  const std::string final_path = entry_path(e.key);
  const std::string tmp =
      fmt::format("{}/entries/.tmp.{}.{}.{}", dir_, e.key, ::getpid(), g_sequence++);
  const auto fail = [&](const char* what) {
    const int err = errno;
    *error = fmt::format("{} {}: {}", what, tmp, errno_text(err));
    ::unlink(tmp.c_str());
    return err == 0 ? EIO : err;
  };
  Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!fd) return fail("cannot create");
  const size_t half = bytes.size() / 2;
  if (!write_all(fd.get(), bytes.data(), half)) return fail("cannot write");
  fault_point("temp-partial");
  if (!write_all(fd.get(), bytes.data() + half, bytes.size() - half)) return fail("cannot write");
  fault_point("temp-written");
  if (::fsync(fd.get()) != 0) return fail("cannot fsync");
  if (fd.close_checked() != 0) return fail("cannot close");
  fault_point("temp-synced");
  // Publish without replacing: an entry already there is equally valid (same key, verified on
  // load). Filesystems without RENAME_NOREPLACE get link(), else a plain rename.
  int rc = ::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_path.c_str(), RENAME_NOREPLACE);
  if (rc != 0 && (errno == EINVAL || errno == ENOSYS || errno == ENOTSUP)) {
    rc = ::link(tmp.c_str(), final_path.c_str());
    if (rc == 0 || errno == EEXIST) {
      ::unlink(tmp.c_str());
      if (rc != 0) errno = EEXIST;
    } else if (errno == EPERM || errno == ENOTSUP || errno == EOPNOTSUPP) {
      rc = ::rename(tmp.c_str(), final_path.c_str());
    }
  }
  if (rc != 0) {
    if (errno == EEXIST) {
      ::unlink(tmp.c_str());
      return 0;
    }
    return fail("cannot rename");
  }
  fault_point("published");
  fsync_dir(dir_ + "/entries");
  return 0;
}

void DiskCache::quarantine(const std::string& key, const std::string& problem,
                           CacheCounters* counters) {
  const std::string src = entry_path(key);
  const std::string dst =
      fmt::format("{}/quarantine/{}.{}.{}.{}", dir_, key,
                  static_cast<long long>(std::time(nullptr)), ::getpid(), g_sequence++);
  std::string message;
  if (::rename(src.c_str(), dst.c_str()) == 0) {
    message = fmt::format("moejit: cache: {} {}; moved it to {} (it will be recompiled)", src,
                          problem, dst);
  } else if (errno == ENOENT) {
    return;  // another process moved it first
  } else {
    const int err = errno;
    ::unlink(src.c_str());
    message = fmt::format(
        "moejit: cache: {} {}; could not move it to quarantine ({}), removed it "
        "(it will be recompiled)",
        src, problem, errno_text(err));
  }
  std::fprintf(stderr, "%s\n", message.c_str());
  if (counters) counters->quarantined++;
  cache::Counters delta;
  delta.quarantined = 1;
  note_event(delta, /*flush_now=*/true);
}

void DiskCache::note_event(const cache::Counters& delta, bool flush_now) {
  if (mode_.load() == Mode::Off) return;
  bool flush = flush_now;
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_->delta = add(pending_->delta, delta);
    flush = flush || Clock::now() - pending_->last_flush > std::chrono::seconds(1);
  }
  if (flush) flush_counters();
}

void DiskCache::flush_counters() {
  cache::Counters delta;
  {
    std::lock_guard<std::mutex> lock(mu_);
    delta = pending_->delta;
    pending_->delta = {};
    pending_->last_flush = Clock::now();
  }
  if (is_zero(delta) || mode_.load() != Mode::ReadWrite) return;
  FileLock lock;
  if (lock.acquire(dir_ + "/locks/stats.lock", true, Clock::now() + std::chrono::seconds(2), true,
                   nullptr) != FileLock::Result::Acquired)
    return;
  const std::string path = dir_ + "/stats";
  const std::string text = encode_counters(add(decode_counters(read_small_file(path)), delta));
  const std::string tmp = fmt::format("{}.tmp.{}", path, ::getpid());
  Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!fd) return;
  const bool ok = write_all(fd.get(), text.data(), text.size());
  if (fd.close_checked() == 0 && ok && ::rename(tmp.c_str(), path.c_str()) == 0) return;
  ::unlink(tmp.c_str());
}

cache::Counters DiskCache::persisted_counters() {
  if (mode_.load() == Mode::Off) return {};
  flush_counters();
  return decode_counters(read_small_file(dir_ + "/stats"));
}

std::shared_ptr<void> DiskCache::pin(const std::string& key) {
  auto p = std::make_shared<FileLock>();
  if (mode_.load() != Mode::Off)
    p->acquire(lock_path(key), false,
               Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                  std::chrono::duration<double>(lock_timeout_s_)),
               mode_.load() == Mode::ReadWrite, nullptr);
  return p;
}

KernelBinary DiskCache::compile_and_publish(const Request& req,
                                            const std::function<KernelBinary()>& compile,
                                            CacheCounters& counters) {
  counters.misses++;
  cache::Counters delta;
  delta.misses = 1;
  if (!req.jit) {
    note_event(delta, true);
    throw Error(
        ErrorKind::Cache,
        fmt::format("{} is not in the kernel cache{} and MOEJIT_JIT=off forbids compiling it. "
                    "Warm the cache with this moejit ({}) and NVRTC first (`moejit warmup "
                    "--preset NAME{}`, or `moejit cache import FILE`), or unset MOEJIT_JIT.",
                    req.describe, dir_.empty() ? "" : " at " + dir_, version(),
                    dir_.empty() ? "" : " --cache-dir " + dir_));
  }
  const auto start = Clock::now();
  KernelBinary bin;
  try {
    bin = compile();
  } catch (...) {
    counters.failed_compiles++;
    delta.failed_compiles = 1;
    note_event(delta, true);
    throw;  // never published
  }
  const double ms = bin.compile_ms > 0
                        ? bin.compile_ms
                        : std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  bin.compile_ms = ms;
  counters.compiles++;
  counters.compile_us += static_cast<uint64_t>(ms * 1000.0);
  delta.compiles = 1;
  delta.compile_ms = ms;
  fault_point("compiled");
  const Mode mode = mode_.load();
  if (mode == Mode::ReadWrite && !bin.cubin.empty()) {
    EntryContents e{req.key, req.kernel, req.preimage, bin.cubin, bin.compile_log, ms};
    std::string error;
    const int err = publish(e, &error);
    // ENOENT: `moejit cache clear` removed our temporary meanwhile; the next run publishes.
    if (err != 0 && err != ENOENT) degrade(error);
  } else if (mode == Mode::ReadOnly) {
    std::string reason;
    {
      std::lock_guard<std::mutex> lock(mu_);
      reason = pending_->read_only_reason;
    }
    degrade(reason);
  }
  note_event(delta, true);
  return bin;
}

KernelBinary DiskCache::get(const Request& req, const std::function<KernelBinary()>& compile,
                            CacheCounters& counters) {
  if (mode_.load() == Mode::Off) return compile_and_publish(req, compile, counters);
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(lock_timeout_s_));
  const auto loaded = [&](EntryContents& e) {
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start);
    counters.disk_hits++;
    counters.disk_load_us += static_cast<uint64_t>(us.count());
    cache::Counters delta;
    delta.disk_hits = 1;
    delta.disk_load_ms = static_cast<double>(us.count()) / 1000.0;
    note_event(delta, false);
    KernelBinary b;
    b.cubin = std::move(e.cubin);
    b.compile_log = std::move(e.log);
    return b;
  };
  const auto waited_too_long = [&] {
    counters.lock_timeouts++;
    cache::Counters delta;
    delta.lock_timeouts = 1;
    note_event(delta, true);
    std::fprintf(stderr,
                 "moejit: cache: waited %.0f s for another process to compile %s (lock %s); "
                 "compiling it here. Raise MOEJIT_CACHE_LOCK_TIMEOUT_S if compiles are this "
                 "slow.\n",
                 lock_timeout_s_, req.describe.c_str(), lock_path(req.key).c_str());
  };

  EntryContents e;
  std::string problem, why;
  const bool writable = mode_.load() == Mode::ReadWrite;
  Read r;
  {
    FileLock shared;
    if (shared.acquire(lock_path(req.key), false, deadline, writable, &why) ==
        FileLock::Result::TimedOut) {
      waited_too_long();
      if (read_entry(req.key, &e, &problem, writable) == Read::Ok) return loaded(e);
      return compile_and_publish(req, compile, counters);
    }
    // Acquired, or Unavailable (a read-only directory without the lock file): read either way.
    r = read_entry(req.key, &e, &problem, writable);
    if (r == Read::Ok) return loaded(e);
  }
  if (!writable || mode_.load() != Mode::ReadWrite) {
    if (r != Read::Missing) {
      std::lock_guard<std::mutex> lock(mu_);
      if (logged_.insert(req.key).second)
        std::fprintf(stderr,
                     "moejit: cache: ignoring %s: it %s (the cache is read-only, so it "
                     "stays where it is)\n",
                     entry_path(req.key).c_str(), problem.c_str());
    }
    return compile_and_publish(req, compile, counters);
  }

  fault_point("missing");  // between the shared and the exclusive lock: the race window
  FileLock exclusive;
  const auto got = exclusive.acquire(lock_path(req.key), true, deadline, true, &why);
  if (got == FileLock::Result::TimedOut) {
    waited_too_long();
    if (read_entry(req.key, &e, &problem, true) == Read::Ok) return loaded(e);
    return compile_and_publish(req, compile, counters);
  }
  if (got == FileLock::Result::Unavailable) {
    degrade(why);
    return compile_and_publish(req, compile, counters);
  }
  fault_point("locked");
  // Double check: the process we waited for has usually published it.
  r = read_entry(req.key, &e, &problem, true);
  if (r == Read::Ok) return loaded(e);
  if (r != Read::Missing) quarantine(req.key, problem, &counters);
  KernelBinary bin = compile_and_publish(req, compile, counters);
  exclusive.release();
  if (max_bytes_ > 0 && mode_.load() == Mode::ReadWrite) {
    try {
      remove_until(max_bytes_, false, false);
    } catch (const Error&) {
      // Eviction is best effort; the kernel is compiled and stored.
    }
  }
  return bin;
}

// ---------------------------------------------------------------------------------------------
// Administration.

std::vector<cache::Entry> DiskCache::list() {
  std::vector<cache::Entry> out;
  if (mode_.load() == Mode::Off) return out;
  for (const std::string& name : list_dir(dir_ + "/entries")) {
    const std::string key = key_of_entry_name(name);
    if (key.empty()) continue;
    struct stat st {};
    if (::lstat((dir_ + "/entries/" + name).c_str(), &st) != 0) continue;
    cache::Entry info;
    info.key = key;
    info.bytes = static_cast<uint64_t>(st.st_size);
    info.last_used = static_cast<int64_t>(st.st_mtime);
    EntryContents e;
    std::string problem;
    const Read r = read_entry(key, &e, &problem, false);
    if (r == Read::Missing) continue;  // removed meanwhile
    if (r == Read::Ok) {
      info.kernel = e.kernel;
      info.arch = preimage_field(e.preimage, "arch");
      info.moejit_version = preimage_field(e.preimage, "moejit");
      info.nvrtc_version = preimage_field(e.preimage, "nvrtc");
      info.cubin_bytes = e.cubin.size();
      info.compile_ms = e.compile_ms;
    } else {
      info.problem = problem;
    }
    out.push_back(std::move(info));
  }
  std::stable_sort(out.begin(), out.end(), [](const cache::Entry& a, const cache::Entry& b) {
    return a.last_used < b.last_used;
  });
  return out;
}

std::vector<cache::Problem> DiskCache::verify(bool fix) {
  std::vector<cache::Problem> problems;
  if (mode_.load() == Mode::Off) {
    problems.push_back({".", "the cache directory is not usable: " + off_reason_});
    return problems;
  }
  for (const std::string& name : list_dir(dir_ + "/entries")) {
    if (name.rfind(".tmp.", 0) == 0 || name.rfind(".probe.", 0) == 0) continue;  // in flight
    const std::string key = key_of_entry_name(name);
    if (key.empty()) {
      problems.push_back({"entries/" + name, "is not a cache entry (unexpected file name)"});
      continue;
    }
    std::string problem;
    Read r = read_entry(key, nullptr, &problem, false);
    if (r == Read::Ok || r == Read::Missing) continue;
    if (fix && mode_.load() == Mode::ReadWrite) {
      FileLock lock;
      if (lock.acquire(lock_path(key), true, Clock::now() + std::chrono::seconds(5), true,
                       nullptr) == FileLock::Result::Acquired) {
        r = read_entry(key, nullptr, &problem, false);  // still bad under the lock?
        if (r == Read::Bad || r == Read::Refused) quarantine(key, problem, nullptr);
      }
    }
    if (r == Read::Bad || r == Read::Refused) problems.push_back({"entries/" + name, problem});
  }
  return problems;
}

cache::PruneResult DiskCache::remove_until(uint64_t max_bytes, bool everything, bool wait) {
  if (mode_.load() != Mode::ReadWrite)
    throw Error(ErrorKind::Cache, fmt::format("cannot remove anything from the kernel cache at "
                                              "{}: it is {}",
                                              dir_, mode_text()));
  cache::PruneResult res;
  // One prune at a time per directory, each listing what is there once it holds the lock:
  // prunes that listed together would each remove the whole excess (and more, counting entries
  // the other removed or holds as still there). After a compile (wait = false) this prune is
  // skipped while another runs; entries published after that one listed stay until a later
  // prune (this process's next compile, or `moejit cache prune`).
  FileLock pruning;
  std::string why;
  const auto got = pruning.acquire(
      dir_ + "/locks/prune.lock", true,
      wait ? Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                std::chrono::duration<double>(lock_timeout_s_))
           : Clock::now(),
      true, &why);
  if (got == FileLock::Result::TimedOut && !wait) return res;
  if (got == FileLock::Result::TimedOut)
    throw Error(ErrorKind::Cache,
                fmt::format("another process has been pruning the kernel cache at {} for more "
                            "than {} s (MOEJIT_CACHE_LOCK_TIMEOUT_S)",
                            dir_, lock_timeout_s_));
  if (got == FileLock::Result::Unavailable)
    throw Error(ErrorKind::Cache, fmt::format("cannot prune the kernel cache at {}: {}", dir_, why));
  const int64_t now = static_cast<int64_t>(std::time(nullptr));
  struct File {
    std::string path;
    std::string key;  // entries only
    uint64_t bytes;
    int64_t mtime;  // ns: entries published within one second still have an order
  };
  std::vector<File> entries, quarantined;
  // True where the file is gone: removed here, or already by another process (a loader that
  // moved it to quarantine/, whose files this prune has listed already: the next prune counts
  // them).
  const auto remove_file = [&](const File& f) {
    if (::unlink(f.path.c_str()) == 0) {
      res.removed++;
      res.removed_bytes += f.bytes;
      return true;
    }
    return errno == ENOENT;
  };
  uint64_t total = 0;
  for (const std::string& name : list_dir(dir_ + "/entries")) {
    const std::string path = dir_ + "/entries/" + name;
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) continue;
    File f{path, key_of_entry_name(name), static_cast<uint64_t>(st.st_size), mtime_ns(st)};
    if (name.rfind(".tmp.", 0) == 0 || name.rfind(".probe.", 0) == 0) {
      // A temporary (or a write probe) of a live process is minutes old at most; older ones
      // were killed mid-publish.
      if (everything || now - f.mtime / 1000000000 > kStaleTempSeconds) remove_file(f);
    } else if (!f.key.empty()) {
      entries.push_back(f);
      total += f.bytes;
    }
  }
  for (const std::string& name : list_dir(dir_)) {
    const std::string path = dir_ + "/" + name;
    struct stat st {};
    if (name.rfind("stats.tmp.", 0) == 0 && ::lstat(path.c_str(), &st) == 0 &&
        (everything || now - st.st_mtime > kStaleTempSeconds))
      remove_file({path, "", static_cast<uint64_t>(st.st_size), 0});
  }
  for (const std::string& name : list_dir(dir_ + "/quarantine")) {
    const std::string path = dir_ + "/quarantine/" + name;
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    quarantined.push_back({path, "", static_cast<uint64_t>(st.st_size), mtime_ns(st)});
    total += static_cast<uint64_t>(st.st_size);
  }
  const auto by_age = [](const File& a, const File& b) { return a.mtime < b.mtime; };
  std::sort(quarantined.begin(), quarantined.end(), by_age);
  for (const File& f : quarantined) {
    if (!everything && total <= max_bytes) break;
    if (remove_file(f)) total -= f.bytes;
  }
  std::sort(entries.begin(), entries.end(), by_age);  // least recently used first
  for (const File& f : entries) {
    if (!everything && total <= max_bytes) {
      res.kept++;
      res.kept_bytes += f.bytes;
      continue;
    }
    // A loader holds the key's lock shared and a compiler exclusive: skip the entry then.
    FileLock lock;
    if (lock.acquire(lock_path(f.key), true, Clock::now(), true, nullptr) !=
        FileLock::Result::Acquired) {
      res.busy++;
      res.kept++;
      res.kept_bytes += f.bytes;
      continue;
    }
    if (remove_file(f)) total -= f.bytes;
    lock.unlink_and_release(lock_path(f.key));
  }
  // Lock files of keys without an entry (compiles that failed or were killed).
  for (const std::string& name : list_dir(dir_ + "/locks")) {
    constexpr std::string_view kSuffix = ".lock";
    if (name.size() != 64 + kSuffix.size() || !is_sha256_hex(name.substr(0, 64))) continue;
    const std::string key = name.substr(0, 64);
    struct stat st {};
    if (::lstat(entry_path(key).c_str(), &st) == 0) continue;
    FileLock lock;
    if (lock.acquire(lock_path(key), true, Clock::now(), false, nullptr) ==
            FileLock::Result::Acquired &&
        ::lstat(entry_path(key).c_str(), &st) != 0)
      lock.unlink_and_release(lock_path(key));
  }
  return res;
}

cache::PruneResult DiskCache::prune(uint64_t max_bytes) {
  return remove_until(max_bytes, false, true);
}

cache::PruneResult DiskCache::clear() { return remove_until(0, true, true); }

uint64_t DiskCache::quarantined_files(uint64_t* bytes) {
  uint64_t n = 0;
  *bytes = 0;
  if (mode_.load() == Mode::Off) return 0;
  for (const std::string& name : list_dir(dir_ + "/quarantine")) {
    struct stat st {};
    if (::lstat((dir_ + "/quarantine/" + name).c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    ++n;
    *bytes += static_cast<uint64_t>(st.st_size);
  }
  return n;
}

uint64_t DiskCache::export_to(const std::string& file) {
  if (mode_.load() == Mode::Off)
    throw Error(ErrorKind::Cache, "cannot export the kernel cache: it is " + mode_text());
  const std::string tmp = fmt::format("{}.tmp.{}", file, ::getpid());
  Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644));
  if (!fd)
    throw Error(ErrorKind::Cache,
                fmt::format("cannot create {}: {}; choose a writable place for the export file",
                            tmp, errno_text(errno)));
  const auto write_or_throw = [&](const char* p, size_t n) {
    if (!write_all(fd.get(), p, n)) {
      const int err = errno;
      ::unlink(tmp.c_str());
      throw Error(ErrorKind::Cache, fmt::format("cannot write {}: {}", tmp, errno_text(err)));
    }
  };
  const std::string head = std::string(kArchiveMagic) + "\n";
  write_or_throw(head.data(), head.size());
  uint64_t count = 0;
  for (const std::string& name : list_dir(dir_ + "/entries")) {
    const std::string key = key_of_entry_name(name);
    if (key.empty()) continue;
    auto pinned = pin(key);
    EntryContents e;
    std::string problem;
    if (read_entry(key, &e, &problem, false) != Read::Ok) continue;  // only valid entries travel
    const std::string bytes = encode_entry(e);
    const std::string line = fmt::format("entry {} {}\n", key, bytes.size());
    write_or_throw(line.data(), line.size());
    write_or_throw(bytes.data(), bytes.size());
    write_or_throw("\n", 1);
    ++count;
  }
  const std::string tail = fmt::format("end {}\n", count);
  write_or_throw(tail.data(), tail.size());
  if (::fsync(fd.get()) != 0 || fd.close_checked() != 0 ||
      ::rename(tmp.c_str(), file.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw Error(ErrorKind::Cache, fmt::format("cannot write {}: {}", file, errno_text(err)));
  }
  return count;
}

cache::ImportResult DiskCache::import_from(const std::string& file) {
  if (mode_.load() != Mode::ReadWrite)
    throw Error(ErrorKind::Cache, fmt::format("cannot import into the kernel cache at {}: it is {}",
                                              dir_, mode_text()));
  Fd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd)
    throw Error(ErrorKind::Cache, fmt::format("cannot open {}: {}", file, errno_text(errno)));
  // A small buffered reader: lines and exact byte counts.
  std::string buf;
  size_t at = 0;
  bool eof = false;
  const auto fill = [&](size_t want) {
    while (!eof && buf.size() - at < want) {
      if (at > 0) {
        buf.erase(0, at);
        at = 0;
      }
      char chunk[1 << 16];
      const ssize_t r = ::read(fd.get(), chunk, sizeof chunk);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        eof = true;
        break;
      }
      buf.append(chunk, static_cast<size_t>(r));
    }
    return buf.size() - at >= want;
  };
  const auto read_line = [&](std::string* line) {
    for (size_t scanned = 0;;) {
      const size_t nl = buf.find('\n', at + scanned);
      if (nl != std::string::npos) {
        *line = buf.substr(at, nl - at);
        at = nl + 1;
        return true;
      }
      scanned = buf.size() - at;
      if (scanned > 256 || !fill(scanned + 1)) return false;
    }
  };
  std::string line;
  if (!read_line(&line) || line != kArchiveMagic)
    throw Error(ErrorKind::Cache,
                fmt::format("{} is not a moejit cache archive (its first line should be '{}'); "
                            "create one with `moejit cache export FILE`",
                            file, kArchiveMagic));
  cache::ImportResult res;
  uint64_t seen = 0;
  for (;;) {
    const std::string where = fmt::format("{} (entry #{})", file, seen + 1);
    if (!read_line(&line)) {
      res.rejected.push_back({file,
                              "ends without its 'end' line (truncated); the entries "
                              "before were imported"});
      break;
    }
    uint64_t count = 0;
    if (line.rfind("end ", 0) == 0 && parse_uint(line.substr(4), &count)) {
      if (count != seen)
        res.rejected.push_back(
            {file, fmt::format("says it holds {} entries but holds {}", count, seen)});
      break;
    }
    const size_t sp = line.find(' ', 6);
    uint64_t n = 0;
    if (line.rfind("entry ", 0) != 0 || sp != 6 + 64 || !is_sha256_hex(line.substr(6, 64)) ||
        !parse_uint(line.substr(sp + 1), &n) || n > kMaxEntryBytes) {
      res.rejected.push_back({where, "malformed archive line; stopped reading here"});
      break;
    }
    const std::string key = line.substr(6, 64);
    ++seen;
    if (!fill(n + 1)) {
      res.rejected.push_back({where, "is truncated; stopped reading here"});
      break;
    }
    const std::string_view bytes(buf.data() + at, n);
    const bool newline = buf[at + n] == '\n';
    EntryContents e;
    std::string problem;
    const bool ok = decode_entry(bytes, key, &e, &problem);
    at += n + 1;
    if (!newline) {
      res.rejected.push_back({where, "is not followed by a newline; stopped reading here"});
      break;
    }
    if (!ok) {
      res.rejected.push_back({where + " key " + key, "entry " + problem});
      continue;
    }
    FileLock lock;
    if (lock.acquire(lock_path(key), true,
                     Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(lock_timeout_s_)),
                     true, &problem) != FileLock::Result::Acquired) {
      res.rejected.push_back({where + " key " + key, "could not lock it: " + problem});
      continue;
    }
    const Read r = read_entry(key, nullptr, &problem, false);
    if (r == Read::Ok) {
      res.already_present++;
      continue;
    }
    if (r != Read::Missing) quarantine(key, problem, nullptr);
    std::string error;
    if (const int err = publish(e, &error); err != 0)
      throw Error(ErrorKind::Cache, fmt::format("cannot import into {}: {} ({} entries imported "
                                                "before this one)",
                                                dir_, error, res.imported));
    res.imported++;
  }
  return res;
}

}  // namespace moejit::runtime
