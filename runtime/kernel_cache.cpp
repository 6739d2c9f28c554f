#include "runtime/kernel_cache.h"

#include <dlfcn.h>
#include <elf.h>
#include <fmt/format.h>
#include <link.h>
#include <nvrtc.h>
#include <pthread.h>
#include <pwd.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>

#include "moejit/moejit.h"
#include "compiler/compiler.h"
#include "runtime/disk_cache.h"
#include "runtime/env.h"
#include "runtime/sha256.h"


namespace moejit::runtime {

namespace {

constexpr int kKeyFormatVersion = 1;

// ---- NVRTC's identity -------------------------------------------------------------------------
// nvrtcVersion() gives major.minor only. The build is identified by the GNU build id of the
// libnvrtc that is loaded (read from its PT_NOTE segment in memory: no file access, no compile),
// which differs between any two builds. Without a build id we compile a trivial program once and
// take the toolkit lines of the PTX header ("Cuda compilation tools, release 13.0, V13.0.88",
// "Compiler Build ID: CL-...").

struct FindBuildId {
  uintptr_t address = 0;
  std::string build_id;
};

int find_build_id(dl_phdr_info* info, size_t, void* data) {
  auto* find = static_cast<FindBuildId*>(data);
  bool contains = false;
  for (int i = 0; i < info->dlpi_phnum && !contains; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    contains = ph.p_type == PT_LOAD && find->address >= lo && find->address < lo + ph.p_memsz;
  }
  if (!contains) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_NOTE) continue;
    const char* p = reinterpret_cast<const char*>(info->dlpi_addr + ph.p_vaddr);
    const char* end = p + ph.p_memsz;
    while (p + sizeof(ElfW(Nhdr)) <= end) {
      const auto* note = reinterpret_cast<const ElfW(Nhdr)*>(p);
      const char* name = p + sizeof(ElfW(Nhdr));
      const char* desc = name + ((note->n_namesz + 3) & ~3u);
      if (note->n_type == NT_GNU_BUILD_ID && note->n_namesz == 4 &&
          std::string_view(name, 3) == "GNU" && desc + note->n_descsz <= end) {
        for (unsigned j = 0; j < note->n_descsz; ++j)
          find->build_id += fmt::format("{:02x}", static_cast<unsigned char>(desc[j]));
        return 1;
      }
      p = desc + ((note->n_descsz + 3) & ~3u);
    }
  }
  return 1;
}

std::string nvrtc_build_from_ptx() {
  nvrtcProgram prog = nullptr;
  if (nvrtcCreateProgram(&prog, "extern \"C\" __global__ void moejit_probe() {}", "probe.cu", 0,
                         nullptr, nullptr) != NVRTC_SUCCESS)
    return "unknown";
  std::string id = "unknown";
  if (nvrtcCompileProgram(prog, 0, nullptr) == NVRTC_SUCCESS) {
    size_t size = 0;
    nvrtcGetPTXSize(prog, &size);
    std::string ptx(size, '\0');
    nvrtcGetPTX(prog, ptx.data());
    std::string lines;
    for (const char* marker : {"Cuda compilation tools", "Compiler Build ID"}) {
      const size_t at = ptx.find(marker);
      if (at != std::string::npos) lines += ptx.substr(at, ptx.find('\n', at) - at) + ";";
    }
    if (!lines.empty()) id = "ptx-header:" + sha256_hex(lines).substr(0, 32);
  }
  nvrtcDestroyProgram(&prog);
  return id;
}

std::string nvrtc_build_identity() {
  void* fn = dlsym(RTLD_DEFAULT, "nvrtcVersion");
  FindBuildId find;
  find.address = reinterpret_cast<uintptr_t>(fn ? fn : reinterpret_cast<void*>(&nvrtcVersion));
  dl_iterate_phdr(find_build_id, &find);
  if (!find.build_id.empty()) return "gnu-build-id:" + find.build_id;
  return nvrtc_build_from_ptx();
}

