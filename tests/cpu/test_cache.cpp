// The JIT kernel cache (runtime/kernel_cache.h, runtime/disk_cache.h, include/moejit/cache.h):
// SHA-256, the key, the entry format, single-flight, corruption, permissions, read-only and full
// directories, lock timeouts, and many processes (forked) cold-starting, being killed and
// pruning at once. Kernels are real: the planner's kernels of a preset compiled by NVRTC.
//
// Processes are forked from this test binary; a child uses only KernelCache objects it creates
// itself and leaves with _exit().
#include <fcntl.h>
#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "compiler/codegen.h"
#include "compiler/nvrtc.h"
#include "compiler/plan.h"
#include "moejit/cache.h"
#include "moejit/moejit.h"
#include "runtime/disk_cache.h"
#include "runtime/driver.h"
#include "runtime/env.h"
#include "runtime/kernel_cache.h"
#include "runtime/sha256.h"
#include "tests/process_helpers.h"

namespace moejit::runtime {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

constexpr uid_t kOtherUid = 65534;  // nobody

// ---- helpers ----------------------------------------------------------------------------------

using moejit_test::TempDir;

cache::Settings settings_for(const std::string& dir, double lock_timeout_s = 120) {
  cache::Settings s;
  s.directory = dir;
  s.lock_timeout_s = lock_timeout_s;
  return s;
}

// The requests the runtime makes for a preset's plan: one per distinct kernel (a kernel that
// shares another's code, KernelSource::same_as, is not requested again).
std::vector<KernelRequest> preset_requests(const std::string& name, int max_tokens,
                                           const std::string& arch = "sm_90a") {
  std::vector<KernelRequest> out;
  const compiler::Plan plan = compiler::make_plan(preset(name), max_tokens);
  for (const auto& src : compiler::generate_all(plan))
    if (src.same_as < 0)
      out.push_back({src.name, src.entry, src.source, arch, compiler::nvrtc_options(arch, false)});
  return out;
}

// A small real kernel (tens of ms of NVRTC) for tests that compile often.
KernelRequest tiny_request(int i, const std::string& arch = "sm_90a") {
  KernelRequest r;
  r.name = fmt::format("tiny{}", i);
  r.entry = fmt::format("moejit_tiny_{}", i);
  r.source = fmt::format(
      "extern \"C\" __global__ void moejit_tiny_{0}(float* x) {{\n"
      "  x[threadIdx.x] = x[threadIdx.x] * {0}.0f + 1.0f;\n}}\n",
      i);
  r.arch = arch;
  r.options = compiler::nvrtc_options(arch, false);
  return r;
}

KernelBinary real_compile(const KernelRequest& r) {
  compiler::CompileOutput out = compiler::nvrtc_compile(r.name, r.source, r.arch);
  return {std::move(out.binary), std::move(out.log), out.ms};
}

// real_compile, appending "<key> <pid>\n" to log after each successful compile.
CompileFn logging_compile(const std::string& log) {
  return [log](const KernelRequest& r) {
    KernelBinary b = real_compile(r);
    const std::string line =
        fmt::format("{} {}\n", cache_key(r, KeyContext::current()), ::getpid());
    const int fd = ::open(log.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) {
      if (::write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size())) std::abort();
      ::close(fd);
    }
    return b;
  };
}

std::map<std::string, int> compiles_per_key(const std::string& log) {
  std::map<std::string, int> n;
  std::ifstream in(log);
  std::string key, pid;
  while (in >> key >> pid) n[key]++;
  return n;
}

