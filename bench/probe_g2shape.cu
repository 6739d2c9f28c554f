// Probe: does the shape of gemm2's ring cap its stream at 8 qwen3-30b-a3b tokens? Section 57b of
// bench/RESULTS.md measured that gemm2 alone (528 blocks, four per SM, two 256-deep stages of 8 KiB
// of weights plus 1 KiB of scales, units of three stages from a counter) moves its 46 MB at ~2.5
// TB/s, and sections 57d-e found neither a third slot nor static units faster ("not explained").
// A ring of the probes' kind (bench/probe_common.cuh: one producer thread, bulk copies, four
// consumer warps that only read) streams the same 46 MB with that shape and with others, timed as
// one-kernel CUDA graphs replayed back to back (as `moejit bench` times the layer): if the
// gemm2-shaped ring alone is near 2.5 TB/s, the shape caps it; if it is near the ~4 TB/s of
// section 33's ring, what caps gemm2 is its own work (x, tables, arithmetic, epilogue). Weights
// rotate over 8 disjoint ranges; each run zeroes the counter of the run 32 later. Not part of the
// library; build and run by hand:
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o probe_g2shape bench/probe_g2shape.cu && ./probe_g2shape
//
// `./probe_g2shape work` instead gives the consumers stand-in work: each holds a stage's slot for
// a number of cycles after reading it (and, in the last rows, spends more after each unit).
#include "probe_common.cuh"

#include <string>

constexpr long long kBytes = 46006272LL;  // 52 experts x (2048 x 768 / 2 + 2048 x 24 x 2)
constexpr long long kSetStride = 64LL << 20;
constexpr long long kScaleBase = 8 * kSetStride;  // the scale copies' region, after the weights
constexpr int kSets = 8, kCounters = 64;

// kSB bytes of weights per stage in one bulk copy, plus (kSC > 0) a second copy of kSC bytes from
// the scale region, both into one slot of kSB + kSC bytes; kNS slots; units of spu stages.
template <int kSB, int kSC, int kNS>
__global__ void __launch_bounds__(160) ring(const uint8_t* w, const uint8_t* sc, int n_units, int spu,
                                            uint32_t* sink, int* counter, int* zero_later, int spin,
                                            int unit_spin) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = align_1k(smem_raw);
  __shared__ uint64_t full[kNS], empty[kNS];
  __shared__ int unit_q[64];
  constexpr int kSlot = kSB + kSC;
  const int tid = threadIdx.x, warp = tid >> 5;
  if (blockIdx.x == 0 && tid == 0) *zero_later = 0;
  init_ring(full, empty, kNS, 1);
  if (warp == 4) {
    if (tid != 128) return;
    uint32_t parity = 1;
    int slot = 0, i = 0;
    for (int u = blockIdx.x; u < n_units; ++i) {
      const int next = static_cast<int>(gridDim.x) + atomicAdd(counter, 1);
      for (int ks = 0; ks < spu; ++ks) {
        ring_claim(full, empty, unit_q, slot, parity, i, ks, u, kSlot);
        const long long st = static_cast<long long>(u) * spu + ks;
        bulk_copy(su32(smem) + slot * kSlot, w + st * kSB, kSB, &full[slot]);
        if (kSC > 0) bulk_copy(su32(smem) + slot * kSlot + kSB, sc + st * kSC, kSC, &full[slot]);
        if (++slot == kNS) slot = 0, parity ^= 1;
      }
      u = next;
    }
    ring_end(full, empty, unit_q, slot, parity, i);
    return;
  }
  consume_queue<kSB, kNS, kSlot>(smem, full, empty, unit_q, spu, sink, spin, unit_spin);
}