std::string templates_digest() {
  Sha256 h;
  for (const compiler::TemplateFile& file : compiler::embedded_templates()) {
    const std::string_view name = file.name;
    const std::string_view text = file.text;
    h.update(fmt::format("{} {} {}\n", name.size(), text.size(), name));
    h.update(text);
  }
  return h.finish_hex();
}

// ---- request checks ---------------------------------------------------------------------------

bool is_exact_arch(const std::string& arch) {
  // sm_<2-3 digits>[a|f]
  if (arch.size() < 5 || arch.compare(0, 3, "sm_") != 0) return false;
  size_t i = 3;
  while (i < arch.size() && std::isdigit(static_cast<unsigned char>(arch[i]))) ++i;
  const size_t digits = i - 3;
  if (digits < 2 || digits > 3) return false;
  return i == arch.size() || (i + 1 == arch.size() && (arch[i] == 'a' || arch[i] == 'f'));
}

bool is_identifier(const std::string& s) {
  if (s.empty() || s.size() > 200 || std::isdigit(static_cast<unsigned char>(s[0]))) return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) return false;
  return true;
}

// Options enter the key; a path would make the key depend on the install, and whitespace or
// a newline could forge preimage lines.
bool is_clean_option(const std::string& o) {
  if (o.empty() || o.size() > 200 || o[0] != '-') return false;
  for (char c : o)
    if (c <= ' ' || c == '/' || c == '\\' || c == 0x7f) return false;
  return true;
}

std::string memory_key(const KernelRequest& req) {
  std::string k;
  k.reserve(req.arch.size() + req.entry.size() + req.source.size() + 64);
  k += req.arch;
  k += '\0';
  k += req.entry;
  k += '\0';
  for (const auto& o : req.options) {
    k += o;
    k += '\0';
  }
  k += '\0';
  k += req.source;
  return k;
}

std::string describe(const KernelRequest& req) {
  return fmt::format("kernel '{}' ({}, {})", req.name, req.entry, req.arch);
}

}  // namespace

// ---- key --------------------------------------------------------------------------------------

KeyContext KeyContext::build() {
  KeyContext c;
  c.moejit_version = version();
  nvrtcVersion(&c.nvrtc_major, &c.nvrtc_minor);
  c.nvrtc_build = nvrtc_build_identity();
  c.templates_sha256 = templates_digest();
  return c;
}

const KeyContext& KeyContext::current() { return KernelCache::global().context(); }

std::string key_preimage(const KernelRequest& req, const KeyContext& ctx) {
  if (!is_exact_arch(req.arch))
    throw Error(ErrorKind::InvalidArgument,
                fmt::format("arch = '{}' is not an exact CUDA arch; use the form sm_80, sm_90a "
                            "or sm_100f",
                            req.arch));
  if (!is_identifier(req.entry))
    throw Error(ErrorKind::Internal,
                fmt::format("kernel '{}' has entry symbol '{}', which is not a C identifier",
                            req.name, req.entry));
  std::string p = fmt::format(
      "moejit-kernel-key {}\nmoejit {}\nnvrtc {}.{} {}\ntemplates {}\n"
      "arch {}\nentry {}\n",
      kKeyFormatVersion, ctx.moejit_version, ctx.nvrtc_major, ctx.nvrtc_minor, ctx.nvrtc_build,
      ctx.templates_sha256, req.arch, req.entry);
  for (const auto& o : req.options) {
    if (!is_clean_option(o))
      throw Error(ErrorKind::Internal,
                  fmt::format("NVRTC option '{}' of kernel '{}' holds a path, whitespace or is "
                              "not an option; KernelRequest::options enter the cache key and "
                              "must not (pass include directories to NVRTC separately)",
                              o, req.name));
    p += "option " + o + "\n";
  }
  p +=
      fmt::format("source-bytes {}\nsource-sha256 {}\n", req.source.size(), sha256_hex(req.source));
  return p;
}