// Gets every request on `threads` threads; returns the number of failures (printed).
int get_all(KernelCache& cache, const std::vector<KernelRequest>& reqs, const CompileFn& compile,
            int threads = 2) {
  std::atomic<size_t> next{0};
  std::atomic<int> failures{0};
  auto work = [&] {
    for (size_t i; (i = next++) < reqs.size();) {
      try {
        auto bin = cache.get(reqs[i], compile);
        if (!bin || bin->cubin.empty()) throw std::runtime_error("empty binary");
      } catch (const std::exception& e) {
        std::fprintf(stderr, "get(%s) failed: %s\n", reqs[i].name.c_str(), e.what());
        failures++;
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  return failures;
}

// Runs fn in a forked child (stderr to stderr_file when given) and returns its pid.
pid_t spawn(const std::function<int()>& fn, const std::string& stderr_file = "") {
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  if (!stderr_file.empty()) {
    const int fd = ::open(stderr_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 2);
    ::close(fd);
  }
  int rc = 99;
  try {
    rc = fn();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "child %d: %s\n", ::getpid(), e.what());
    rc = 98;
  }
  std::fflush(stderr);
  ::_exit(rc);
}

int wait_status(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return status;
}

// Exit code of a child, or -signal.
int run_child(const std::function<int()>& fn, const std::string& stderr_file = "") {
  const int status = wait_status(spawn(fn, stderr_file));
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return -WTERMSIG(status);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

int count_substr(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
  return n;
}

std::vector<std::string> files_in(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) out.push_back(e.path().filename());
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> entry_files(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& n : files_in(dir + "/entries"))
    if (n.size() > 6 && n.compare(n.size() - 6, 6, ".entry") == 0) out.push_back(n);
  return out;
}

// Bytes of a cache directory's entries.
uint64_t entries_total(const std::string& dir) {
  uint64_t total = 0;
  for (const auto& n : entry_files(dir)) total += fs::file_size(dir + "/entries/" + n);
  return total;
}

// A DiskCache request of its own key, and a stand-in binary, for tests of the disk level alone.
DiskCache::Request fake_request(const std::string& name) {
  DiskCache::Request r;
  r.preimage = name + " preimage\n";
  r.key = sha256_hex(r.preimage);
  r.kernel = r.describe = name;
  return r;
}

KernelBinary fake_binary() {
  KernelBinary b;
  b.cubin.assign(1000, 'x');
  return b;
}

std::vector<cache::Problem> verify_dir(const std::string& dir) {
  DiskCache d(dir, 0, 10);
  return d.verify(false);
}

std::string problems_text(const std::vector<cache::Problem>& ps) {
  std::string s;
  for (const auto& p : ps) s += p.path + ": " + p.what + "\n";
  return s;
}

// Counts compiles; otherwise real_compile.
struct CountingCompile {
  std::atomic<int> calls{0};
  CompileFn fn() {
    return [this](const KernelRequest& r) {
      calls++;
      return real_compile(r);
    };
  }
};

bool is_root() { return ::geteuid() == 0; }

// ---- SHA-256 ----------------------------------------------------------------------------------

TEST(Sha256, NistVectors) {
  for (bool portable : {false, true}) {
    sha256_force_portable(portable);
    EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    EXPECT_EQ(sha256_hex("abc"),
              "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
              "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    EXPECT_EQ(sha256_hex("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmn"
                         "hijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu"),
              "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
    EXPECT_EQ(sha256_hex(std::string(1000000, 'a')),
              "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  }
  sha256_force_portable(false);
}

TEST(Sha256, IncrementalSplitsAndBothPathsAgree) {
  std::mt19937 rng(7);
  for (size_t n : {0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 4097}) {
    std::string data(n, '\0');
    for (char& c : data) c = static_cast<char>(rng());
    sha256_force_portable(true);
    const std::string want = sha256_hex(data);
    sha256_force_portable(false);
    EXPECT_EQ(sha256_hex(data), want) << n;
    for (size_t split = 0; split <= n; split += std::max<size_t>(1, n / 13)) {
      Sha256 h;
      h.update(data.data(), split);
      h.update(data.data() + split, n - split);
      EXPECT_EQ(h.finish_hex(), want) << n << " split " << split;
    }
  }
  EXPECT_TRUE(is_sha256_hex(std::string(64, 'a')));
  EXPECT_FALSE(is_sha256_hex(std::string(64, 'A')));
  EXPECT_FALSE(is_sha256_hex("../../etc/passwd"));
}

// ---- key --------------------------------------------------------------------------------------

KeyContext fixed_context() {
  KeyContext c;
  c.moejit_version = "0.1.0";
  c.nvrtc_major = 13;
  c.nvrtc_minor = 0;
  c.nvrtc_build = "gnu-build-id:00112233";
  c.templates_sha256 = std::string(64, '7');
  return c;
}

TEST(CacheKey, EveryInputChangesTheKey) {
  const KernelRequest base = tiny_request(1);
  const KeyContext ctx = fixed_context();
  const std::string k = cache_key(base, ctx);
  EXPECT_TRUE(is_sha256_hex(k));
  EXPECT_EQ(cache_key(base, ctx), k) << "deterministic";

  std::set<std::string> keys = {k};
  auto differs = [&](const KernelRequest& r, const KeyContext& c, const char* what) {
    const std::string other = cache_key(r, c);
    EXPECT_TRUE(keys.insert(other).second) << what << " did not change the key";
  };
  KeyContext c = ctx;
  c.nvrtc_major = 12;
  differs(base, c, "NVRTC major");
  c = ctx;
  c.nvrtc_minor = 1;
  differs(base, c, "NVRTC minor");
  c = ctx;
  c.nvrtc_build = "gnu-build-id:00112234";
  differs(base, c, "NVRTC build");
  c = ctx;
  c.moejit_version = "0.1.1";
  differs(base, c, "moejit version");
  c = ctx;
  c.templates_sha256 = std::string(64, '8');
  differs(base, c, "template content");
  KernelRequest r = base;
  r.source += " ";
  differs(r, ctx, "source");
  r = base;
  r.arch = "sm_90";
  r.options = compiler::nvrtc_options("sm_90", false);
  differs(r, ctx, "arch sm_90 vs sm_90a");
  r = base;
  r.arch = "sm_100f";
  differs(r, ctx, "arch suffix f");
  r = base;
  r.options.push_back("-lineinfo");
  differs(r, ctx, "options");
  r = base;
  r.entry = "moejit_other";
  differs(r, ctx, "entry");

  // The plan name is only a label: equal kernels share an entry.
  r = base;
  r.name = "renamed";
  EXPECT_EQ(cache_key(r, ctx), k);
}

TEST(CacheKey, PreimageHoldsNoPathAndNamesTheVersions) {
  const KeyContext& ctx = KeyContext::current();
  EXPECT_EQ(ctx.moejit_version, version());
  EXPECT_GE(ctx.nvrtc_major, 11);
  EXPECT_FALSE(ctx.nvrtc_build.empty());
  EXPECT_NE(ctx.nvrtc_build, "unknown");
  EXPECT_TRUE(is_sha256_hex(ctx.templates_sha256));
  for (const auto& req : preset_requests("seed-test", 16)) {
    const std::string p = key_preimage(req, ctx);
    EXPECT_EQ(p.find('/'), std::string::npos) << "a path entered the key:\n" << p;
    EXPECT_THAT(p, HasSubstr(fmt::format("nvrtc {}.{} {}", ctx.nvrtc_major, ctx.nvrtc_minor,
                                         ctx.nvrtc_build)));
    EXPECT_THAT(p, HasSubstr("moejit " + std::string(version())));
    EXPECT_THAT(p, HasSubstr("arch sm_90a\n"));
    EXPECT_EQ(preimage_field(p, "arch"), "sm_90a");
  }
  std::printf("key context: moejit %s, nvrtc %d.%d %s, templates %s\n", ctx.moejit_version.c_str(),
              ctx.nvrtc_major, ctx.nvrtc_minor, ctx.nvrtc_build.c_str(),
              ctx.templates_sha256.substr(0, 16).c_str());
}

TEST(CacheKey, RejectsMalformedArchEntryAndOptions) {
  const KeyContext ctx = fixed_context();
  for (const char* arch : {"sm_9", "sm_90b", "sm_90a --x", "compute_90", "sm_90a\n", ""}) {
    KernelRequest r = tiny_request(1);
    r.arch = arch;
    try {
      cache_key(r, ctx);
      ADD_FAILURE() << "accepted arch '" << arch << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
      EXPECT_THAT(e.what(), HasSubstr("sm_90a"));
    }
  }
  for (const char* opt : {"-I/usr/local/cuda/include", "-DX=1 -DY=2", "-DX\noption -Z", "noDash"}) {
    KernelRequest r = tiny_request(1);
    r.options.push_back(opt);
    try {
      cache_key(r, ctx);
      ADD_FAILURE() << "accepted option '" << opt << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Internal);
      EXPECT_THAT(e.what(), HasSubstr("cache key"));
    }
  }
  KernelRequest r = tiny_request(1);
  r.entry = "evil/../../x";
  EXPECT_THROW(cache_key(r, ctx), Error);
}

// ---- entry format -----------------------------------------------------------------------------

EntryContents sample_entry() {
  EntryContents e;
  e.preimage = key_preimage(tiny_request(3), fixed_context());
  e.key = sha256_hex(e.preimage);
  e.kernel = "tiny3";
  for (int i = 0; i < 700; ++i) e.cubin.push_back(static_cast<char>(i * 37));
  e.log = "ptxas info    : Used 8 registers\n";
  e.compile_ms = 12.5;
  return e;
}

TEST(CacheEntry, RoundTrips) {
  const EntryContents e = sample_entry();
  const std::string bytes = encode_entry(e);
  EntryContents back;
  std::string problem;
  ASSERT_TRUE(decode_entry(bytes, e.key, &back, &problem)) << problem;
  EXPECT_EQ(back.key, e.key);
  EXPECT_EQ(back.kernel, e.kernel);
  EXPECT_EQ(back.preimage, e.preimage);
  EXPECT_EQ(back.cubin, e.cubin);
  EXPECT_EQ(back.log, e.log);
  EXPECT_DOUBLE_EQ(back.compile_ms, e.compile_ms);
  EXPECT_FALSE(decode_entry(bytes, std::string(64, '0'), nullptr, &problem));
  EXPECT_THAT(problem, HasSubstr("stored under key"));
}

TEST(CacheEntry, EveryBitFlipAndTruncationIsDetected) {
  const EntryContents e = sample_entry();
  const std::string bytes = encode_entry(e);
  std::string problem;
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (int bit : {0, 5}) {
      std::string bad = bytes;
      bad[i] = static_cast<char>(bad[i] ^ (1 << bit));
      EXPECT_FALSE(decode_entry(bad, e.key, nullptr, &problem)) << "flip of byte " << i;
    }
  }
  for (size_t n = 0; n < bytes.size(); ++n)
    EXPECT_FALSE(decode_entry(bytes.substr(0, n), e.key, nullptr, &problem)) << "length " << n;
  EXPECT_FALSE(decode_entry(bytes + "x", e.key, nullptr, &problem));
  EXPECT_THAT(problem, HasSubstr("padded"));
  EXPECT_FALSE(decode_entry("", e.key, nullptr, &problem));
  EXPECT_EQ(problem, "is empty");
}

// ---- environment ------------------------------------------------------------------------------

class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    had_ = std::getenv(name) != nullptr;
    if (value)
      ::setenv(name, value, 1);
    else
      ::unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_)
      ::setenv(name_.c_str(), old_.c_str(), 1);
    else
      ::unsetenv(name_.c_str());
  }

 private:
  std::string name_, old_;
  bool had_ = false;
};

TEST(CacheEnv, TypedGettersAndDefaults) {
  {
    ScopedEnv a("MOEJIT_CACHE_DIR", nullptr), b("XDG_CACHE_HOME", "/xdg"), c("HOME", "/home/u");
    EXPECT_EQ(cache::settings_from_env().directory, "/xdg/moejit");
  }
  {
    ScopedEnv a("MOEJIT_CACHE_DIR", nullptr), b("XDG_CACHE_HOME", nullptr), c("HOME", "/home/u");
    EXPECT_EQ(cache::settings_from_env().directory, "/home/u/.cache/moejit");
  }
  {
    ScopedEnv a("MOEJIT_CACHE_DIR", "/c"), b("MOEJIT_CACHE_MAX_BYTES", "4G"),
        c("MOEJIT_JIT", "off"), d("MOEJIT_CACHE_LOCK_TIMEOUT_S", "2.5");
    const cache::Settings s = cache::settings_from_env();
    EXPECT_EQ(s.directory, "/c");
    EXPECT_EQ(s.max_bytes, uint64_t(4) << 30);
    EXPECT_FALSE(s.jit);
    EXPECT_DOUBLE_EQ(s.lock_timeout_s, 2.5);
  }
  {
    ScopedEnv a("MOEJIT_CACHE_MAX_BYTES", "12X");
    try {
      cache::settings_from_env();
      ADD_FAILURE() << "accepted 12X";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
      EXPECT_THAT(e.what(), HasSubstr("MOEJIT_CACHE_MAX_BYTES = '12X'"));
    }
  }
  {
    ScopedEnv a("MOEJIT_JIT", "maybe");
    EXPECT_THROW(cache::settings_from_env(), Error);
  }
  EXPECT_EQ(parse_byte_count("512M", "x"), uint64_t(512) << 20);
  EXPECT_EQ(parse_byte_count("100", "x"), 100u);
  EXPECT_THROW(parse_byte_count("99999999999999999999", "x"), Error);
  EXPECT_THROW(parse_byte_count("-1", "x"), Error);
}

