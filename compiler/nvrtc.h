// NVRTC: generated CUDA -> CUBIN (or PTX) for one exact arch. Embedded templates are passed as
// in-memory headers; the toolkit's headers (cuda_bf16.h) come from CUDA_HOME or /usr/local/cuda.
#pragma once

#include <string>
#include <vector>

namespace moejit::compiler {

struct CompileOutput {
  std::vector<char> binary;  // CUBIN bytes, or PTX text when ptx was asked for
  std::string log;           // NVRTC log including ptxas -v resource lines
  double ms = 0;
};

// Options that change the binary, normalised (no paths): what the cache key hashes.
std::vector<std::string> nvrtc_options(const std::string& arch, bool ptx);

// Throws Error(Compile) carrying the kernel name and NVRTC's log.
CompileOutput nvrtc_compile(const std::string& kernel_name, const std::string& source,
                            const std::string& arch, bool ptx = false);

// "sm_90a" -> true; validates the arch string (Error(InvalidArgument) otherwise).
void check_arch(const std::string& arch);

// NVRTC's version as "major.minor".
std::string nvrtc_version();

// Resource figures parsed from a ptxas -v log.
struct ResourceUsage {
  int registers = 0;
  int spill_store_bytes = 0;
  int spill_load_bytes = 0;
  int stack_bytes = 0;
};
ResourceUsage parse_ptxas_log(const std::string& log);

// The directory holding cuda_bf16.h; throws listing the paths searched.
const std::string& cuda_include_dir();

}  // namespace moejit::compiler
