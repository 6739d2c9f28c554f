#include "runtime/driver.h"

#include <dlfcn.h>
#include <fmt/format.h>
#include <nvrtc.h>

#include <mutex>

#include "moejit/moejit.h"

namespace moejit::runtime {

namespace {

struct Loaded {
  Driver api{};
  bool ok = false;
  std::string why_not;
};

const Loaded& loaded() {
  static const Loaded l = [] {
    Loaded r;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) lib = dlopen("libcuda.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* err = dlerror();
      r.why_not = "no CUDA driver: libcuda.so.1 could not be opened (" +
                  std::string(err ? err : "not found") + ")";
      return r;
    }
    // The version first: a driver too old for these kernels also lacks symbols the list below
    // asks for, and its version says more than a missing symbol would.
    int version = 0;
    auto get_version = reinterpret_cast<CUresult (*)(int*)>(dlsym(lib, "cuDriverGetVersion"));
    if (!get_version || get_version(&version) != CUDA_SUCCESS) {
      r.why_not = "libcuda has no working cuDriverGetVersion";
      return r;
    }
    int nvrtc_major = 0, nvrtc_minor = 0;
    nvrtcVersion(&nvrtc_major, &nvrtc_minor);
    if (std::string why = driver_version_problem(version, nvrtc_major); !why.empty()) {
      r.why_not = why;
      return r;
    }
    bool missing = false;
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (!fn) {
        missing = true;
        r.why_not = fmt::format("libcuda has no symbol {}", name);
      }
    };
    Driver& d = r.api;
    sym(d.cuInit, "cuInit");
    sym(d.cuDeviceGetCount, "cuDeviceGetCount");
    sym(d.cuDeviceGet, "cuDeviceGet");
    sym(d.cuDeviceGetAttribute, "cuDeviceGetAttribute");
    sym(d.cuDeviceGetName, "cuDeviceGetName");
    sym(d.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    sym(d.cuCtxGetCurrent, "cuCtxGetCurrent");
    sym(d.cuCtxSetCurrent, "cuCtxSetCurrent");
    sym(d.cuCtxGetDevice, "cuCtxGetDevice");
    sym(d.cuModuleLoadData, "cuModuleLoadData");
    sym(d.cuModuleUnload, "cuModuleUnload");
    sym(d.cuModuleGetFunction, "cuModuleGetFunction");
    sym(d.cuLaunchKernel, "cuLaunchKernel");
    sym(d.cuFuncSetAttribute, "cuFuncSetAttribute");
    sym(d.cuMemsetD32Async, "cuMemsetD32Async");
    sym(d.cuOccupancyMaxActiveBlocksPerMultiprocessor, "cuOccupancyMaxActiveBlocksPerMultiprocessor");
    sym(d.cuGetErrorName, "cuGetErrorName");
    sym(d.cuGetErrorString, "cuGetErrorString");
    sym(d.cuCtxGetId, "cuCtxGetId");
    if (missing) return r;
    d.cuLaunchKernelEx = reinterpret_cast<decltype(d.cuLaunchKernelEx)>(dlsym(lib, "cuLaunchKernelEx"));
    d.cuTensorMapEncodeTiled =
        reinterpret_cast<decltype(d.cuTensorMapEncodeTiled)>(dlsym(lib, "cuTensorMapEncodeTiled"));
    if (CUresult e = d.cuInit(0); e != CUDA_SUCCESS) {
      const char* s = nullptr;
      d.cuGetErrorString(e, &s);
      r.why_not = fmt::format("cuInit failed: {}", s ? s : "unknown error");
      return r;
    }
    int count = 0;
    if (d.cuDeviceGetCount(&count) != CUDA_SUCCESS || count == 0) {
      r.why_not = "the CUDA driver reports no GPU";
      return r;
    }
    r.ok = true;
    return r;
  }();
  return l;
}

}  // namespace

std::string driver_version_problem(int driver_version, int nvrtc_major) {
  if (driver_version >= 1000 * nvrtc_major) return "";
  return fmt::format(
      "the CUDA driver supports CUDA {}.{} (cuDriverGetVersion {}), and the kernels that NVRTC "
      "{}.x compiles need a driver for CUDA {}.0 or newer{}; upgrade the driver or install the "
      "cuda-compat package of CUDA {}",
      driver_version / 1000, driver_version % 1000 / 10, driver_version, nvrtc_major, nvrtc_major,
      nvrtc_major == 13 ? " (r580 or later)" : "", nvrtc_major);
}

const Driver* driver_or_null(std::string* why_not) {
  const Loaded& l = loaded();
  if (!l.ok && why_not) *why_not = l.why_not;
  return l.ok ? &l.api : nullptr;
}

const Driver& driver() {
  std::string why;
  const Driver* d = driver_or_null(&why);
  if (!d) throw Error(ErrorKind::Cuda, why + "; a GPU and its driver are needed to load and "
                                             "launch kernels (dump and compile work without)");
  return *d;
}

void check_cu(CUresult r, const char* call, const char* file, int line) {
  if (r == CUDA_SUCCESS) return;
  const char* name = nullptr;
  const char* text = nullptr;
  const Driver* d = driver_or_null(nullptr);
  if (d) {
    d->cuGetErrorName(r, &name);
    d->cuGetErrorString(r, &text);
  }
  throw Error(ErrorKind::Cuda, fmt::format("{} failed with {} ({}) at {}:{}", call,
                                           name ? name : std::to_string(r).c_str(),
                                           text ? text : "no description", file, line));
}

CUcontext ensure_context(CUdevice* device) {
  const Driver& d = driver();
  CUcontext ctx = nullptr;
  MOEJIT_CU_CHECK(d.cuCtxGetCurrent(&ctx));
  if (!ctx) {
    CUdevice dev;
    MOEJIT_CU_CHECK(d.cuDeviceGet(&dev, 0));
    MOEJIT_CU_CHECK(d.cuDevicePrimaryCtxRetain(&ctx, dev));
    MOEJIT_CU_CHECK(d.cuCtxSetCurrent(ctx));
  }
  if (device) MOEJIT_CU_CHECK(d.cuCtxGetDevice(device));
  return ctx;
}

unsigned long long context_id(CUcontext ctx) {
  const Driver& d = driver();
  unsigned long long id = 0;
  MOEJIT_CU_CHECK(d.cuCtxGetId(ctx, &id));
  return id;
}

std::string arch_of(CUdevice device) {
  const Driver& d = driver();
  int major = 0, minor = 0;
  MOEJIT_CU_CHECK(d.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device));
  MOEJIT_CU_CHECK(d.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device));
  // Arch-specific features (wgmma, setmaxnreg) need the 'a' target on 9.0 and newer.
  return fmt::format("sm_{}{}{}", major, minor, major >= 9 ? "a" : "");
}

}  // namespace moejit::runtime