// ---- memory level -----------------------------------------------------------------------------

TEST(CacheMemory, SingleFlightAcrossThreads) {
  KernelCache cache(settings_for(""));
  std::atomic<int> calls{0};
  const KernelRequest req = tiny_request(11);
  auto compile = [&](const KernelRequest& r) {
    calls++;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    return real_compile(r);
  };
  std::vector<std::shared_ptr<const KernelBinary>> got(8);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) threads.emplace_back([&, t] { got[t] = cache.get(req, compile); });
  for (auto& t : threads) t.join();
  EXPECT_EQ(calls.load(), 1);
  int compiled = 0;
  for (const auto& b : got) {
    ASSERT_TRUE(b);
    EXPECT_EQ(b->cubin, got[0]->cubin);
    compiled += b->compile_ms > 0;
  }
  EXPECT_EQ(compiled, 1) << "only the compiling caller sees compile_ms > 0";
  const cache::Counters c = cache.counters();
  EXPECT_EQ(c.compiles, 1u);
  EXPECT_EQ(c.memory_hits, 7u);
}

TEST(CacheMemory, FailedCompilePropagatesToEveryWaiterAndIsNeverPublished) {
  TempDir dir;
  KernelCache cache(settings_for(dir.path()));
  const KernelRequest req = tiny_request(12);
  std::atomic<int> calls{0};
  auto failing = [&](const KernelRequest&) -> KernelBinary {
    calls++;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    throw Error(ErrorKind::Compile, "NVRTC failed to compile kernel 'tiny12': boom");
  };
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      try {
        cache.get(req, failing);
      } catch (const Error& e) {
        if (e.kind() == ErrorKind::Compile &&
            std::string(e.what()).find("boom") != std::string::npos)
          errors++;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(calls.load(), 1);
  EXPECT_EQ(errors.load(), 4);
  EXPECT_TRUE(entry_files(dir.path()).empty());
  for (const auto& n : files_in(dir / "entries")) ADD_FAILURE() << "left behind: " << n;
  // Not remembered: the next call compiles again.
  CountingCompile good;
  EXPECT_TRUE(cache.get(req, good.fn()));
  EXPECT_EQ(good.calls.load(), 1);
  EXPECT_EQ(entry_files(dir.path()).size(), 1u);
  EXPECT_EQ(cache.counters().failed_compiles, 1u);
}

TEST(CacheMemory, LookupCost) {
  KernelCache cache(settings_for(""));
  const auto reqs = preset_requests("seed-test", 16);
  CountingCompile cc;
  for (const auto& r : reqs) cache.get(r, cc.fn());
  const int n = 20000;
  const auto t = Clock::now();
  for (int i = 0; i < n; ++i) cache.get(reqs[static_cast<size_t>(i) % reqs.size()], cc.fn());
  const double us = std::chrono::duration<double, std::micro>(Clock::now() - t).count() / n;
  EXPECT_EQ(cc.calls.load(), static_cast<int>(reqs.size()));
  size_t bytes = 0;
  for (const auto& r : reqs) bytes += r.source.size();
  std::printf("KernelCache::get memory hit: %.2f us (sources of %zu bytes on average)\n", us,
              bytes / reqs.size());
}

// ---- disk level: one process ------------------------------------------------------------------

TEST(CacheDisk, PublishesPrivatelyAndLoadsWithoutCompiling) {
  TempDir tmp;
  const std::string dir = tmp / "a/b/cache";  // missing parents are created too
  const KernelRequest req = tiny_request(21);
  CountingCompile first, second;
  std::shared_ptr<const KernelBinary> compiled;
  {
    KernelCache a(settings_for(dir));
    compiled = a.get(req, first.fn());
  }
  EXPECT_EQ(first.calls.load(), 1);
  EXPECT_GT(compiled->compile_ms, 0);
  for (const std::string& d :
       {tmp / "a", tmp / "a/b", dir, dir + "/entries", dir + "/locks", dir + "/quarantine"}) {
    struct stat st {};
    ASSERT_EQ(::stat(d.c_str(), &st), 0) << d;
    EXPECT_EQ(st.st_mode & 0777, 0700u) << d;
  }
  const auto entries = entry_files(dir);
  ASSERT_EQ(entries.size(), 1u);
  EXPECT_EQ(entries[0], KernelCache(settings_for("")).key(req) + ".entry");
  struct stat st {};
  ASSERT_EQ(::stat((dir + "/entries/" + entries[0]).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  KernelCache b(settings_for(dir));
  auto loaded = b.get(req, second.fn());
  EXPECT_EQ(second.calls.load(), 0);
  EXPECT_EQ(loaded->cubin, compiled->cubin);
  EXPECT_EQ(loaded->compile_log, compiled->compile_log);
  EXPECT_EQ(loaded->compile_ms, 0);
  EXPECT_EQ(b.counters().disk_hits, 1u);
  EXPECT_TRUE(verify_dir(dir).empty());
}

struct Damage {
  const char* name;
  std::function<bool(const std::string& path)> apply;  // false: cannot be done here (skip)
  const char* expect;                                  // in the problem text
};

std::vector<Damage> damages() {
  return {
      {"truncated",
       [](const std::string& p) { return ::truncate(p.c_str(), fs::file_size(p) / 2) == 0; }, ""},
      {"truncated-by-one",
       [](const std::string& p) { return ::truncate(p.c_str(), fs::file_size(p) - 1) == 0; },
       "truncated"},
      {"emptied", [](const std::string& p) { return ::truncate(p.c_str(), 0) == 0; }, "empty"},
      {"bit-flip-in-cubin",
       [](const std::string& p) {
         std::string t = read_text(p);
         t[t.size() / 2] ^= 0x10;
         write_text(p, t);
         return true;
       },
       "checksum"},
      {"bit-flip-in-manifest",
       [](const std::string& p) {
         std::string t = read_text(p);
         t[t.find("kernel ") + 8] ^= 0x01;
         write_text(p, t);
         return true;
       },
       "checksum"},
      {"bit-flip-in-last-byte",
       [](const std::string& p) {
         std::string t = read_text(p);
         t.back() ^= 0x01;
         write_text(p, t);
         return true;
       },
       "checksum"},
      {"garbage",
       [](const std::string& p) {
         write_text(p, std::string(5000, 'z'));
         return true;
       },
       "manifest"},
      {"foreign-owned",
       [](const std::string& p) {
         return is_root() && ::chown(p.c_str(), kOtherUid, kOtherUid) == 0;
       },
       "not by you"},
      {"group-writable", [](const std::string& p) { return ::chmod(p.c_str(), 0620) == 0; },
       "group- or world-writable"},
      {"world-writable", [](const std::string& p) { return ::chmod(p.c_str(), 0606) == 0; },
       "group- or world-writable"},
      {"symlink",
       [](const std::string& p) {
         const std::string target =
             (fs::path(p).parent_path().parent_path() / "elsewhere").string();
         return ::rename(p.c_str(), target.c_str()) == 0 &&
                ::symlink(target.c_str(), p.c_str()) == 0;
       },
       "symbolic link"},
  };
}

TEST(CacheDisk, DamagedOrUntrustedEntriesAreQuarantinedAndRecompiled) {
  const KernelRequest req = tiny_request(22);
  for (const Damage& d : damages()) {
    SCOPED_TRACE(d.name);
    TempDir tmp;
    const std::string dir = tmp.path();
    CountingCompile first, second;
    std::vector<char> good;
    {
      KernelCache a(settings_for(dir));
      good = a.get(req, first.fn())->cubin;
    }
    const std::string path = dir + "/entries/" + entry_files(dir).at(0);
    if (!d.apply(path)) {
      std::printf("[ skipped damage '%s': needs root ]\n", d.name);
      continue;
    }
    const auto problems = verify_dir(dir);
    ASSERT_EQ(problems.size(), 1u) << problems_text(problems);
    EXPECT_THAT(problems[0].what, HasSubstr(d.expect));

    testing::internal::CaptureStderr();
    KernelCache b(settings_for(dir));
    auto bin = b.get(req, second.fn());
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_EQ(second.calls.load(), 1) << "a bad entry must be recompiled, never loaded";
    EXPECT_EQ(bin->cubin, good);
    EXPECT_EQ(count_substr(err, "moejit: cache:"), 1) << err;
    EXPECT_THAT(err, HasSubstr("quarantine"));
    EXPECT_THAT(err, HasSubstr(d.expect));
    EXPECT_EQ(files_in(dir + "/quarantine").size(), 1u);
    EXPECT_EQ(b.counters().quarantined, 1u);
    EXPECT_TRUE(verify_dir(dir).empty()) << "the recompiled entry replaced it";
  }
}

TEST(CacheDisk, VerifyFixQuarantinesAndListShowsProblems) {
  TempDir tmp;
  const auto reqs = std::vector<KernelRequest>{tiny_request(23), tiny_request(24)};
  {
    KernelCache a(settings_for(tmp.path()));
    CountingCompile cc;
    ASSERT_EQ(get_all(a, reqs, cc.fn()), 0);
  }
  const auto names = entry_files(tmp.path());
  ASSERT_EQ(names.size(), 2u);
  ::truncate((tmp / "entries/" + names[0]).c_str(), 100);
  DiskCache d(tmp.path(), 0, 10);
  const auto listed = d.list();
  ASSERT_EQ(listed.size(), 2u);
  int bad = 0;
  for (const auto& e : listed) bad += !e.problem.empty();
  EXPECT_EQ(bad, 1);
  testing::internal::CaptureStderr();
  EXPECT_EQ(d.verify(true).size(), 1u);
  testing::internal::GetCapturedStderr();
  EXPECT_TRUE(d.verify(false).empty());
  EXPECT_EQ(entry_files(tmp.path()).size(), 1u);
  EXPECT_EQ(files_in(tmp / "quarantine").size(), 1u);
}

TEST(CacheDisk, InsecureDirectoryIsRefusedWithOneWarning) {
  TempDir tmp;
  ASSERT_EQ(::chmod(tmp.path().c_str(), 0777), 0);
  testing::internal::CaptureStderr();
  KernelCache c(settings_for(tmp.path()));
  CountingCompile cc;
  EXPECT_TRUE(c.get(tiny_request(25), cc.fn()));
  EXPECT_TRUE(c.get(tiny_request(26), cc.fn()));
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(count_substr(err, "warning"), 1) << err;
  EXPECT_THAT(err, HasSubstr("chmod 700"));
  EXPECT_EQ(c.disk()->mode(), DiskCache::Mode::Off);
  EXPECT_FALSE(fs::exists(tmp / "entries"));
}

TEST(CacheDisk, JitOffMakesAMissAnErrorNamingTheKernel) {
  TempDir tmp;
  const KernelRequest present = tiny_request(27), missing = tiny_request(28);
  {
    KernelCache warm(settings_for(tmp.path()));
    CountingCompile cc;
    warm.get(present, cc.fn());
  }
  cache::Settings s;
  {
    ScopedEnv a("MOEJIT_JIT", "off"), b("MOEJIT_CACHE_DIR", tmp.path().c_str());
    s = cache::settings_from_env();
  }
  ASSERT_FALSE(s.jit);
  KernelCache c(s);
  CountingCompile cc;
  EXPECT_TRUE(c.get(present, cc.fn())) << "hits still load";
  try {
    c.get(missing, cc.fn());
    ADD_FAILURE() << "a miss compiled with MOEJIT_JIT=off";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Cache);
    EXPECT_THAT(e.what(), HasSubstr("kernel 'tiny28'"));
    EXPECT_THAT(e.what(), HasSubstr("MOEJIT_JIT=off"));
    EXPECT_THAT(e.what(), HasSubstr("moejit warmup"));
  }
  EXPECT_EQ(cc.calls.load(), 0);
}

TEST(CacheDisk, LockHeldTooLongMakesTheWaiterCompileItself) {
  TempDir tmp;
  const KernelRequest req = tiny_request(29);
  KernelCache c(settings_for(tmp.path(), /*lock_timeout_s=*/0.5));
  const std::string lock = tmp / ("locks/" + c.key(req) + ".lock");
  ASSERT_EQ(c.disk()->mode(), DiskCache::Mode::ReadWrite);
  const int fd = ::open(lock.c_str(), O_RDWR | O_CREAT, 0600);
  ASSERT_EQ(::flock(fd, LOCK_EX), 0);  // a stuck compiler (another open file description)
  CountingCompile cc;
  testing::internal::CaptureStderr();
  const auto t = Clock::now();
  EXPECT_TRUE(c.get(req, cc.fn()));
  const double s = std::chrono::duration<double>(Clock::now() - t).count();
  const std::string err = testing::internal::GetCapturedStderr();
  ::close(fd);
  EXPECT_GE(s, 0.5);
  EXPECT_LT(s, 10);
  EXPECT_EQ(cc.calls.load(), 1);
  EXPECT_THAT(err, HasSubstr("MOEJIT_CACHE_LOCK_TIMEOUT_S"));
  EXPECT_EQ(c.counters().lock_timeouts, 1u);
  EXPECT_EQ(entry_files(tmp.path()).size(), 1u) << "published without the lock";
}

TEST(CacheDisk, LockOfAKilledProcessIsReleased) {
  TempDir tmp;
  const KernelRequest req = tiny_request(30);
  KernelCache c(settings_for(tmp.path(), 60));
  const std::string lock = tmp / ("locks/" + c.key(req) + ".lock");
  ASSERT_EQ(c.disk()->mode(), DiskCache::Mode::ReadWrite);
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t holder = spawn([&] {
    const int fd = ::open(lock.c_str(), O_RDWR | O_CREAT, 0600);
    ::flock(fd, LOCK_EX);
    if (::write(ready[1], "x", 1) != 1) return 1;
    ::pause();
    return 0;
  });
  char b;
  ASSERT_EQ(::read(ready[0], &b, 1), 1);
  ::kill(holder, SIGKILL);
  wait_status(holder);
  CountingCompile cc;
  const auto t = Clock::now();
  EXPECT_TRUE(c.get(req, cc.fn()));
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t).count(), 5);
  ::close(ready[0]);
  ::close(ready[1]);
}

