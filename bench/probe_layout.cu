// Probe: does the order in which a unit's weight bytes are read change how fast DRAM delivers
// them? The stream GEMMs read a unit (R consecutive weight rows of K/2 bytes) one stage at a time
// as a TMA box of KC/256 128-byte chunks x R rows, so a stage touches R rows at a stride of K/2
// bytes (gemm2 of kimi-k2: 64 pieces of 128 bytes, 1 KiB apart). Here the same units, grid and
// ring either read that way ("strided": the library's box) or read the unit's bytes in address
// order, one contiguous bulk copy of the stage's size ("linear": what a weight layout packed per
// stage would give). Units are taken from a counter (as the library's dynamic units) or dealt
// round-robin. Consumers only read and release each stage. Not part of the library; build and
// run by hand:
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o probe_layout bench/probe_layout.cu -lcuda && ./probe_layout [shapes]
#include <cuda.h>

#include <string>

#include "probe_common.cuh"

constexpr int kSets = 17;
constexpr int kTopK = 8;
constexpr long long kMaxExpertBytes = 4096LL * 3584;  // kimi-k2 gemm1 (the largest shape)

// kLinear: one bulk copy of the stage's bytes in address order; else the library's TMA box.
template <int R, int KC, int NS, bool kLinear>
__global__ void __launch_bounds__(160) probe(const __grid_constant__ CUtensorMap tm, const uint8_t* w,
                                             const int* experts, uint32_t* sink, int rows, int k,
                                             int* counter) {
  constexpr int kStageW = R * KC / 2;
  const int kStages = k / KC;
  const int kSlices = rows / R;
  const long long kRowBytes = k / 2;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __shared__ uint64_t full[NS], empty[NS];
  __shared__ int unit_q[64];
  const int tid = threadIdx.x, warp = tid >> 5;
  init_ring(full, empty, NS, 1);
  const int n_units = kTopK * kSlices;
  if (warp == 4) {
    if (tid != 128) return;
    uint32_t parity = 1;
    int slot = 0, i = 0;
    // Units tile-major per expert (the library's tile-ready numbering): unit u = expert u / kSlices.
    for (int u = blockIdx.x; u < n_units; ++i) {
      const int next = counter ? static_cast<int>(gridDim.x) + atomicAdd(counter, 1) : u + gridDim.x;
      const long long e = experts[u / kSlices];
      const int row0 = static_cast<int>(e * rows + (u % kSlices) * R);
      for (int ks = 0; ks < kStages; ++ks) {
        const uint32_t dst = su32(smem) + slot * kStageW;
        mwait(&empty[slot], parity);
        if (ks == 0) unit_q[i % 64] = u;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(su32(&full[slot])),
                     "r"(kStageW)
                     : "memory");
        if constexpr (kLinear) {
          const uint8_t* src = w + row0 * kRowBytes + static_cast<long long>(ks) * kStageW;
          asm volatile(
              "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
              "l"(src), "r"(kStageW), "r"(su32(&full[slot]))
              : "memory");
        } else {
          asm volatile(
              "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
              " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
              "l"(&tm), "r"(0), "r"(row0), "r"(ks * (KC / 256)), "r"(su32(&full[slot]))
              : "memory");
        }
        if (++slot == NS) slot = 0, parity ^= 1;
      }
      u = next;
    }
    // No more units: a last "full" arrival with -1 in the queue.
    mwait(&empty[slot], parity);
    unit_q[i % 64] = -1;
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(su32(&full[slot])) : "memory");
    return;
  }
  // Consumers (warps 0-3): read each stage, release it.
  int slot = 0;
  uint32_t parity = 0;
  uint32_t acc = 0;
  for (int i = 0;; ++i) {
    mwait(&full[slot], parity);
    if (unit_q[i % 64] < 0) break;
    for (int ks = 0; ks < kStages; ++ks) {
      if (ks > 0) mwait(&full[slot], parity);
      consume_stage<kStageW>(smem + slot * kStageW, &empty[slot], acc);
      if (++slot == NS) slot = 0, parity ^= 1;
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

int main(int argc, char** argv) {
  const ProbeSetup ps = probe_setup(kSets * kTopK * kMaxExpertBytes, kSets, kTopK);
  int* counter;
  CK(cudaMalloc(&counter, 4));

  void* enc_fn = nullptr;
  cudaDriverEntryPointQueryResult q;
  CK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &enc_fn, cudaEnableDefault, &q));
  auto encode = reinterpret_cast<decltype(&cuTensorMapEncodeTiled)>(enc_fn);

  auto run = [&](auto kern, int R, int kc, int ns, bool linear, int bps, bool dyn, int rows, int k) {
    CUtensorMap tm{};
    const long long nrows = static_cast<long long>(rows) * kSets * kTopK;
    cuuint64_t dims[3] = {128, static_cast<cuuint64_t>(nrows), static_cast<cuuint64_t>(k / 256)};
    cuuint64_t strides[2] = {static_cast<cuuint64_t>(k / 2), 128};
    cuuint32_t box[3] = {128, static_cast<cuuint32_t>(R), static_cast<cuuint32_t>(kc / 256)};
    cuuint32_t es[3] = {1, 1, 1};
    CUresult r = encode(&tm, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, ps.w, dims, strides, box, es,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
      std::printf("encode failed (%d)\n", int(r));
      return;
    }
    const int smem = R * kc / 2 * ns + 1024;
    CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int per_sm = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, 160, smem));
    per_sm = std::min(per_sm, bps);
    const int grid = per_sm * ps.sms;
    const double bytes = double(kTopK) * rows * (k / 2);
    const double us = median_us(
        [&](int i) {
          if (dyn) CK(cudaMemsetAsync(counter, 0, 4));
          kern<<<grid, 160, smem>>>(tm, ps.w, ps.experts + (i % kSets) * kTopK, ps.sink, rows, k, dyn ? counter : nullptr);
        },
        40);
    std::printf("%4d x %4d  R %2d KC %4d x %2d (%3d KB), %d blocks/SM, %s, %s, %4d units: %6.1f us (incl. a memset), "
                "%5.0f GB/s = %5.1f%% of copy\n",
                rows, k, R, kc, ns, R * kc / 2 * ns / 1024, per_sm, linear ? "linear " : "strided",
                dyn ? "counter    " : "round-robin", kTopK * rows / R, us, bytes / us / 1e3,
                100.0 * bytes / us / 1e3 / ps.copy_gbs);
  };
