// The kernel cache commands of the moejit CLI. Public headers only.
#include "cache_cmd.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "cli_common.h"
#include "moejit/cache.h"
#include "moejit/moejit.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::string human_bytes(uint64_t b) {
  if (b >= (uint64_t(1) << 30)) return fmt::format("{:.2f} GiB", b / double(uint64_t(1) << 30));
  if (b >= (uint64_t(1) << 20)) return fmt::format("{:.2f} MiB", b / double(1 << 20));
  if (b >= (uint64_t(1) << 10)) return fmt::format("{:.1f} KiB", b / double(1 << 10));
  return fmt::format("{} B", b);
}

std::string local_time(int64_t t) {
  const std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm{};
  localtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M", &tm);
  return buf;
}

// The --cache-dir option every command takes.
struct CacheDirArg {
  std::string dir;
  void add(CLI::App& cmd) {
    cmd.add_option("--cache-dir", dir,
                   "cache directory (default: $MOEJIT_CACHE_DIR, else $XDG_CACHE_HOME/moejit, "
                   "else ~/.cache/moejit)");
  }
  void apply() const {
    if (!dir.empty()) moejit::cache::set_directory(dir);
  }
};

// Exit status 1 without a message (CLI11 reports RuntimeError's code only).
[[noreturn]] void fail_quietly() { throw CLI::RuntimeError(1); }

void print_counters(const char* title, const moejit::cache::Counters& c) {
  fmt::print("{}:\n", title);
  // Memory hits never touch the directory, so DIR/stats counts loads from disk only.
  fmt::print("  hits            {} from disk (reading + verifying {:.1f} ms in all)\n", c.disk_hits,
             c.disk_load_ms);
  fmt::print("  misses          {} ({} compiled, {} failed)\n", c.misses, c.compiles,
             c.failed_compiles);
  fmt::print("  compile time    {:.1f} s\n", c.compile_ms / 1000.0);
  fmt::print("  quarantined     {}\n", c.quarantined);
  fmt::print("  lock timeouts   {}\n", c.lock_timeouts);
}

void add_ls(CLI::App& cache) {
  auto* cmd = cache.add_subcommand("ls", "list the entries, least recently used first");
  static CacheDirArg dir;
  dir.add(*cmd);
  cmd->callback([] {
    dir.apply();
    const auto entries = moejit::cache::list();
    fmt::print("{:<16} {:<14} {:<8} {:>10} {:>10} {:<16} {}\n", "key", "kernel", "arch", "cubin",
               "compile_ms", "last used", "status");
    uint64_t bytes = 0;
    for (const auto& e : entries) {
      bytes += e.bytes;
      fmt::print("{:<16} {:<14} {:<8} {:>10} {:>10.1f} {:<16} {}\n", e.key.substr(0, 16),
                 e.problem.empty() ? e.kernel : "?", e.arch, e.cubin_bytes, e.compile_ms,
                 local_time(e.last_used), e.problem.empty() ? "ok" : "BAD: " + e.problem);
    }
    fmt::print("{} entries, {} in {}\n", entries.size(), human_bytes(bytes),
               moejit::cache::directory());
  });
}

void add_stats(CLI::App& cache) {
  auto* cmd = cache.add_subcommand("stats", "entries, bytes, hits, misses and compile time");
  static CacheDirArg dir;
  dir.add(*cmd);
  cmd->callback([] {
    dir.apply();
    const auto s = moejit::cache::stats();
    fmt::print("directory       {}\n", s.directory);
    fmt::print("mode            {}\n", s.mode);
    fmt::print("jit             {}\n", s.jit ? "on" : "off (MOEJIT_JIT=off: misses are errors)");
    fmt::print("entries         {} ({})\n", s.entries, human_bytes(s.bytes));
    fmt::print("bound           {}\n",
               s.max_bytes ? human_bytes(s.max_bytes) : "none (MOEJIT_CACHE_MAX_BYTES unset)");
    fmt::print("quarantine      {} files ({})\n", s.quarantined_files,
               human_bytes(s.quarantined_bytes));
    print_counters("all processes (DIR/stats)", s.all_processes);
  });
}