TEST(CacheDisk, PruneIsLeastRecentlyUsedFirstAndSkipsEntriesBeingLoaded) {
  TempDir tmp;
  std::vector<KernelRequest> reqs;
  for (int i = 0; i < 4; ++i) reqs.push_back(tiny_request(40 + i));
  KernelCache c(settings_for(tmp.path()));
  CountingCompile cc;
  ASSERT_EQ(get_all(c, reqs, cc.fn(), 1), 0);
  // Last use: reqs[i] at now - (4 - i) hours.
  const std::time_t now = std::time(nullptr);
  uint64_t each = 0;
  for (int i = 0; i < 4; ++i) {
    const std::string p = tmp / ("entries/" + c.key(reqs[i]) + ".entry");
    const timespec ts[2] = {{now - (4 - i) * 3600, 0}, {now - (4 - i) * 3600, 0}};
    ASSERT_EQ(::utimensat(AT_FDCWD, p.c_str(), ts, 0), 0);
    each = std::max<uint64_t>(each, fs::file_size(p));
  }
  DiskCache d(tmp.path(), 0, 10);
  const auto listed = d.list();
  ASSERT_EQ(listed.size(), 4u);
  EXPECT_EQ(listed[0].key, c.key(reqs[0])) << "list is least recently used first";

  // The oldest entry is being loaded by someone: prune leaves it and takes the next ones.
  auto pin = d.pin(c.key(reqs[0]));
  const cache::PruneResult r = DiskCache(tmp.path(), 0, 10).prune(2 * each);
  EXPECT_EQ(r.busy, 1u);
  EXPECT_EQ(r.removed, 2u);
  std::set<std::string> left;
  for (const auto& n : entry_files(tmp.path())) left.insert(n.substr(0, 64));
  EXPECT_EQ(left, (std::set<std::string>{c.key(reqs[0]), c.key(reqs[3])}));
  pin.reset();
  EXPECT_EQ(DiskCache(tmp.path(), 0, 10).clear().kept, 0u);
  EXPECT_TRUE(entry_files(tmp.path()).empty());
}

