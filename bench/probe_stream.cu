// Probe: how fast can the stream family's producer ring move MXINT4 expert weights when the
// consumers do no arithmetic? Separates the memory side (access pattern, bytes in flight) from
// the consumers' instruction cost. Not part of the library; build and run by hand:
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o probe_stream bench/probe_stream.cu && ./probe_stream
//
// Shape: kimi-k2's gemm1 at one token (8 experts x 4096 rows x 7168 int4 = 117 MB per layer,
// scales left out). A persistent grid of 2 blocks per SM, 4 producer warps (16-byte cp.async,
// one mbarrier arrive per thread per stage) and 4 consumer warps (wait, read the stage from
// shared memory, release). Work unit = 32 rows x all of K, numbered like the library's
// (tile fastest, so at one token consecutive blocks take different experts).
// Layouts: 0 = canonical [E, rows, K/2] (a stage is 32 row pieces of KC/2 bytes);
//          1 = tile-contiguous (a unit's stage is one contiguous block of 32 * KC/2 bytes).
// Every replay touches 8 experts not touched by the previous 16 (17 disjoint sets over a
// 2 GB buffer), so nothing is served from L2. Times: CUDA events, median of 30.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                       \
  do {                                                                              \
    cudaError_t e_ = (x);                                                           \
    if (e_ != cudaSuccess) {                                                        \
      std::printf("%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));      \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

constexpr int kRows = 4096;
constexpr int kK = 7168;
constexpr long long kRowBytes = kK / 2;
constexpr long long kExpertBytes = kRows * kRowBytes;
constexpr int kSets = 17;
constexpr int kTopK = 8;

__device__ __forceinline__ uint32_t su32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mwait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2, %3;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(su32(bar)), "r"(parity), "r"(2000)
        : "memory");
  } while (!done);
}

template <int KC, int NS, int kLayout>
__global__ void __launch_bounds__(256, 2) probe(const uint8_t* w, const int* experts, uint32_t* sink,
                                                int rows, int k) {
  constexpr int kStageW = 32 * KC / 2;
  constexpr int kChunks = kStageW / 16;
  constexpr int kPer = kChunks / 128;
  const int kStages = k / KC;
  const int kSlices = rows / 32;
  const long long kRowBytes = k / 2;
  const long long kExpertBytes = kRowBytes * rows;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ uint64_t full[NS], empty[NS];
  const int tid = threadIdx.x, warp = tid >> 5;
  if (tid == 0) {
    for (int s = 0; s < NS; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(su32(&full[s])), "r"(128));
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(su32(&empty[s])), "r"(4));
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int n_units = kTopK * kSlices;
  int slot = 0;
  uint32_t parity;
  if (warp >= 4) {
    const int pt = tid - 128;
    parity = 1;
    for (int u = blockIdx.x; u < n_units; u += gridDim.x) {
      const long long e = experts[u % kTopK];
      const int slice = u / kTopK;
      for (int ks = 0; ks < kStages; ++ks) {
        if (pt == 0) mwait(&empty[slot], parity);
        asm volatile("barrier.sync 2, 128;\n" ::: "memory");
        const uint32_t dst = su32(smem) + slot * kStageW;
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int c = pt + j * 128;
          const uint8_t* src;
          if (kLayout == 0) {
            const int r = c / (KC / 32), col = c % (KC / 32);
            src = w + e * kExpertBytes + (slice * 32 + r) * kRowBytes + ks * (KC / 2) + col * 16;
          } else {
            src = w + e * kExpertBytes + (static_cast<long long>(slice) * kStages + ks) * kStageW + c * 16;
          }
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst + c * 16), "l"(src)
                       : "memory");
        }
        asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(su32(&full[slot]))
                     : "memory");
        if (++slot == NS) slot = 0, parity ^= 1;
      }
    }
    return;
  }
  parity = 0;
  uint32_t acc = 0;
  for (int u = blockIdx.x; u < n_units; u += gridDim.x) {
    for (int ks = 0; ks < kStages; ++ks) {
      mwait(&full[slot], parity);
      const uint4* st = reinterpret_cast<const uint4*>(smem + slot * kStageW);
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const uint4 v = st[tid + j * 128];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
      }
      __syncwarp();
      if ((tid & 31) == 0)
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(su32(&empty[slot])) : "memory");
      if (++slot == NS) slot = 0, parity ^= 1;
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

// Plain read of the same bytes as one contiguous range (the best case for a read stream).
__global__ void __launch_bounds__(512) linear_read(const uint4* w, long long n16, uint32_t* sink) {
  uint32_t acc = 0;
  for (long long i = blockIdx.x * 512LL + threadIdx.x; i < n16; i += 512LL * gridDim.x) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(w + i));
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

