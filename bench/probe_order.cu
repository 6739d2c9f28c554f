// Probe: does it matter which addresses the blocks of a stream read at the same time? The stream
// GEMMs' tiled weights keep a unit's stages together ([expert][unit][stage]), so 264 blocks
// stream 264 regions of the expert buffers at once. Here the same ring (one TMA thread, bulk
// copies of one stage, three stages, two blocks per SM, units from a counter, consumers that only
// read) reads the same bytes laid out
//   unit-major  ([expert][unit][stage]: the library's tiled layout),
//   stage-major ([expert][stage][unit]: the blocks on one expert's units read neighbouring stages),
//   lockstep    (block b's i-th stage is stage i * grid + b of the whole range: all blocks read
//                one window of grid stages at a time; where the units do not fill the last round,
//                its windows reach up to ~7 MB past the range, inside the buffer: the same bytes
//                in count),
// and a plain linear read of the range (16-byte loads, 4 blocks of 512 threads per SM). Each is
// timed for 8 and 16 experts of kimi-k2's gemm1 (4096 x 7168 int4: 14.7 MB each), so that the
// difference gives the marginal rate without the launch; then the library's order and the plain
// read alone for 1, 2, 13 and 14 experts. Not part of the library; build and run by hand:
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o probe_order bench/probe_order.cu && ./probe_order
#include "probe_common.cuh"

constexpr int kRows = 4096, kK = 7168;        // kimi-k2 gemm1, one expert
constexpr long long kExpertBytes = 1LL * kRows * kK / 2;
constexpr int kR = 64, kKC = 512, kNS = 3;    // 64-row units, 512-deep stages of 16 KiB
constexpr int kStageW = kR * kKC / 2;
constexpr int kStagesPerUnit = kK / kKC;       // 14
constexpr int kSlices = kRows / kR;            // 64 units per expert
constexpr int kUnitMajor = 0, kStageMajor = 1, kLockstep = 2;

template <int kMode>
__global__ void __launch_bounds__(160) ring(const uint8_t* w, int n_experts, uint32_t* sink, int* counter) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = align_1k(smem_raw);
  __shared__ uint64_t full[kNS], empty[kNS];
  __shared__ int unit_q[64];
  const int tid = threadIdx.x, warp = tid >> 5;
  init_ring(full, empty, kNS, 1);
  const int n_units = n_experts * kSlices;
  if (warp == 4) {
    if (tid != 128) return;
    // Lockstep deals units round-robin (no counter): the block's units are u, u + grid, ...
    ring_produce<kNS>(smem, full, empty, unit_q, n_units, kStagesPerUnit, kStageW,
                      kMode == kLockstep ? nullptr : counter, [&](int u, int ks) {
                        const long long e = u / kSlices, s = u % kSlices;
                        long long off;
                        if constexpr (kMode == kUnitMajor) off = e * kExpertBytes + (s * kStagesPerUnit + ks) * kStageW;
                        else if constexpr (kMode == kStageMajor) off = e * kExpertBytes + (ks * kSlices + s) * kStageW;
                        else  // lockstep: stage g of the range
                          off = ((static_cast<long long>(u - blockIdx.x) * kStagesPerUnit +
                                  ks * static_cast<long long>(gridDim.x)) + blockIdx.x) * kStageW;
                        return w + off;
                      });
    return;
  }
  consume_queue<kStageW, kNS>(smem, full, empty, unit_q, kStagesPerUnit, sink);
}

int main() {
  constexpr int kSets = 8;  // 8 disjoint ranges of 16 experts: 1.9 GB, rotated
  const ProbeSetup ps = probe_setup(kSets * 16 * kExpertBytes, kSets, 16);
  int* counters;
  CK(cudaMalloc(&counters, 64 * sizeof(int)));
  const int smem = kStageW * kNS + 1024;
  auto time_ring = [&](auto kern, const char* name, int n_experts) {
    CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const int grid = 2 * ps.sms;
    const double us = median_us(
        [&](int i) {
          kern<<<grid, 160, smem>>>(ps.w + (i % kSets) * 16 * kExpertBytes, n_experts, ps.sink, counters + (i % 64));
        },
        40, [&](int i) { CK(cudaMemsetAsync(counters + (i % 64), 0, 4)); });
    const double bytes = double(n_experts) * kExpertBytes;
    std::printf("%-12s %2d experts (%6.1f MB): %7.1f us, %5.0f GB/s = %5.1f%% of copy\n", name, n_experts,
                bytes / 1e6, us, bytes / us / 1e3, 100.0 * bytes / us / 1e3 / ps.copy_gbs);
    return us;
  };
  auto time_linear = [&](int n_experts) {
    const long long n16 = n_experts * kExpertBytes / 16;
    const double us = median_us(
        [&](int i) {
          linear_read<<<4 * ps.sms, 512>>>(reinterpret_cast<const uint4*>(ps.w + (i % kSets) * 16 * kExpertBytes), n16,
                                           ps.sink);
        },
        40);
    const double bytes = double(n_experts) * kExpertBytes;
    std::printf("%-12s %2d experts (%6.1f MB): %7.1f us, %5.0f GB/s = %5.1f%% of copy\n", "linear read", n_experts,
                bytes / 1e6, us, bytes / us / 1e3, 100.0 * bytes / us / 1e3 / ps.copy_gbs);
    return us;
  };
  for (int rep = 0; rep < 2; ++rep) {
    double t[4][2];
    for (int j = 0; j < 2; ++j) {
      const int ne = j == 0 ? 8 : 16;
      t[0][j] = time_ring(ring<kUnitMajor>, "unit-major", ne);
      t[1][j] = time_ring(ring<kStageMajor>, "stage-major", ne);
      t[2][j] = time_ring(ring<kLockstep>, "lockstep", ne);
      t[3][j] = time_linear(ne);
    }
    const char* names[4] = {"unit-major", "stage-major", "lockstep", "linear read"};
    for (int m = 0; m < 4; ++m)
      std::printf("marginal %-12s %5.0f GB/s (8 more experts in %.1f us; fixed %.1f us)\n", names[m],
                  8 * kExpertBytes / (t[m][1] - t[m][0]) / 1e3, t[m][1] - t[m][0], 2 * t[m][0] - t[m][1]);
  }
  // The library's order alone at other sizes: 1-2 experts (the 21-25 MB of one qwen3-30b-a3b or
  // kimi-k2-tp8 token), 13.5 (the 198 MB of one kimi-k2 token: 13 and 14 bracket it).
  for (int ne : {1, 2, 13, 14}) {
    time_ring(ring<kUnitMajor>, "unit-major", ne);
    time_linear(ne);
  }
  CK(cudaDeviceSynchronize());
  return 0;
}