TEST(CacheDisk, MaxBytesEvictsAfterPublishing) {
  TempDir tmp;
  cache::Settings s = settings_for(tmp.path());
  std::vector<KernelRequest> reqs;
  for (int i = 0; i < 5; ++i) reqs.push_back(tiny_request(50 + i));
  uint64_t one = 0;
  {
    KernelCache probe(settings_for(tmp / "probe"));
    CountingCompile cc;
    probe.get(reqs[0], cc.fn());
    one = fs::file_size(tmp / "probe/entries/" + entry_files(tmp / "probe").at(0));
  }
  s.max_bytes = one * 5 / 2;  // room for two entries
  KernelCache c(s);
  CountingCompile cc;
  ASSERT_EQ(get_all(c, reqs, cc.fn(), 1), 0);
  EXPECT_LE(entries_total(tmp.path()), s.max_bytes);
  EXPECT_EQ(entry_files(tmp.path()).size(), 2u);
  EXPECT_TRUE(fs::exists(tmp / ("entries/" + c.key(reqs[4]) + ".entry"))) << "newest stays";
}

TEST(CacheDisk, ExportImportVerifiesEveryEntry) {
  TempDir a, b, c;
  const auto reqs = preset_requests("seed-test", 16);
  {
    KernelCache k(settings_for(a.path()));
    CountingCompile cc;
    ASSERT_EQ(get_all(k, reqs, cc.fn()), 0);
  }
  const std::string archive = c / "warm.moejit";
  EXPECT_EQ(DiskCache(a.path(), 0, 10).export_to(archive), reqs.size());

  DiskCache into(b.path(), 0, 10);
  cache::ImportResult r = into.import_from(archive);
  EXPECT_EQ(r.imported, reqs.size());
  EXPECT_TRUE(r.rejected.empty()) << problems_text(r.rejected);
  EXPECT_EQ(into.import_from(archive).already_present, reqs.size());
  {
    KernelCache k(settings_for(b.path()));
    CountingCompile cc;
    ASSERT_EQ(get_all(k, reqs, cc.fn()), 0);
    EXPECT_EQ(cc.calls.load(), 0) << "imported entries load";
  }

  // A damaged archive: the damaged entry is rejected, the others are imported.
  std::string text = read_text(archive);
  const size_t second = text.find("\nentry ", text.find("\nentry ") + 1);
  ASSERT_NE(second, std::string::npos);
  text[second - 100] ^= 0x04;  // inside the first entry's payload
  write_text(archive, text);
  TempDir d;
  r = DiskCache(d.path(), 0, 10).import_from(archive);
  EXPECT_EQ(r.imported, reqs.size() - 1);
  ASSERT_EQ(r.rejected.size(), 1u);
  EXPECT_THAT(r.rejected[0].what, HasSubstr("checksum"));
  EXPECT_TRUE(verify_dir(d.path()).empty());

  write_text(archive, text.substr(0, text.size() / 2));
  TempDir e;
  r = DiskCache(e.path(), 0, 10).import_from(archive);
  EXPECT_FALSE(r.rejected.empty());
  EXPECT_TRUE(verify_dir(e.path()).empty());

  write_text(archive, "not an archive\n");
  EXPECT_THROW(DiskCache(e.path(), 0, 10).import_from(archive), Error);
}

TEST(CachePublicApi, AdministersTheDirectorySetForTheProcess) {
  TempDir tmp;
  const std::string dir = tmp / "cache";
  cache::set_directory(dir);
  EXPECT_EQ(cache::directory(), dir);
  CountingCompile cc;
  ASSERT_TRUE(KernelCache::global().get(tiny_request(90), cc.fn()));
  ASSERT_TRUE(KernelCache::global().get(tiny_request(90), cc.fn()));
  EXPECT_EQ(cc.calls.load(), 1);
  const auto entries = cache::list();
  ASSERT_EQ(entries.size(), 1u);
  EXPECT_EQ(entries[0].kernel, "tiny90");
  EXPECT_EQ(entries[0].arch, "sm_90a");
  EXPECT_EQ(entries[0].moejit_version, version());
  EXPECT_TRUE(entries[0].problem.empty());
  const cache::Stats st = cache::stats();
  EXPECT_EQ(st.directory, dir);
  EXPECT_EQ(st.mode, "read-write");
  EXPECT_EQ(st.entries, 1u);
  EXPECT_EQ(st.bytes, entries[0].bytes);
  EXPECT_GE(st.this_process.compiles, 1u);
  EXPECT_GE(st.this_process.memory_hits, 1u);
  EXPECT_GE(st.all_processes.compiles, 1u) << "compiles reach DIR/stats at once";
  EXPECT_TRUE(cache::verify().empty());
  const std::string archive = tmp / "a.moejit";
  EXPECT_EQ(cache::export_to(archive), 1u);
  EXPECT_EQ(cache::clear().removed, 1u);
  EXPECT_TRUE(cache::list().empty());
  EXPECT_EQ(cache::import_from(archive).imported, 1u);
  EXPECT_EQ(cache::list().size(), 1u);
  EXPECT_EQ(cache::prune(0).removed, 1u);
  EXPECT_EQ(cache::parse_bytes("2K"), 2048u);
  cache::clear_memory();
  cache::set_directory("");  // memory only for the rest of this process
}

// ---- read-only directory and full disk (children: privileges, limits and mounts) ----------------

// In a child: loads `present`, compiles `missing`, and checks nothing new was written.
int use_cache_without_writing(const std::string& dir, const KernelRequest& present,
                              const std::vector<KernelRequest>& missing) {
  const auto before = files_in(dir + "/entries");
  KernelCache c(settings_for(dir));
  CountingCompile cc;
  if (!c.get(present, cc.fn())) return 10;
  if (cc.calls.load() != 0) return 11;  // the valid entry loads
  for (const auto& r : missing)
    if (!c.get(r, cc.fn())) return 12;
  if (cc.calls.load() != static_cast<int>(missing.size())) return 13;
  if (files_in(dir + "/entries") != before) return 14;
  return 0;
}

TEST(CacheDisk, ReadOnlyDirectoryIsMemoryOnlyWithOneWarning) {
  TempDir tmp;
  const std::string dir = tmp / "cache";
  const KernelRequest present = tiny_request(60);
  const std::vector<KernelRequest> missing = {tiny_request(61), tiny_request(62)};
  {
    KernelCache warm(settings_for(dir));
    CountingCompile cc;
    warm.get(present, cc.fn());
  }
  const std::string err_file = tmp / "stderr";
  bool ran = false;
  if (is_root()) {
    ASSERT_EQ(::chmod(tmp.path().c_str(), 0711), 0);  // nobody may pass through
    // As an unprivileged owner of a 0500 directory (root would bypass the mode bits).
    for (const auto& e : fs::recursive_directory_iterator(dir))
      ASSERT_EQ(::lchown(e.path().c_str(), kOtherUid, kOtherUid), 0);
    ASSERT_EQ(::chown(dir.c_str(), kOtherUid, kOtherUid), 0);
    for (const char* sub : {"", "/entries", "/locks", "/quarantine"})
      ASSERT_EQ(::chmod((dir + sub).c_str(), 0500), 0);
    const int rc = run_child(
        [&] {
          if (::setgid(kOtherUid) != 0 || ::setuid(kOtherUid) != 0) return 20;
          if (::access(dir.c_str(), X_OK) != 0) return 78;  // TMPDIR not reachable by nobody
          return use_cache_without_writing(dir, present, missing);
        },
        err_file);
    if (rc == 78) {
      std::printf("[ setuid variant skipped: %s is not reachable by uid %d ]\n", dir.c_str(),
                  kOtherUid);
    } else {
      EXPECT_EQ(rc, 0) << read_text(err_file);
      const std::string err = read_text(err_file);
      EXPECT_EQ(count_substr(err, "warning"), 1) << err;
      EXPECT_THAT(err, HasSubstr("cannot store new kernels"));
      ran = true;
    }
    for (const char* sub : {"", "/entries", "/locks", "/quarantine"})
      ::chmod((dir + sub).c_str(), 0700);
    for (const auto& e : fs::recursive_directory_iterator(dir)) ::lchown(e.path().c_str(), 0, 0);
    ::chown(dir.c_str(), 0, 0);
  }
  // A read-only bind mount (EROFS), where mounts are allowed.
  const int rc = run_child(
      [&] {
        if (::unshare(CLONE_NEWNS) != 0 ||
            ::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
            ::mount(dir.c_str(), dir.c_str(), nullptr, MS_BIND, nullptr) != 0 ||
            ::mount(nullptr, dir.c_str(), nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY, nullptr) != 0)
          return 77;
        return use_cache_without_writing(dir, present, missing);
      },
      err_file);
  if (rc == 77) {
    std::printf("[ read-only bind mount variant skipped: mounts not permitted ]\n");
  } else {
    EXPECT_EQ(rc, 0) << read_text(err_file);
    const std::string err = read_text(err_file);
    EXPECT_EQ(count_substr(err, "warning"), 1) << err;
    EXPECT_THAT(err, HasSubstr("Read-only file system"));
    ran = true;
  }
  if (!ran) GTEST_SKIP() << "needs root (setuid) or mount permission";
}

