// Probe: what the launch shape of a one-token layer costs in the bench's timing (one-kernel or
// two-kernel CUDA graphs replayed back to back, events around each replay: queued_us), with no
// memory traffic. Three questions:
//   1. A cooperative launch (the resident one-token layer: 132 blocks of 512 threads, one per SM)
//      against the same kernel launched plainly.
//   2. The pipeline's two nodes (a 1-block kernel, then a PDL-launched grid of 264 blocks of 192
//      threads whose blocks poll the first kernel's flag, as kimi-k2's chain polls the fused
//      route+dispatch block's word) against one kernel of 264 blocks in which block 0 does the
//      first kernel's part and the others poll it.
//   3. The same with a spin of `work` ns in the single block (routing) and of 5 us in every block
//      after the flag (the GEMMs), so that the launches overlap work as in the layer.
// Not part of the library; build and run by hand:
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o probe_launch bench/probe_launch.cu && ./probe_launch
#include "probe_common.cuh"

#include <string>

__device__ __forceinline__ unsigned long long gtime() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void spin_ns(unsigned ns) {
  if (ns == 0) return;
  const unsigned long long t0 = gtime();
  while (gtime() - t0 < ns) {
  }
}
__device__ __forceinline__ int ld_acq(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_rel(int* p, int v) {
  asm volatile("st.release.gpu.global.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// Question 1: an empty kernel of the resident layer's grid.
__global__ void __launch_bounds__(512, 1) wide_empty(uint32_t* sink, int never) {
  if (never == 12345) sink[0] = 1;
}

// Question 2 / 3, two kernels: `first` (1 block) spins `work` ns and publishes `epoch` in *flag;
// `second` (PDL) lets its blocks start at once, polls the flag, then spins `after` ns.
__global__ void __launch_bounds__(512) first(int* flag, int epoch, unsigned work) {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  if (threadIdx.x == 0) {
    spin_ns(work);
    st_rel(flag, epoch);
  }
}
__global__ void __launch_bounds__(192) second(const int* flag, int epoch, unsigned after) {
  if (threadIdx.x == 0)
    while (ld_acq(flag) != epoch) {
    }
  __syncthreads();
  if (threadIdx.x == 0) spin_ns(after);
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}
// One kernel: block 0's thread 0 does `first`'s part, every block then does `second`'s.
__global__ void __launch_bounds__(192) merged(int* flag, int epoch, unsigned work, unsigned after) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    spin_ns(work);
    st_rel(flag, epoch);
  }
  if (threadIdx.x == 0)
    while (ld_acq(flag) != epoch) {
    }
  __syncthreads();
  if (threadIdx.x == 0) spin_ns(after);
}

template <class K, class... A>
void launch_ex(cudaStream_t s, K kernel, int grid, int block, bool coop, bool pdl, A... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(block);
  cfg.stream = s;
  cudaLaunchAttribute attr{};
  if (coop) {
    attr.id = cudaLaunchAttributeCooperative;
    attr.val.cooperative = 1;
  } else {
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
  }
  cfg.attrs = &attr;
  cfg.numAttrs = coop || pdl ? 1 : 0;
  CK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

int main(int argc, char** argv) {
  // "coop": question 1 only, six alternations (its figures vary from pass to pass).
  const bool coop_only = argc > 1 && std::string(argv[1]) == "coop";
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  std::printf("card: %s, %d SMs\n", prop.name, sms);
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  uint32_t* sink;
  CK(cudaMalloc(&sink, 64));
  int* flags;  // one flag per graph: graph j publishes epochs j + 1, j + 1 + kG, ... never reused
  constexpr int kG = 16;
  CK(cudaMalloc(&flags, kG * sizeof(int)));
  CK(cudaMemset(flags, 0, kG * sizeof(int)));
  auto graph_us = [&](auto&& enqueue) {
    // 2 kG graphs replayed in turn (a kernel's epoch is a parameter, fixed in its graph): graph j
    // polls flag j % kG for epoch 1 + j / kG, so the flag's value before a replay is always the
    // other epoch (or 0 at first) until that replay's own single block publishes it.
    std::vector<cudaGraphExec_t> gs(2 * kG);
    for (int j = 0; j < 2 * kG; ++j) gs[j] = capture(s, [&] { enqueue(flags + (j % kG), 1 + j / kG); });
    long long rep = 0;
    const double us = queued_us([&](int) { CK(cudaGraphLaunch(gs[rep++ % (2 * kG)], s)); }, 200, s);
    for (auto g : gs) CK(cudaGraphExecDestroy(g));
    CK(cudaStreamSynchronize(s));
    return us;
  };
  for (int pass = 0; pass < (coop_only ? 6 : 2); ++pass) {
    std::printf("pass %d\n", pass + 1);
    const double plain = graph_us([&](int*, int) { launch_ex(s, wide_empty, sms, 512, false, false, sink, 0); });
    const double coop = graph_us([&](int*, int) { launch_ex(s, wide_empty, sms, 512, true, false, sink, 0); });
    const double plain2 = graph_us([&](int*, int) { launch_ex(s, wide_empty, sms, 512, false, false, sink, 0); });
    std::printf("  %d x 512 empty kernel: plain %.2f us, cooperative %.2f us, plain %.2f us\n", sms, plain, coop,
                plain2);
    if (coop_only) continue;
    const int grid = 2 * sms;
    for (unsigned work : {0u, 2000u}) {
      for (unsigned after : {0u, 5000u}) {
        const double two = graph_us([&](int* f, int ep) {
          launch_ex(s, first, 1, 512, false, false, f, ep, work);
          launch_ex(s, second, grid, 192, false, true, static_cast<const int*>(f), ep, after);
        });
        const double one = graph_us([&](int* f, int ep) { launch_ex(s, merged, grid, 192, false, false, f, ep, work, after); });
        std::printf("  1-block spin %4u ns, then %d blocks spin %4u ns: two kernels (PDL) %.2f us, one kernel %.2f us\n",
                    work, grid, after, two, one);
      }
    }
  }
  return 0;
}