void add_verify(CLI::App& cache) {
  auto* cmd = cache.add_subcommand("verify", "check every entry; exit status 1 if any is bad");
  static CacheDirArg dir;
  static bool fix = false;
  dir.add(*cmd);
  cmd->add_flag("--fix", fix, "move bad entries to quarantine/ (they are recompiled when needed)");
  cmd->callback([] {
    dir.apply();
    const auto problems = moejit::cache::verify(fix);
    const auto entries = moejit::cache::list();
    for (const auto& p : problems) fmt::print("{}: {}\n", p.path, p.what);
    fmt::print("{} entries checked in {}: {} problem{}{}\n",
               entries.size() + (fix ? problems.size() : 0), moejit::cache::directory(),
               problems.size(), problems.size() == 1 ? "" : "s",
               problems.empty() ? ""
               : fix            ? " (quarantined)"
                                : " (run with --fix to quarantine)");
    if (!problems.empty()) fail_quietly();
  });
}

void print_prune(const char* what, const moejit::cache::PruneResult& r) {
  fmt::print("{}: removed {} files ({}), kept {} entries ({}){}\n", what, r.removed,
             human_bytes(r.removed_bytes), r.kept, human_bytes(r.kept_bytes),
             r.busy ? fmt::format(", {} busy (in use by another process) left alone", r.busy) : "");
}

void add_prune(CLI::App& cache) {
  auto* cmd = cache.add_subcommand(
      "prune", "remove quarantined files, then least recently used entries, down to a size");
  static CacheDirArg dir;
  static std::string max_bytes;
  dir.add(*cmd);
  cmd->add_option("--max-bytes", max_bytes,
                  "size to prune to, e.g. 2G (default: $MOEJIT_CACHE_MAX_BYTES)");
  cmd->callback([] {
    dir.apply();
    uint64_t bound = 0;
    if (!max_bytes.empty()) {
      bound = moejit::cache::parse_bytes(max_bytes);
    } else {
      bound = moejit::cache::settings().max_bytes;
      if (bound == 0)
        throw moejit::Error(moejit::ErrorKind::InvalidArgument,
                            "prune needs a size: give --max-bytes SIZE (e.g. 2G) or set "
                            "MOEJIT_CACHE_MAX_BYTES; `moejit cache clear` removes everything");
    }
    print_prune("prune", moejit::cache::prune(bound));
  });
}

void add_clear(CLI::App& cache) {
  auto* cmd = cache.add_subcommand("clear", "remove every entry and the quarantine");
  static CacheDirArg dir;
  dir.add(*cmd);
  cmd->callback([] {
    dir.apply();
    print_prune("clear", moejit::cache::clear());
  });
}

void add_export(CLI::App& cache) {
  auto* cmd = cache.add_subcommand("export", "write every valid entry to one file");
  static CacheDirArg dir;
  static std::string file;
  dir.add(*cmd);
  cmd->add_option("FILE", file, "archive to write")->required();
  cmd->callback([] {
    dir.apply();
    const auto t = Clock::now();
    const uint64_t n = moejit::cache::export_to(file);
    fmt::print("exported {} entries from {} to {} in {:.2f} s\n", n, moejit::cache::directory(),
               file, seconds_since(t));
  });
}

void add_import(CLI::App& cache) {
  auto* cmd = cache.add_subcommand(
      "import", "verify and add every entry of a file written by `moejit cache export`");
  static CacheDirArg dir;
  static std::string file;
  dir.add(*cmd);
  cmd->add_option("FILE", file, "archive to read")->required();
  cmd->callback([] {
    dir.apply();
    const auto r = moejit::cache::import_from(file);
    for (const auto& p : r.rejected) fmt::print("rejected {}: {}\n", p.path, p.what);
    fmt::print("imported {} entries into {} ({} already there, {} rejected)\n", r.imported,
               moejit::cache::directory(), r.already_present, r.rejected.size());
    if (!r.rejected.empty()) fail_quietly();
  });
}