int main(int argc, char** argv) {
  const ProbeSetup ps = probe_setup(kScaleBase + kSets * kSetStride, kSets, 8);
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  int* counters;
  CK(cudaMalloc(&counters, kCounters * sizeof(int)));
  CK(cudaMemset(counters, 0, kCounters * sizeof(int)));
  long long run = 0;
  // One configuration: bps blocks per SM, units of spu stages; the weights of a run are kBytes
  // rounded to whole units (the scale copies come on top, as gemm2's do: 1/8 of the weights).
  // spin / unit_spin: consumer cycles per stage (its slot held) / after each unit.
  auto measure = [&](const char* name, auto kernel, int sb, int sc, int ns, int bps, int spu, int spin = 0,
                     int unit_spin = 0) {
    const int grid = bps * ps.sms;
    const int smem = (sb + sc) * ns + 1024;
    CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const long long unit_bytes = static_cast<long long>(sb) * spu;
    const int n_units = static_cast<int>((kBytes * 8 / 9 + unit_bytes / 2) / unit_bytes);
    const double bytes = double(n_units) * spu * (sb + sc);
    auto on = [&](long long r) {
      const int c = static_cast<int>(r % kCounters);
      const long long set = r % kSets;
      kernel<<<grid, 160, smem, s>>>(ps.w + set * kSetStride, ps.w + kScaleBase + set * (kSetStride / 8), n_units,
                                     spu, ps.sink, counters + c, counters + (c + kCounters / 2) % kCounters, spin,
                                     unit_spin);
      CK(cudaGetLastError());
    };
    for (int j = 0; j < kCounters; ++j) on(run++);  // warm-up, and the counters' cycle in step
    CK(cudaStreamSynchronize(s));
    std::vector<cudaGraphExec_t> gs(kCounters);
    const long long base = run;
    for (int j = 0; j < kCounters; ++j) gs[j] = capture(s, [&] { on(base + j); });
    long long rep = 0;
    const double us = queued_us([&](int) { CK(cudaGraphLaunch(gs[rep++ % kCounters], s)); }, 200, s);
    run = base + rep;
    for (auto g : gs) CK(cudaGraphExecDestroy(g));
    std::printf("%-34s slot %5d B x %d, %d blocks/SM (%4d), %d stages/unit, %5d units, spin %4d / %4d: %6.1f us, %5.0f GB/s = %5.1f%% of copy\n",
                name, sb + sc, ns, bps, grid, spu, n_units, spin, unit_spin, us, bytes / us / 1e3,
                100.0 * bytes / us / 1e3 / ps.copy_gbs);
  };
  {
    cudaGraphExec_t m = capture(s, [&] { CK(cudaMemsetAsync(ps.sink, 0, 4, s)); });
    const double mq = queued_us([&](int) { CK(cudaGraphLaunch(m, s)); }, 100, s);
    std::printf("one 4-byte memset graph: %.1f us (the bench's graph floor)\n", mq);
  }
  const bool work = argc > 1 && std::string(argv[1]) == "work";
  for (int pass = 0; pass < 2 && work; ++pass) {
    // Consumers that hold each stage's slot for `spin` cycles (and spend `unit_spin` after each
    // unit): at what consumer time per stage do two slots stop hiding the latency, and do three
    // or four slots then recover the rate?
    std::printf("-- work pass %d\n", pass + 1);
    for (int spin : {0, 500, 1000, 2000, 4000}) {
      measure("gemm2 shape, 2 slots", ring<8192, 1024, 2>, 8192, 1024, 2, 4, 3, spin, 0);
      measure("gemm2 shape, 3 slots", ring<8192, 1024, 3>, 8192, 1024, 3, 4, 3, spin, 0);
      measure("8K+1K, 4 slots, 3 blocks/SM", ring<8192, 1024, 4>, 8192, 1024, 4, 3, 3, spin, 0);
    }
    for (int spin : {1000, 2000}) {  // more consumer warps per SM: five and six blocks
      measure("8K+1K, 2 slots, 5 blocks/SM", ring<8192, 1024, 2>, 8192, 1024, 2, 5, 3, spin, 0);
      measure("8K+1K, 2 slots, 6 blocks/SM", ring<8192, 1024, 2>, 8192, 1024, 2, 6, 3, spin, 0);
    }
    for (int unit_spin : {1000, 3000}) {
      measure("gemm2 shape, 2 slots", ring<8192, 1024, 2>, 8192, 1024, 2, 4, 3, 1000, unit_spin);
      measure("gemm2 shape, 3 slots", ring<8192, 1024, 3>, 8192, 1024, 3, 4, 3, 1000, unit_spin);
    }
  }
  for (int pass = 0; pass < 2 && !work; ++pass) {
    std::printf("-- pass %d\n", pass + 1);
    measure("gemm2 shape (8K+1K, 2 slots)", ring<8192, 1024, 2>, 8192, 1024, 2, 4, 3);
    measure("gemm2 shape, no scale copy", ring<8192, 0, 2>, 8192, 0, 2, 4, 3);
    measure("gemm2 shape, 3 slots", ring<8192, 1024, 3>, 8192, 1024, 3, 4, 3);
    measure("gemm2 shape, 6-stage units", ring<8192, 1024, 2>, 8192, 1024, 2, 4, 6);
    measure("8K+1K, 4 slots, 2 blocks/SM", ring<8192, 1024, 4>, 8192, 1024, 4, 2, 3);
    measure("8K+1K, 3 slots, 3 blocks/SM", ring<8192, 1024, 3>, 8192, 1024, 3, 3, 3);
    measure("16K+2K, 2 slots, 4 blocks/SM", ring<16384, 2048, 2>, 16384, 2048, 2, 4, 3);
    measure("16K+2K, 3 slots, 2 blocks/SM", ring<16384, 2048, 3>, 16384, 2048, 3, 2, 3);
    measure("24K+3K (a unit), 2 slots, 3 bps", ring<24576, 3072, 2>, 24576, 3072, 2, 3, 1);
    measure("16K, 3 slots, 2 bps (section 33)", ring<16384, 0, 3>, 16384, 0, 3, 2, 2);
  }
  CK(cudaDeviceSynchronize());
  return 0;
}
