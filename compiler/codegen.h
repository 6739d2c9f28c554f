// CUDA code generation: one thin translation unit per planned kernel. Each unit defines a
// Cfg struct of shape constants and an extern "C" entry that instantiates a hand-written
// template from templates/ (embedded into the library at build time).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "compiler/plan.h"

namespace moejit::compiler {

struct KernelSource {
  KernelSource() = default;
  KernelSource(std::string name_, std::string entry_, std::string source_, int threads_)
      : name(std::move(name_)), entry(std::move(entry_)), source(std::move(source_)), threads(threads_) {}
  std::string name;    // plan kernel name ("gemm1_b0")
  std::string entry;   // extern "C" symbol ("moejit_gemm1_b0")
  std::string source;  // the translation unit
  int threads = 0;     // block size the entry is compiled for
  int dynamic_smem = 0;  // dynamic shared memory bytes per block
  bool persistent = false;  // grid = blocks that fit on the device (stream GEMMs)
  bool cooperative = false;  // one cooperative launch of a fixed grid (the resident layer)
  int grid = 0;              // that grid
  // Where this kernel's code equals an earlier kernel's of the plan but for its name (the same
  // stream GEMM in several token buckets): that kernel's index in generate_all's list, else -1.
  // Its entry and source are then that kernel's, so that the runtime compiles and loads the code
  // once and both kernels launch one function.
  int same_as = -1;
};

// What two kernels must have equal to share one function (besides their source): every field
// the runtime sets on, or launches, a function by. A field added to KernelSource that the
// runtime reads per kernel belongs here.
inline bool same_launch(const KernelSource& a, const KernelSource& b) {
  return a.threads == b.threads && a.dynamic_smem == b.dynamic_smem && a.persistent == b.persistent &&
         a.cooperative == b.cooperative && a.grid == b.grid;
}

KernelSource generate(const Plan& plan, const KernelPlan& kernel);
// Every kernel of the plan, in plan order; kernels of equal code share the first one's entry and
// source (KernelSource::same_as).
std::vector<KernelSource> generate_all(const Plan& plan);

// Launch constants shared by codegen and the launcher.
constexpr int kRouteWarpsPerBlock = 4;
constexpr int kDispatchThreads = 256;

// The embedded templates (name, text), for NVRTC's in-memory headers and the cache key.
struct TemplateFile {
  const char* name;
  const char* text;
};
std::vector<TemplateFile> embedded_templates();

}  // namespace moejit::compiler