// Progress on stderr: one rewritten line on a terminal, one line per kernel otherwise.
std::function<void(int, int, const std::string&)> progress_printer() {
  const bool tty = ::isatty(STDERR_FILENO);
  return [tty](int done, int total, const std::string& kernel) {
    std::fprintf(stderr, "%swarmup: [%d/%d] %-20s%s", tty ? "\r" : "", done, total, kernel.c_str(),
                 tty ? (done == total ? "\n" : "") : "\n");
    std::fflush(stderr);
  };
}

void add_warmup(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "warmup", "compile every kernel of a layer (all token buckets) into the cache, in parallel");
  static CacheDirArg dir;
  static moejit_cli::SpecArgs spec;
  static std::string arch;
  static int max_tokens = 0, jobs = 0;
  spec.add(*cmd);
  dir.add(*cmd);
  cmd->add_option("--arch", arch, "target arch (default: this GPU's, else sm_90a)");
  cmd->add_option("--max-tokens", max_tokens, "only buckets up to this token count (0 = all)");
  cmd->add_option("--jobs", jobs, "parallel compiles (default: hardware threads)");
  cmd->callback([] {
    dir.apply();
    moejit::CompileOptions opt;
    opt.arch = arch;
    opt.max_tokens = max_tokens;
    opt.jobs = jobs;
    opt.progress = progress_printer();
    const auto t = Clock::now();
    const auto reports = moejit::compile_report(spec.load(), opt);
    const double wall = seconds_since(t);
    // Kernels that share another's code (KernelReport::same_as) are neither compiled nor looked up.
    const auto distinct = std::count_if(reports.begin(), reports.end(),
                                        [](const auto& r) { return r.same_as.empty(); });
    const auto compiled = std::count_if(reports.begin(), reports.end(),
                                        [](const auto& r) { return r.compile_ms > 0; });
    fmt::print(
        "warmed {} kernels for {} on {}: {} compiled, {} from the cache, in {:.2f} s "
        "(cache: {}); {} more kernels of the layer share their code\n",
        distinct, spec.preset.empty() ? spec.spec_file : spec.preset,
        reports.empty() ? arch : reports[0].arch, compiled, distinct - compiled, wall,
        moejit::cache::directory(), static_cast<long>(reports.size()) - distinct);
  });
}