TEST(CacheDisk, FullDiskIsMemoryOnlyWithOneWarningAndLeavesNoPartialFile) {
  TempDir tmp;
  const auto reqs = preset_requests("seed-test", 16);
  const std::string err_file = tmp / "stderr";
  // RLIMIT_FSIZE: writes past 4 KiB fail with EFBIG (entries are ~20 KiB).
  const std::string dir = tmp / "fsize";
  int rc = run_child(
      [&] {
        ::signal(SIGXFSZ, SIG_IGN);
        const rlimit lim{4096, 4096};
        if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) return 20;
        KernelCache c(settings_for(dir));
        CountingCompile cc;
        if (get_all(c, reqs, cc.fn()) != 0) return 21;
        return cc.calls.load() == static_cast<int>(reqs.size()) ? 0 : 22;
      },
      err_file);
  EXPECT_EQ(rc, 0) << read_text(err_file);
  std::string err = read_text(err_file);
  EXPECT_EQ(count_substr(err, "warning"), 1) << err;
  EXPECT_THAT(err, HasSubstr("File too large"));
  EXPECT_TRUE(files_in(dir + "/entries").empty()) << "no entry and no temporary is left";

  // A full tmpfs (ENOSPC), where mounts are allowed.
  const std::string mnt = tmp / "tmpfs";
  fs::create_directories(mnt);
  rc = run_child(
      [&] {
        if (::unshare(CLONE_NEWNS) != 0 ||
            ::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
            ::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=256k,mode=0700") != 0)
          return 77;
        const std::string dir2 = mnt + "/cache";
        {
          KernelCache warm(settings_for(dir2));
          CountingCompile cc;
          if (!warm.get(reqs[0], cc.fn())) return 30;  // one entry fits
        }
        // Fill the rest of the filesystem.
        const int fd = ::open((mnt + "/filler").c_str(), O_WRONLY | O_CREAT, 0600);
        const std::string block(4096, 'f');
        while (::write(fd, block.data(), block.size()) > 0) {
        }
        ::close(fd);
        const auto before = files_in(dir2 + "/entries");
        KernelCache c(settings_for(dir2));
        CountingCompile cc;
        if (get_all(c, reqs, cc.fn()) != 0) return 31;
        if (cc.calls.load() != static_cast<int>(reqs.size()) - 1) return 32;  // reqs[0] loads
        if (files_in(dir2 + "/entries") != before) return 33;
        return 0;
      },
      err_file);
  if (rc == 77) {
    std::printf("[ full tmpfs variant skipped: mounts not permitted ]\n");
  } else {
    EXPECT_EQ(rc, 0) << read_text(err_file);
    err = read_text(err_file);
    EXPECT_EQ(count_substr(err, "warning"), 1) << err;
    EXPECT_THAT(err, HasSubstr("No space left on device"));
  }
}

// ---- many processes ---------------------------------------------------------------------------

void sleep_when_missing(const char* step) {
  if (std::strcmp(step, "missing") == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
}

TEST(CacheProcesses, SixteenColdProcessesCompileEachKernelOnce) {
  TempDir tmp;
  const std::string dir = tmp / "cache", log = tmp / "compiles.log";
  const auto reqs = preset_requests("seed-test", 0);  // every bucket
  // All 16 start at once (a stampede): they wait until the parent closes the pipe.
  int start[2];
  ASSERT_EQ(::pipe(start), 0);
  std::vector<pid_t> pids;
  for (int p = 0; p < 16; ++p)
    pids.push_back(spawn([&] {
      ::close(start[1]);
      // Widen the window between "not there" and taking the exclusive lock, where only the
      // double check stops a second compile.
      DiskCache::set_fault_hook_for_testing(sleep_when_missing);
      KernelCache c(settings_for(dir));
      char b;
      if (::read(start[0], &b, 1) != 0) return 3;
      return get_all(c, reqs, logging_compile(log), 2) == 0 ? 0 : 1;
    }));
  ::close(start[0]);
  const auto t = Clock::now();
  ::close(start[1]);
  int ok = 0;
  for (pid_t pid : pids) {
    const int status = wait_status(pid);
    ok += WIFEXITED(status) && WEXITSTATUS(status) == 0;
  }
  const double s = std::chrono::duration<double>(Clock::now() - t).count();
  EXPECT_EQ(ok, 16);
  const auto n = compiles_per_key(log);
  EXPECT_EQ(n.size(), reqs.size());
  int total = 0;
  for (const auto& [key, count] : n) {
    EXPECT_EQ(count, 1) << key << " compiled " << count << " times";
    total += count;
  }
  EXPECT_EQ(entry_files(dir).size(), reqs.size());
  EXPECT_TRUE(verify_dir(dir).empty());
  std::printf("16 processes x %zu kernels: %d/16 succeeded, %d compiles for %zu keys, %.2f s\n",
              reqs.size(), ok, total, n.size(), s);
}

// Where a child kills itself (fault hook): the step name and the occurrence.
const char* g_kill_step = nullptr;
std::atomic<int> g_kill_countdown{0};
void kill_at_step(const char* step) {
  if (g_kill_step != nullptr && std::strcmp(step, g_kill_step) == 0 && --g_kill_countdown == 0)
    ::raise(SIGKILL);
}

TEST(CacheProcesses, FiftyKilledRunsLeaveNoBadEntryAndTheNextRunSucceeds) {
  TempDir tmp;
  const std::string dir = tmp / "cache";
  // Small real kernels (tens of ms of NVRTC each) keep 100 runs within seconds.
  std::vector<KernelRequest> reqs;
  for (int i = 0; i < 6; ++i) reqs.push_back(tiny_request(70 + i));
  const char* steps[] = {"locked",       "compiled",    "temp-partial",
                         "temp-written", "temp-synced", "published"};
  std::mt19937 rng(2024);
  int killed = 0, killed_by_hook = 0, next_ok = 0;
  std::string failures;
  for (int run = 0; run < 50; ++run) {
    // Start from a cache missing a random part of the entries (left-over temporaries and lock
    // files of earlier kills stay).
    for (const auto& n : entry_files(dir))
      if (rng() % 3 != 0) ::unlink((dir + "/entries/" + n).c_str());
    const bool by_hook = run % 2 == 0;
    const char* step = steps[rng() % 6];
    const int occurrence = 1 + static_cast<int>(rng() % 3);
    const int delay_ms = static_cast<int>(rng() % 250);
    const pid_t pid = spawn([&] {
      if (by_hook) {
        g_kill_step = step;
        g_kill_countdown = occurrence;
        DiskCache::set_fault_hook_for_testing(kill_at_step);
      }
      KernelCache c(settings_for(dir));
      return get_all(c, reqs, real_compile, 2) == 0 ? 0 : 1;
    });
    if (!by_hook) {
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
      ::kill(pid, SIGKILL);
    }
    const int status = wait_status(pid);
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) {
      ++killed;
      killed_by_hook += by_hook;
    }
    const auto problems = verify_dir(dir);
    if (!problems.empty()) failures += fmt::format("run {}: {}", run, problems_text(problems));
    // The next run (not killed) must succeed.
    next_ok += run_child([&] {
                 KernelCache c(settings_for(dir, 30));
                 return get_all(c, reqs, real_compile, 2) == 0 ? 0 : 1;
               }) == 0;
  }
  EXPECT_EQ(failures, "");
  EXPECT_EQ(next_ok, 50);
  EXPECT_GE(killed, 30) << "most runs must actually be killed mid-way";
  EXPECT_TRUE(verify_dir(dir).empty());
  std::printf(
      "50 runs: %d killed by SIGKILL (%d at a publish step, %d at a random moment), "
      "%d bad entries after them, %d/50 following runs succeeded\n",
      killed, killed_by_hook, killed - killed_by_hook, static_cast<int>(verify_dir(dir).size()),
      next_ok);
}

