// CUDA code generation: one thin translation unit per planned kernel. Each unit defines a
// Cfg struct of shape constants and an extern "C" entry that instantiates a hand-written
// template from templates/ (embedded into the library at build time).
#pragma once

#include <string>
#include <vector>

#include "compiler/plan.h"

namespace moejit::compiler {

struct KernelSource {
  std::string name;    // plan kernel name ("gemm1_b0")
  std::string entry;   // extern "C" symbol ("moejit_gemm1_b0")
  std::string source;  // the translation unit
  int threads = 0;     // block size the entry is compiled for
  int dynamic_smem = 0;  // dynamic shared memory bytes per block
  bool persistent = false;  // grid = blocks that fit on the device (stream GEMMs)
  bool cooperative = false;  // one cooperative launch of a fixed grid (the resident layer)
  int grid = 0;              // that grid
};

KernelSource generate(const Plan& plan, const KernelPlan& kernel);
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