// Figures for bench/RESULTS.md: cold compile of a layer into an empty cache, warm load of the
// layer from disk (memory level dropped), and the in-memory lookups.
void add_timing(CLI::App& cache) {
  auto* cmd = cache.add_subcommand(
      "timing",
      "measure cold compile, warm disk load and memory lookup of one layer (in a fresh "
      "temporary cache directory)");
  static CacheDirArg dir;
  static moejit_cli::SpecArgs spec;
  static std::string arch;
  static int max_tokens = 0, jobs = 0, repeat = 20;
  spec.add(*cmd);
  dir.add(*cmd);
  cmd->add_option("--arch", arch, "target arch (default: this GPU's, else sm_90a)");
  cmd->add_option("--max-tokens", max_tokens, "only buckets up to this token count (0 = all)");
  cmd->add_option("--jobs", jobs, "parallel compiles (default: hardware threads)");
  cmd->add_option("--repeat", repeat, "repetitions of the warm measurements");
  cmd->callback([] {
    namespace fs = std::filesystem;
    // Cold needs an empty directory: a fresh one under --cache-dir (or the system's temporary
    // directory), removed at the end. Existing entries are never touched.
    const fs::path base = dir.dir.empty() ? fs::temp_directory_path() : fs::path(dir.dir);
    fs::create_directories(base);
    std::string tmp = (base / "moejit-timing-XXXXXX").string();
    if (::mkdtemp(tmp.data()) == nullptr)
      throw moejit::Error(moejit::ErrorKind::Cache,
                          fmt::format("cannot create a temporary directory in {}", base.string()));
    moejit::cache::set_directory(tmp);
    moejit::cache::clear_memory();
    const moejit::MoeSpec s = spec.load();
    moejit::CompileOptions opt;
    opt.arch = arch;
    opt.max_tokens = max_tokens;
    opt.jobs = jobs;
    const int reps = std::max(1, repeat);

    auto t = Clock::now();
    const auto reports = moejit::compile_report(s, opt);
    const double cold = seconds_since(t);
    double serial_ms = 0;
    for (const auto& r : reports) serial_ms += r.compile_ms;
    // Compiled and looked up: the kernels of their own code (the others share one, same_as).
    const size_t n = static_cast<size_t>(std::count_if(
        reports.begin(), reports.end(), [](const auto& r) { return r.same_as.empty(); }));
    fmt::print("layer           {} on {}, {} kernels ({} distinct)\n",
               spec.preset.empty() ? spec.spec_file : spec.preset, reports.at(0).arch,
               reports.size(), n);
    fmt::print(
        "cold compile    {:.2f} s wall ({} jobs), {:.0f} ms per kernel of compile time "
        "({:.2f} s in all)\n",
        cold,
        std::min<size_t>(n, jobs > 0 ? static_cast<size_t>(jobs) : std::max(1u, std::thread::hardware_concurrency())),
        serial_ms / n, serial_ms / 1000.0);

    std::vector<double> warm;
    const auto before = moejit::cache::stats().this_process;
    for (int i = 0; i < reps; ++i) {
      moejit::cache::clear_memory();
      t = Clock::now();
      moejit::compile_report(s, opt);
      warm.push_back(seconds_since(t) * 1000.0);
    }
    const auto after = moejit::cache::stats().this_process;
    std::sort(warm.begin(), warm.end());
    const uint64_t loads = after.disk_hits - before.disk_hits;
    fmt::print(
        "warm disk load  {:.2f} ms per layer (median of {}; min {:.2f}), of which reading "
        "+ verifying entries {:.3f} ms per kernel ({} loads)\n",
        warm[warm.size() / 2], reps, warm.front(),
        loads ? (after.disk_load_ms - before.disk_load_ms) / loads : 0.0, loads);

    std::vector<double> memory;
    for (int i = 0; i < reps; ++i) {
      t = Clock::now();
      moejit::compile_report(s, opt);
      memory.push_back(seconds_since(t) * 1e6);
    }
    std::sort(memory.begin(), memory.end());
    fmt::print(
        "memory          {:.1f} us per compile_report of the layer (codegen + {} lookups; "
        "median of {})\n",
        memory[memory.size() / 2], n, reps);

    std::string why;
    if (moejit::has_gpu(&why)) {
      auto compile_layer = [&] {
        if (s.finalize)
          moejit::compile_finalized(s, opt);
        else
          moejit::compile_unfinalized(s, opt);
      };
      t = Clock::now();
      compile_layer();  // loads the modules
      const double first = seconds_since(t) * 1000.0;
      int calls = 0;
      t = Clock::now();
      while (calls < 100000 && (calls < 10 || seconds_since(t) < 1.0)) {
        compile_layer();
        ++calls;
      }
      fmt::print(
          "layer lookup    {:.3f} us per compile_{}() of a compiled layer (first call, "
          "with module loads: {:.2f} ms)\n",
          seconds_since(t) * 1e6 / calls, s.finalize ? "finalized" : "unfinalized", first);
    } else {
      fmt::print("layer lookup    skipped: no GPU ({})\n", why);
    }
    std::error_code ec;
    fs::remove_all(tmp, ec);
  });
}

}  // namespace

void moejit_cli_add_cache_commands(CLI::App& app) {
  auto* cache = app.add_subcommand("cache", "inspect and manage the on-disk kernel cache");
  cache->require_subcommand(1);
  add_ls(*cache);
  add_stats(*cache);
  add_verify(*cache);
  add_prune(*cache);
  add_clear(*cache);
  add_export(*cache);
  add_import(*cache);
  add_timing(*cache);
  add_warmup(app);
}