std::string cache_key(const KernelRequest& req, const KeyContext& ctx) {
  return sha256_hex(key_preimage(req, ctx));
}

// ---- KernelCache ------------------------------------------------------------------------------

namespace {
// global(), set when the library loads and cleared when it is destroyed, for the fork handlers.
std::atomic<KernelCache*> g_global{nullptr};
// The cache before_fork locked (the handlers run in the forking thread, in that order).
thread_local KernelCache* t_locked_for_fork = nullptr;
}  // namespace

KernelCache& KernelCache::global() {
  // (Built when the library loads, below; its constructor computes nothing. Destroyed at exit:
  // the disk level flushes its counters then.)
  static KernelCache cache;
  return cache;
}

// The disk level's mutex is taken after the cache's: no code holds it and then takes another.
void KernelCache::before_fork() {
  t_locked_for_fork = g_global.load();
  if (!t_locked_for_fork) return;
  t_locked_for_fork->mu_.lock();
  if (t_locked_for_fork->disk_) t_locked_for_fork->disk_->lock_for_fork();
  t_locked_for_fork->memory_.lock_for_fork();
}
void KernelCache::after_fork(bool child) {
  KernelCache* c = t_locked_for_fork;
  if (!c) return;
  if (child) c->memory_.unlock_in_child();
  else c->memory_.unlock_in_parent();
  if (c->disk_) c->disk_->unlock_after_fork();
  c->mu_.unlock();
}

namespace {
// The global cache is built, and the handlers registered, when the library loads.
[[maybe_unused]] const bool kGlobalAtLoad = (g_global.store(&KernelCache::global()), true);
[[maybe_unused]] const int kKernelCacheForkHandlers = ::pthread_atfork(
    &KernelCache::before_fork, [] { KernelCache::after_fork(false); },
    [] { KernelCache::after_fork(true); });
}  // namespace

KernelCache::KernelCache()
    : settings_from_env_(true),
      counters_(std::make_unique<CacheCounters>()) {}

KernelCache::KernelCache(cache::Settings settings, KeyContext context)
    : context_(std::move(context)),
      have_settings_(true),
      settings_(std::move(settings)),
      counters_(std::make_unique<CacheCounters>()) {}

KernelCache::~KernelCache() {
  KernelCache* self = this;
  g_global.compare_exchange_strong(self, nullptr);  // (global(): no fork handler uses it now)
}

cache::Settings KernelCache::settings() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!have_settings_) {
    settings_ = cache::settings_from_env();
    have_settings_ = true;
  }
  return settings_;
}

void KernelCache::set_directory(const std::string& dir) {
  settings();  // read the environment first, so that dir overrides it
  std::shared_ptr<DiskCache> old;  // (closed after the lock: it flushes its counters under a flock)
  std::lock_guard<std::mutex> lock(mu_);
  settings_.directory = dir;
  old = std::move(disk_);
}

const KeyContext& KernelCache::context() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!context_) context_ = KeyContext::build();
  return *context_;
}

std::shared_ptr<DiskCache> KernelCache::disk() {
  const cache::Settings s = settings();
  std::lock_guard<std::mutex> lock(mu_);
  if (!disk_) disk_ = std::make_shared<DiskCache>(s.directory, s.max_bytes, s.lock_timeout_s);
  return disk_;
}

cache::Counters KernelCache::counters() const { return counters_->snapshot(); }

void KernelCache::clear_memory() { memory_.clear(); }

