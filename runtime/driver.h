// The CUDA driver API, opened lazily with dlopen so that the library, the CLI and the CPU tests
// run on machines without a GPU driver. Every call goes through MOEJIT_CU_CHECK.
#pragma once

#include <cuda.h>

#include <string>

namespace moejit::runtime {

struct Driver {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuDeviceGetCount)(int*);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDeviceGetAttribute)(int*, CUdevice_attribute, CUdevice);
  CUresult (*cuDeviceGetName)(char*, int, CUdevice);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuCtxGetDevice)(CUdevice*);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleUnload)(CUmodule);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void**, void**);
  // Optional (nullptr on drivers without it): launches with attributes, for PDL.
  CUresult (*cuLaunchKernelEx)(const CUlaunchConfig*, CUfunction, void**, void**);
  // Optional (nullptr on drivers without it): TMA descriptors for the stream GEMMs' tma path.
  CUresult (*cuTensorMapEncodeTiled)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                     const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                     const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                     CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  // A context's id, unique in the process (from CUDA 12.0; every driver that passes
  // driver_version_problem() has it).
  CUresult (*cuCtxGetId)(CUcontext, unsigned long long*);
  CUresult (*cuFuncSetAttribute)(CUfunction, CUfunction_attribute, int);
  CUresult (*cuMemsetD32Async)(CUdeviceptr, unsigned, size_t, CUstream);
  CUresult (*cuOccupancyMaxActiveBlocksPerMultiprocessor)(int*, CUfunction, int, size_t);
  CUresult (*cuGetErrorName)(CUresult, const char**);
  CUresult (*cuGetErrorString)(CUresult, const char**);
};

// Why a driver that reports `driver_version` (cuDriverGetVersion: 1000 * major + 10 * minor)
// cannot run the kernels that NVRTC `nvrtc_major`.x compiles, or "" when it can. A CUDA major
// release's CUBINs need a driver of that major release or newer (minor version compatibility
// covers the minors of one major release, e.g. NVRTC 13.2's CUBINs on a 13.0 driver, r580+).
std::string driver_version_problem(int driver_version, int nvrtc_major);

// The loaded driver, or nullptr with *why_not set (no libcuda, no device, init failure).
const Driver* driver_or_null(std::string* why_not);
// The loaded driver; throws Error(Cuda) saying why there is none.
const Driver& driver();

// Throws Error(Cuda) naming the call, the error and what to check.
void check_cu(CUresult r, const char* call, const char* file, int line);
#define MOEJIT_CU_CHECK(expr) ::moejit::runtime::check_cu((expr), #expr, __FILE__, __LINE__)

// Makes sure a context is current (the runtime's primary context of device 0 if none is) and
// returns it with its device.
CUcontext ensure_context(CUdevice* device = nullptr);

// An id of `ctx` that no later context of the process takes (cuCtxGetId), so that what was
// loaded in a destroyed or reset context is never taken for a live one's.
unsigned long long context_id(CUcontext ctx);

// "sm_90a" for compute capability 9.0, "sm_80" for 8.0, "sm_100a" for 10.0, ...
std::string arch_of(CUdevice device);

}  // namespace moejit::runtime