#define RUN4(R, KC, NS, BPS, rows, k)                                   \
  run(probe<R, KC, NS, false>, R, KC, NS, false, BPS, true, rows, k);  \
  run(probe<R, KC, NS, true>, R, KC, NS, true, BPS, true, rows, k);    \
  run(probe<R, KC, NS, false>, R, KC, NS, false, BPS, false, rows, k); \
  run(probe<R, KC, NS, true>, R, KC, NS, true, BPS, false, rows, k);
  // Mode "shapes" (argv[1] == "shapes"): the library's strided box only, units from the counter
  // and round-robin, for other unit sizes, stage depths and blocks per SM of the same bytes.
  const bool shapes = argc > 1 && std::string(argv[1]) == "shapes";
#define RUN2(R, KC, NS, BPS, rows, k)                                   \
  run(probe<R, KC, NS, false>, R, KC, NS, false, BPS, true, rows, k);  \
  run(probe<R, KC, NS, false>, R, KC, NS, false, BPS, false, rows, k);
  for (int rep = 0; rep < 2; ++rep) {
    if (shapes) {
      // kimi-k2 gemm2 at one token (7168 x 2048: 58.7 MB of int4)
      RUN2(64, 256, 3, 3, 7168, 2048)
      RUN2(64, 512, 3, 3, 7168, 2048)
      RUN2(64, 256, 3, 4, 7168, 2048)
      RUN2(64, 256, 3, 6, 7168, 2048)
      RUN2(32, 256, 6, 3, 7168, 2048)
      RUN2(32, 512, 3, 3, 7168, 2048)
      RUN2(128, 256, 3, 3, 7168, 2048)
      RUN2(64, 256, 4, 2, 7168, 2048)
      // kimi-k2 gemm1 at one token (4096 x 7168: 117 MB)
      RUN2(64, 512, 3, 2, 4096, 7168)
      RUN2(32, 512, 3, 3, 4096, 7168)
      RUN2(32, 512, 6, 2, 4096, 7168)
      continue;
    }
    // kimi-k2 at one token: gemm2 (7168 x 2048) as the library runs it (3 blocks per SM, three
    // 8 KiB stages) and deeper; gemm1 (4096 x 7168, 2 blocks per SM, three 32 KiB stages).
    RUN4(64, 256, 3, 3, 7168, 2048)
    RUN4(64, 256, 6, 3, 7168, 2048)
    RUN4(64, 512, 3, 2, 4096, 7168)
    // qwen3-30b-a3b gemm2 (2048 x 768) and kimi-k2-tp8 gemm1 (512 x 7168)
    RUN4(64, 256, 3, 3, 2048, 768)
    RUN4(64, 512, 3, 2, 512, 7168)
  }
  CK(cudaDeviceSynchronize());
  return 0;
}