template <class F>
static double median_us(F&& launch, int reps) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int i = 0; i < reps + 5; ++i) {
    CK(cudaEventRecord(a));
    launch(i);
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    if (i >= 5) t.push_back(ms * 1000.0f);
  }
  CK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  return t[t.size() / 2];
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  const long long total = kSets * kTopK * kExpertBytes;
  uint8_t* w;
  CK(cudaMalloc(&w, total));
  CK(cudaMemset(w, 0x5a, total));
  std::vector<int> h(kSets * kTopK);
  for (int s = 0; s < kSets; ++s)
    for (int j = 0; j < kTopK; ++j) h[s * kTopK + j] = s * kTopK + j;
  int* experts;
  uint32_t* sink;
  CK(cudaMalloc(&experts, h.size() * sizeof(int)));
  CK(cudaMalloc(&sink, 4));
  CK(cudaMemcpy(experts, h.data(), h.size() * sizeof(int), cudaMemcpyHostToDevice));
  const double layer_bytes = kTopK * double(kExpertBytes);
  std::printf("card: %s, %d SMs; bytes per layer %.1f MB\n", prop.name, sms, layer_bytes / 1e6);

  // Copy baseline (bytes read + written), 512 MiB.
  const long long cb = 1LL << 29;
  const double copy_us = median_us([&](int) { CK(cudaMemcpyAsync(w + cb, w, cb, cudaMemcpyDeviceToDevice)); }, 20);
  const double copy_gbs = 2.0 * cb / copy_us / 1e3;
  std::printf("copy D2D 512 MiB: %.1f us, %.0f GB/s (read + write)\n", copy_us, copy_gbs);
  const double lin_us = median_us(
      [&](int i) {
        linear_read<<<sms * 4, 512>>>(reinterpret_cast<const uint4*>(w + (i % kSets) * kTopK * kExpertBytes),
                                      static_cast<long long>(layer_bytes / 16), sink);
      },
      30);
  std::printf("linear read of %.0f MB: %.1f us, %.0f GB/s = %.1f%% of copy\n", layer_bytes / 1e6, lin_us,
              layer_bytes / lin_us / 1e3, 100.0 * layer_bytes / lin_us / 1e3 / copy_gbs);

  // rows x k: one expert's matrix; pad: shared memory requested per block (at least the ring),
  // which sets the blocks per SM.
  auto run = [&](auto kern, int kc, int ns, int layout, int rows, int k, int pad_kb) {
    if (k % kc != 0) {  // the kernel streams whole stages only
      std::printf("%4d x %4d  KC %4d: skipped, K is not a multiple of the stage\n", rows, k, kc);
      return;
    }
    const int ring = 32 * kc / 2 * ns;
    const int smem = std::max(ring, pad_kb * 1024);
    CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int per_sm = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, 256, smem));
    const int grid = per_sm * sms;
    const double bytes = double(kTopK) * rows * (k / 2);
    const double us = median_us(
        [&](int i) { kern<<<grid, 256, smem>>>(w, experts + (i % kSets) * kTopK, sink, rows, k); }, 30);
    std::printf("%4d x %4d  KC %4d x %2d stages (%3d KB ring), %s, %d blocks/SM: %6.1f us, %5.0f GB/s = %5.1f%% of copy\n",
                rows, k, kc, ns, ring / 1024, layout ? "tile-contig" : "canonical  ", per_sm, us,
                bytes / us / 1e3, 100.0 * bytes / us / 1e3 / copy_gbs);
  };
  // gemm1 of kimi-k2 (4096 x 7168; K a multiple of each stage)
  run(probe<1024, 3, 0>, 1024, 3, 0, 4096, 7168, 0);
  run(probe<1024, 3, 0>, 1024, 3, 0, 4096, 7168, 104);
  run(probe<1024, 3, 1>, 1024, 3, 1, 4096, 7168, 104);
  run(probe<1024, 5, 0>, 1024, 5, 0, 4096, 7168, 104);
  run(probe<1024, 6, 0>, 1024, 6, 0, 4096, 7168, 104);
  run(probe<512, 6, 0>, 512, 6, 0, 4096, 7168, 104);
  run(probe<512, 12, 0>, 512, 12, 0, 4096, 7168, 104);
  run(probe<256, 12, 0>, 256, 12, 0, 4096, 7168, 104);
  // gemm2 of kimi-k2 (7168 x 2048)
  run(probe<512, 4, 0>, 512, 4, 0, 7168, 2048, 104);
  run(probe<512, 8, 0>, 512, 8, 0, 7168, 2048, 104);
  run(probe<512, 12, 0>, 512, 12, 0, 7168, 2048, 104);
  run(probe<1024, 3, 0>, 1024, 3, 0, 7168, 2048, 104);
  run(probe<1024, 6, 0>, 1024, 6, 0, 7168, 2048, 104);
  run(probe<2048, 3, 0>, 2048, 3, 0, 7168, 2048, 104);
  // kimi-k2-tp8 gemm1 (512 x 7168: 128 units) and gemm2 (7168 x 256)
  run(probe<1024, 3, 0>, 1024, 3, 0, 512, 7168, 104);
  run(probe<1024, 6, 0>, 1024, 6, 0, 512, 7168, 104);
  run(probe<256, 12, 0>, 256, 12, 0, 7168, 256, 104);
  CK(cudaDeviceSynchronize());
  return 0;
}
