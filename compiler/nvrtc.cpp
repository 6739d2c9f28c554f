#include "compiler/nvrtc.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nvrtc.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <regex>
#include <vector>

#include "compiler/codegen.h"
#include "moejit/moejit.h"

#ifndef MOEJIT_CUDA_INCLUDE_DIR
#define MOEJIT_CUDA_INCLUDE_DIR "/usr/local/cuda/include"
#endif

namespace moejit::compiler {

#define MOEJIT_NVRTC_CHECK(call, what)                                                        \
  do {                                                                                        \
    nvrtcResult r_ = (call);                                                                  \
    if (r_ != NVRTC_SUCCESS)                                                                  \
      throw Error(ErrorKind::Compile, fmt::format("{}: {} failed: {}", what, #call,           \
                                                  nvrtcGetErrorString(r_)));                  \
  } while (0)

const std::string& cuda_include_dir() {
  static const std::string dir = [] {
    std::vector<std::string> tried;
    for (const char* env : {"CUDA_HOME", "CUDA_PATH"})
      if (const char* v = std::getenv(env); v && *v) tried.push_back(std::string(v) + "/include");
    tried.push_back("/usr/local/cuda/include");
    tried.push_back(MOEJIT_CUDA_INCLUDE_DIR);
    for (const auto& d : tried)
      if (std::filesystem::exists(d + "/cuda_bf16.h")) return d;
    std::string list;
    for (const auto& d : tried) list += "\n  " + d;
    throw Error(ErrorKind::Compile,
                "NVRTC needs the CUDA toolkit headers (cuda_bf16.h) and none of these has them:" +
                    list + "\nSet CUDA_HOME to the toolkit's root.");
  }();
  return dir;
}

// The targets this NVRTC compiles (compute capability x 10, e.g. 80, 90, 100).
const std::vector<int>& nvrtc_archs() {
  static const std::vector<int> archs = [] {
    int n = 0;
    MOEJIT_NVRTC_CHECK(nvrtcGetNumSupportedArchs(&n), "arch list");
    std::vector<int> v(static_cast<size_t>(n));
    if (n > 0) MOEJIT_NVRTC_CHECK(nvrtcGetSupportedArchs(v.data()), "arch list");
    return v;
  }();
  return archs;
}

void check_arch(const std::string& arch) {
  // sm_NN or sm_NNN, from sm_80, that NVRTC knows; an "a" suffix (arch-specific features) from
  // sm_90, an "f" (family) from sm_100.
  static const std::regex re("sm_([0-9]{2,3})([af]?)");
  std::smatch m;
  bool ok = std::regex_match(arch, m, re);
  if (ok) {
    const int cc = std::stoi(m[1].str());
    const std::string suffix = m[2].str();
    const std::vector<int>& known = nvrtc_archs();
    int major = 0, minor = 0;
    nvrtcVersion(&major, &minor);
    const bool family_targets = major > 12 || (major == 12 && minor >= 9);  // "f": CUDA 12.9
    ok = cc >= 80 && std::find(known.begin(), known.end(), cc) != known.end() &&
         (suffix.empty() || (suffix == "a" && cc >= 90) ||
          (suffix == "f" && cc >= 100 && family_targets));
  }
  if (ok) return;
  std::vector<std::string> names;
  for (int cc : nvrtc_archs())
    if (cc >= 80) names.push_back(fmt::format("sm_{}", cc));
  throw Error(ErrorKind::InvalidArgument,
              fmt::format("arch = '{}' is not a supported target: NVRTC {} compiles {} (an 'a' "
                          "suffix from sm_90, e.g. sm_90a; an 'f' suffix from sm_100)",
                          arch, nvrtc_version(), fmt::join(names, ", ")));
}

std::string nvrtc_version() {
  int major = 0, minor = 0;
  nvrtcVersion(&major, &minor);
  return fmt::format("{}.{}", major, minor);
}

std::vector<std::string> nvrtc_options(const std::string& arch, bool ptx) {
  check_arch(arch);
  std::vector<std::string> opts = {
      (ptx ? "--gpu-architecture=compute_" : "--gpu-architecture=sm_") + arch.substr(3),
      "-std=c++17", "-DNDEBUG",
      // 177: a Cfg constant the instantiated template does not use.
      "--diag-suppress=177"};
  if (!ptx) opts.push_back("-Xptxas=-v");
  return opts;
}

CompileOutput nvrtc_compile(const std::string& kernel_name, const std::string& source,
                            const std::string& arch, bool ptx) {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<TemplateFile> headers = embedded_templates();
  std::vector<const char*> header_text, header_names;
  for (const auto& h : headers) {
    header_text.push_back(h.text);
    header_names.push_back(h.name);
  }
  nvrtcProgram prog;
  MOEJIT_NVRTC_CHECK(nvrtcCreateProgram(&prog, source.c_str(), (kernel_name + ".cu").c_str(),
                                        static_cast<int>(headers.size()), header_text.data(),
                                        header_names.data()),
                     kernel_name);
  struct Guard {
    nvrtcProgram* p;
    ~Guard() { nvrtcDestroyProgram(p); }
  } guard{&prog};

  std::vector<std::string> opts = nvrtc_options(arch, ptx);
  opts.push_back("-I" + cuda_include_dir());
  std::vector<const char*> copts;
  for (const auto& o : opts) copts.push_back(o.c_str());
  const nvrtcResult rc = nvrtcCompileProgram(prog, static_cast<int>(copts.size()), copts.data());

  CompileOutput out;
  size_t log_size = 0;
  MOEJIT_NVRTC_CHECK(nvrtcGetProgramLogSize(prog, &log_size), kernel_name);
  out.log.resize(log_size);
  if (log_size) MOEJIT_NVRTC_CHECK(nvrtcGetProgramLog(prog, out.log.data()), kernel_name);
  while (!out.log.empty() && out.log.back() == '\0') out.log.pop_back();
  if (rc != NVRTC_SUCCESS)
    throw Error(ErrorKind::Compile,
                fmt::format("NVRTC failed to compile kernel '{}' for {}: {}\n{}", kernel_name,
                            arch, nvrtcGetErrorString(rc), out.log));
  size_t size = 0;
  if (ptx) {
    MOEJIT_NVRTC_CHECK(nvrtcGetPTXSize(prog, &size), kernel_name);
    out.binary.resize(size);
    MOEJIT_NVRTC_CHECK(nvrtcGetPTX(prog, out.binary.data()), kernel_name);
    while (!out.binary.empty() && out.binary.back() == '\0') out.binary.pop_back();
  } else {
    MOEJIT_NVRTC_CHECK(nvrtcGetCUBINSize(prog, &size), kernel_name);
    out.binary.resize(size);
    MOEJIT_NVRTC_CHECK(nvrtcGetCUBIN(prog, out.binary.data()), kernel_name);
  }
  out.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
               .count();
  return out;
}

ResourceUsage parse_ptxas_log(const std::string& log) {
  ResourceUsage u;
  std::smatch m;
  static const std::regex regs("Used ([0-9]+) registers");
  static const std::regex frame(
      "([0-9]+) bytes stack frame, ([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads");
  if (std::regex_search(log, m, regs)) u.registers = std::stoi(m[1]);
  if (std::regex_search(log, m, frame)) {
    u.stack_bytes = std::stoi(m[1]);
    u.spill_store_bytes = std::stoi(m[2]);
    u.spill_load_bytes = std::stoi(m[3]);
  }
  return u;
}

}  // namespace moejit::compiler
