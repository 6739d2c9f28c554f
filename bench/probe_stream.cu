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
#include "probe_common.cuh"

constexpr int kRows = 4096;
constexpr int kK = 7168;
constexpr long long kRowBytes = kK / 2;
constexpr long long kExpertBytes = kRows * kRowBytes;
constexpr int kSets = 17;
constexpr int kTopK = 8;

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
  init_ring(full, empty, NS, 128);
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
  consume_stages<kStageW, NS>(smem, full, empty, n_units, kStages, sink, nullptr);
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  const long long total = kSets * kTopK * kExpertBytes;
  uint8_t* w;
  CK(cudaMalloc(&w, total));
  CK(cudaMemset(w, 0x5a, total));
  int* experts = upload_expert_sets(kSets, kTopK);
  uint32_t* sink;
  CK(cudaMalloc(&sink, 4));
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