TEST(CacheProcesses, PruneWhileLoadingNeverBreaksALoader) {
  TempDir tmp;
  const std::string dir = tmp / "cache";
  const auto reqs = preset_requests("seed-test", 16);
  {
    KernelCache warm(settings_for(dir));
    ASSERT_EQ(get_all(warm, reqs, real_compile), 0);
  }
  std::vector<pid_t> loaders;
  for (int p = 0; p < 3; ++p)
    loaders.push_back(spawn([&] {
      const auto end = Clock::now() + std::chrono::seconds(4);
      int rounds = 0;
      while (Clock::now() < end) {
        KernelCache c(settings_for(dir));  // empty memory level: every get goes to disk
        if (get_all(c, reqs, real_compile, 1) != 0) return 1;
        ++rounds;
      }
      return rounds > 0 ? 0 : 2;
    }));
  uint64_t prunes = 0, busy = 0, removed = 0;
  const auto end = Clock::now() + std::chrono::seconds(4);
  while (Clock::now() < end) {
    const cache::PruneResult r = DiskCache(dir, 0, 10).prune(0);
    busy += r.busy;
    removed += r.removed;
    ++prunes;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  int ok = 0;
  for (pid_t pid : loaders) {
    const int status = wait_status(pid);
    ok += WIFEXITED(status) && WEXITSTATUS(status) == 0;
  }
  EXPECT_EQ(ok, 3);
  EXPECT_TRUE(verify_dir(dir).empty());
  EXPECT_GT(removed, 0u);
  std::printf(
      "prune while loading: %llu prunes removed %llu files, skipped %llu busy entries; "
      "3/3 loaders ok: %d\n",
      static_cast<unsigned long long>(prunes), static_cast<unsigned long long>(removed),
      static_cast<unsigned long long>(busy), ok);
}

// Entries of `bytes` bytes each, named like real ones, least recently used first (prune reads
// names, sizes and times only). Returns their total.
uint64_t fill_fake_entries(const std::string& dir, int n, size_t bytes) {
  { DiskCache make(dir, 0, 10); }  // the directory layout
  const std::time_t now = std::time(nullptr);
  for (int i = 0; i < n; ++i) {
    const std::string path =
        dir + "/entries/" + sha256_hex("fake entry " + std::to_string(i)) + ".entry";
    write_text(path, std::string(bytes, 'e'));
    const timespec ts[2] = {{now - 100000 + i, 0}, {now - 100000 + i, 0}};
    ::utimensat(AT_FDCWD, path.c_str(), ts, 0);
  }
  return static_cast<uint64_t>(n) * bytes;
}

// Prunes started together remove the excess once: each used to list the directory, then remove
// its own count of the excess, taking the entries another had removed (or held) as still there,
// so that K prunes emptied the cache (helper review, run by hand: 2000 entries to 28).
TEST(CacheProcesses, ConcurrentPrunesStopAtTheBound) {
  TempDir tmp;
  const std::string dir = tmp / "cache";
  constexpr int kEntries = 600;
  constexpr size_t kBytes = 10000;
  const uint64_t bound = fill_fake_entries(dir, kEntries, kBytes) / 2 + kBytes / 2;  // 300 fit
  std::vector<pid_t> pruners;
  for (int p = 0; p < 6; ++p)
    pruners.push_back(spawn([&] {
      DiskCache(dir, 0, 30).prune(bound);
      return 0;
    }));
  for (pid_t pid : pruners) EXPECT_EQ(wait_status(pid), 0);
  const auto left = entry_files(dir);
  EXPECT_LE(entries_total(dir), bound);
  EXPECT_EQ(left.size(), static_cast<size_t>(kEntries / 2)) << "the newest that fit stay";
  // The newest entry is among them.
  EXPECT_TRUE(fs::exists(dir + "/entries/" + sha256_hex("fake entry " + std::to_string(kEntries - 1)) +
                         ".entry"));
}

// The prune after a compile (MOEJIT_CACHE_MAX_BYTES) in processes that compile at once: the
// cache ends at the bound, not empty.
TEST(CacheProcesses, MaxBytesInConcurrentCompilesKeepsTheBound) {
  TempDir tmp;
  const std::string dir = tmp / "cache";
  constexpr size_t kBytes = 10000;
  const uint64_t bound = fill_fake_entries(dir, 200, kBytes) / 2;
  std::vector<pid_t> compilers;
  for (int p = 0; p < 6; ++p)
    compilers.push_back(spawn([&, p] {
      DiskCache d(dir, bound, 30);
      CacheCounters c;
      d.get(fake_request("compile " + std::to_string(p)), fake_binary, c);
      return 0;
    }));
  for (pid_t pid : compilers) EXPECT_EQ(wait_status(pid), 0);
  const uint64_t total = entries_total(dir);
  // The last prune left the cache within one old entry under the bound; compiles published
  // while it ran (their own prune skipped: one was running) may sit on top (each entry here is
  // a 1000-byte binary and its manifest, well under 4 KiB).
  EXPECT_LE(total, bound + 6 * 4096) << entry_files(dir).size() << " entries left";
  EXPECT_GT(total, bound - kBytes) << entry_files(dir).size() << " entries left";
}

// A child forked (without exec) while another thread compiles does not keep that key locked
// after the parent publishes: flocks belong to the open file, which the child shares, and the
// child's share is dropped at the fork.
TEST(CacheProcesses, ForkedChildDoesNotHoldACompilersLock) {
  TempDir tmp;
  const std::string dir = tmp / "cache";
  const DiskCache::Request r = fake_request("forked child");
  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  pid_t worker = -1;
  {
    DiskCache d(dir, 0, 30);
    CacheCounters c;
    std::atomic<bool> compiling{false};
    std::thread t([&] {
      d.get(r, [&] {
        compiling = true;
        std::this_thread::sleep_for(std::chrono::milliseconds(600));
        return fake_binary();
      }, c);
    });
    while (!compiling) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    worker = ::fork();  // a worker that lives on and never touches the cache
    if (worker == 0) {
      ::close(pipe_fds[1]);
      char ch;
      while (::read(pipe_fds[0], &ch, 1) < 0 && errno == EINTR) {
      }
      ::_exit(0);
    }
    t.join();
  }
  ::close(pipe_fds[0]);
  // Another process loads the published entry with a 5 s lock timeout.
  const int rc = run_child([&] {
    DiskCache d(dir, 0, 5);
    CacheCounters c;
    const auto t0 = Clock::now();
    int compiles = 0;
    d.get(r, [&] { ++compiles; return fake_binary(); }, c);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (compiles != 0 || c.lock_timeouts.load() != 0) return 1;
    return s < 2.0 ? 0 : 2;
  });
  ::close(pipe_fds[1]);  // the worker exits
  wait_status(worker);
  EXPECT_EQ(rc, 0) << "1: compiled again or timed out on the lock, 2: the load waited";
}

// A child forked while another thread compiles a kernel (a worker process, say) does not wait
// for that compile in the memory level: the thread is not in the child, so nothing there would
// complete its entry. The child's request loads the kernel once the parent has published it.
TEST(CacheProcesses, ForkedChildDoesNotWaitForAParentThreadsCompile) {
  TempDir tmp;
  cache::set_directory(tmp / "cache");
  const KernelRequest r = tiny_request(7);
  std::atomic<bool> compiling{false}, release{false};
  std::thread t([&] {
    KernelCache::global().get(r, [&](const KernelRequest& req) {
      compiling = true;
      while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      return real_compile(req);
    });
  });
  while (!compiling) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const pid_t child = spawn([&] {
    ::alarm(30);  // (a child that waits for the slot forever ends on SIGALRM)
    int compiles = 0;
    const auto bin = KernelCache::global().get(r, [&](const KernelRequest& req) {
      ++compiles;
      return real_compile(req);
    });
    return bin && !bin->cubin.empty() ? compiles : 3;
  });
  release = true;
  t.join();
  const int status = wait_status(child);
  ASSERT_TRUE(WIFEXITED(status)) << "the child ended on signal " << WTERMSIG(status)
                                 << " (SIGALRM: it waited for the parent thread's compile)";
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: the child compiled again, 3: no binary";
}

// A progress callback that throws fails the compile with its exception (it used to leave a
// worker thread or the caller's joinable threads and end the process in std::terminate).
TEST(CachePublicApi, ThrowingProgressCallbackFailsTheCompile) {
  TempDir tmp;
  cache::set_directory(tmp / "cache");
  MoeSpec spec = preset("seed-test");
  for (int jobs : {1, 3}) {
    CompileOptions opt;
    opt.arch = "sm_90a";
    opt.jobs = jobs;
    int calls = 0;
    opt.progress = [&](int, int, const std::string& kernel) {
      if (++calls == 2) throw std::runtime_error("stop at " + kernel);
    };
    try {
      compile_report(spec, opt);
      ADD_FAILURE() << "no exception with jobs = " << jobs;
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("stop at "), std::string::npos) << e.what();
    }
  }
}