std::shared_ptr<const KernelBinary> KernelCache::get(const KernelRequest& req,
                                                     const CompileFn& compile) {
  // Only the caller that compiled sees its compile_ms: the entry has 0 (later calls are served
  // from a cache).
  std::shared_ptr<const KernelBinary> made;
  auto bin = memory_.get(
      memory_key(req),
      [&] {
        made = fill(req, compile);
        if (made->compile_ms == 0) return made;
        auto copy = std::make_shared<KernelBinary>(*made);
        copy->compile_ms = 0;
        return std::shared_ptr<const KernelBinary>(std::move(copy));
      },
      [] {});
  if (made) return made;
  counters_->memory_hits++;  // (a hit, or a wait for the thread compiling it)
  return bin;
}

std::shared_ptr<const KernelBinary> KernelCache::fill(const KernelRequest& req,
                                                      const CompileFn& compile) {
  DiskCache::Request dr;
  dr.preimage = key_preimage(req, context());
  dr.key = sha256_hex(dr.preimage);
  dr.kernel = req.name;
  dr.describe = describe(req);
  dr.jit = settings().jit;
  auto bin = disk()->get(
      dr, [&] { return compile(req); }, *counters_);
  return std::make_shared<const KernelBinary>(std::move(bin));
}

}  // namespace moejit::runtime

// ---- public administration API (include/moejit/cache.h) ---------------------------------------

namespace moejit::cache {

using runtime::ByteCount;
using runtime::env_value;
using runtime::KernelCache;

Settings settings_from_env() {
  Settings s;
  if (auto dir = env_value<std::string>("MOEJIT_CACHE_DIR")) {
    s.directory = *dir;
  } else if (auto xdg = env_value<std::string>("XDG_CACHE_HOME"); xdg && (*xdg)[0] == '/') {
    s.directory = *xdg + "/moejit";  // the XDG spec ignores relative values
  } else if (auto home = env_value<std::string>("HOME")) {
    s.directory = *home + "/.cache/moejit";
  } else if (const passwd* pw = ::getpwuid(::geteuid()); pw && pw->pw_dir && *pw->pw_dir) {
    s.directory = std::string(pw->pw_dir) + "/.cache/moejit";
  }
  if (auto max = env_value<ByteCount>("MOEJIT_CACHE_MAX_BYTES")) s.max_bytes = max->bytes;
  if (auto jit = env_value<bool>("MOEJIT_JIT")) s.jit = *jit;
  if (auto t = env_value<double>("MOEJIT_CACHE_LOCK_TIMEOUT_S")) s.lock_timeout_s = *t;
  return s;
}

Settings settings() { return KernelCache::global().settings(); }

std::string directory() { return KernelCache::global().disk()->dir(); }

void set_directory(const std::string& dir) { KernelCache::global().set_directory(dir); }

std::vector<Entry> list() { return KernelCache::global().disk()->list(); }

Stats stats() {
  KernelCache& kc = KernelCache::global();
  auto disk = kc.disk();
  Stats s;
  const Settings set = kc.settings();
  s.directory = disk->dir();
  s.mode = disk->mode_text();
  s.max_bytes = set.max_bytes;
  s.jit = set.jit;
  for (const Entry& e : disk->list()) {
    s.entries++;
    s.bytes += e.bytes;
  }
  s.quarantined_files = disk->quarantined_files(&s.quarantined_bytes);
  s.this_process = kc.counters();
  s.all_processes = disk->persisted_counters();
  return s;
}

std::vector<Problem> verify(bool quarantine) {
  return KernelCache::global().disk()->verify(quarantine);
}

PruneResult prune(uint64_t max_bytes) { return KernelCache::global().disk()->prune(max_bytes); }

PruneResult clear() { return KernelCache::global().disk()->clear(); }

uint64_t export_to(const std::string& file) {
  return KernelCache::global().disk()->export_to(file);
}

ImportResult import_from(const std::string& file) {
  return KernelCache::global().disk()->import_from(file);
}

void clear_memory() { KernelCache::global().clear_memory(); }

uint64_t parse_bytes(const std::string& text) {
  return runtime::parse_byte_count(text, "byte count");
}

}  // namespace moejit::cache