// release_layers() where no context is current (this machine may have no driver at all)
// releases nothing and creates no context: a thread that never compiled owns no layers.
TEST(CachePublicApi, ReleaseLayersWithoutAContextReleasesNothing) {
  size_t released = 1;
  std::thread t([&] { released = release_layers(); });
  t.join();
  EXPECT_EQ(released, 0u);
}

// The driver check made when libcuda is opened: a driver of NVRTC's major release or newer runs
// its CUBINs (minor version compatibility), an older one is refused with a message that names
// both versions and the way out.
TEST(CachePublicApi, DriverOlderThanNvrtcsMajorReleaseIsRefusedByName) {
  EXPECT_EQ(runtime::driver_version_problem(13000, 13), "");
  EXPECT_EQ(runtime::driver_version_problem(13020, 13), "");
  EXPECT_EQ(runtime::driver_version_problem(14000, 13), "");
  const std::string why = runtime::driver_version_problem(12080, 13);
  EXPECT_THAT(why, ::testing::HasSubstr("supports CUDA 12.8 (cuDriverGetVersion 12080)"));
  EXPECT_THAT(why, ::testing::HasSubstr("NVRTC 13.x"));
  EXPECT_THAT(why, ::testing::HasSubstr("CUDA 13.0 or newer (r580 or later)"));
  EXPECT_THAT(runtime::driver_version_problem(12090, 13), ::testing::HasSubstr("CUDA 12.9"));
  EXPECT_THAT(runtime::driver_version_problem(11080, 12),
              ::testing::HasSubstr("need a driver for CUDA 12.0 or newer; upgrade"));
}

// A write probe left by a process killed between its open and unlink (the names once were
// .probe.<pid>.<n>) does not make a later process of that pid read-only, and prune removes
// stale probes as it removes stale temporaries.
TEST(CacheDisk, LeftoverProbeFileIsHarmlessAndPruned) {
  TempDir tmp;
  const std::string dir = tmp / "cache";
  { DiskCache make(dir, 0, 10); }
  const int rc = run_child([&] {
    // Every sequence number this process could have reached in the old naming.
    for (int n = 0; n < 5000; ++n)
      write_text(dir + "/entries/.probe." + std::to_string(::getpid()) + "." + std::to_string(n), "");
    DiskCache d(dir, 0, 10);
    return d.mode() == DiskCache::Mode::ReadWrite ? 0 : 1;
  });
  EXPECT_EQ(rc, 0) << "a leftover probe made the cache read-only";
  const std::string stale = dir + "/entries/.probe.1.0";
  write_text(stale, "");
  const std::time_t old = std::time(nullptr) - 2 * 3600;
  const timespec ts[2] = {{old, 0}, {old, 0}};
  ASSERT_EQ(::utimensat(AT_FDCWD, stale.c_str(), ts, 0), 0);
  DiskCache(dir, 0, 10).prune(1u << 30);
  EXPECT_FALSE(fs::exists(stale));
  DiskCache(dir, 0, 10).clear();
  const auto names = files_in(dir + "/entries");
  EXPECT_EQ(std::count_if(names.begin(), names.end(),
                          [](const std::string& n) { return n.rfind(".probe.", 0) == 0; }),
            0)
      << "clear leaves write probes";
}

// ---- the CLI ----------------------------------------------------------------------------------

#ifdef MOEJIT_CLI_PATH
// Runs the CLI; returns its exit code and stdout+stderr.
int run_cli(const std::string& args, std::string* out) {
  return moejit_test::run_shell(std::string(MOEJIT_CLI_PATH) + " " + args, out);
}

bool cli_has_cache_commands() {
  std::string out;
  return fs::exists(MOEJIT_CLI_PATH) && run_cli("cache --help", &out) == 0;
}

TEST(CacheCli, SixteenWarmupsCompileOnceAndCacheCommandsWork) {
  ASSERT_TRUE(cli_has_cache_commands())
      << "the moejit CLI has no `cache` command, or `moejit cache --help` failed "
         "(tools/moejit.cpp must call moejit_cli_add_cache_commands)";
  TempDir tmp;
  const std::string dir = tmp / "cache";
  std::vector<FILE*> pipes;
  for (int p = 0; p < 16; ++p) {
    pipes.push_back(moejit_test::start_shell(
        fmt::format("{} warmup --preset seed-test --jobs 2 --cache-dir {}", MOEJIT_CLI_PATH, dir)));
  }
  int ok = 0, compiled = 0, kernels = 0;
  for (FILE* p : pipes) {
    std::string out;
    ok += moejit_test::read_and_close(p, &out) == 0;
    int k = 0, c = 0;
    const size_t at = out.find("warmed ");
    if (at != std::string::npos &&
        std::sscanf(out.c_str() + at, "warmed %d kernels for seed-test on sm_90a: %d compiled", &k,
                    &c) == 2) {
      compiled += c;
      kernels = k;
    } else {
      ADD_FAILURE() << out;
    }
  }
  EXPECT_EQ(ok, 16);
  EXPECT_GT(kernels, 0);
  EXPECT_EQ(compiled, kernels) << "each kernel compiled by exactly one of the 16 processes";
  std::printf("16 x `moejit warmup --preset seed-test`: %d/16 ok, %d compiles for %d kernels\n", ok,
              compiled, kernels);

  std::string out;
  EXPECT_EQ(run_cli("cache verify --cache-dir " + dir, &out), 0) << out;
  EXPECT_EQ(run_cli("cache ls --cache-dir " + dir, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr(fmt::format("{} entries", kernels)));
  EXPECT_EQ(run_cli("cache stats --cache-dir " + dir, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr(fmt::format("{} compiled", kernels)));
  const std::string archive = tmp / "warm.moejit";
  EXPECT_EQ(run_cli("cache export " + archive + " --cache-dir " + dir, &out), 0) << out;
  EXPECT_EQ(run_cli("cache import " + archive + " --cache-dir " + tmp / "other", &out), 0) << out;
  EXPECT_THAT(out, HasSubstr(fmt::format("imported {} entries", kernels)));

  const auto names = entry_files(dir);
  ASSERT_FALSE(names.empty());
  ::truncate((dir + "/entries/" + names[0]).c_str(), 10);
  EXPECT_EQ(run_cli("cache verify --cache-dir " + dir, &out), 1) << out;
  EXPECT_THAT(out, HasSubstr(names[0]));
  EXPECT_EQ(run_cli("cache verify --fix --cache-dir " + dir, &out), 1) << out;
  EXPECT_EQ(run_cli("cache verify --cache-dir " + dir, &out), 0) << out;
  EXPECT_EQ(run_cli("cache prune --max-bytes 1 --cache-dir " + dir, &out), 0) << out;
  EXPECT_EQ(run_cli("cache clear --cache-dir " + dir, &out), 0) << out;
  EXPECT_TRUE(entry_files(dir).empty());

  // MOEJIT_JIT=off on an empty cache: the error names the kernel.
  EXPECT_NE(moejit_test::run_shell("MOEJIT_JIT=off " + std::string(MOEJIT_CLI_PATH) +
                                       " warmup --preset seed-test --max-tokens 16 --cache-dir " +
                                       tmp / "empty2",
                                   &out),
            0);
  EXPECT_THAT(out, HasSubstr("MOEJIT_JIT=off"));
  EXPECT_THAT(out, HasSubstr("kernel '"));
}
#endif

}  // namespace
}  // namespace moejit::runtime
