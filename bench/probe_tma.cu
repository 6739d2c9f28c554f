// Probe: does a TMA producer (a few large tensor-map boxes per stage, one issuing thread) move
// MXINT4 expert weights faster per block than the stream family's 16-byte cp.async producers?
// Same grid, units and ring as bench/probe_stream.cu (consumers only read and release each stage);
// the TMA boxes land in exactly the layout the library's consumers read: per stage KC/256 chunks
// of R rows x 128 bytes, 16-byte units XOR-swizzled by row (CU_TENSOR_MAP_SWIZZLE_128B).
// Not part of the library; build and run by hand:
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o probe_tma bench/probe_tma.cu -lcuda && ./probe_tma
//
// Weights: a 3-D view of [E * rows, K/2] bytes: d0 = 128 bytes of a chunk, d1 = row (stride K/2),
// d2 = chunk (stride 128). A stage of a unit is one box {128, R, KC/256} (R <= 256).
#include <cuda.h>

#include "probe_common.cuh"

constexpr int kSets = 17;
constexpr int kTopK = 8;
constexpr long long kMaxExpertBytes = 4096LL * 3584;  // kimi-k2 gemm1 (the largest shape)

// kMode 0: cp.async 16 B by 4 producer warps (as the library). 1: TMA, one box per stage.
// 2: TMA, one box per 128-byte chunk (KC/256 boxes of R x 128 per stage).
template <int R, int KC, int NS, int kMode>
__global__ void __launch_bounds__(256, 2) probe(const __grid_constant__ CUtensorMap tm, const uint8_t* w,
                                                const int* experts, uint32_t* sink, int rows, int k,
                                                uint4* dump) {
  constexpr int kStageW = R * KC / 2;  // multiple of 1024 for R % 8 == 0
  constexpr int kChunks = kStageW / 16;
  constexpr int kPer = kChunks / 128;
  constexpr int kWc = KC / 32;  // 16-byte units per row per stage
  const int kStages = k / KC;
  const int kSlices = rows / R;
  const long long kRowBytes = k / 2;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __shared__ uint64_t full[NS], empty[NS];
  const int tid = threadIdx.x, warp = tid >> 5;
  init_ring(full, empty, NS, kMode == 0 ? 128 : 1);
  const int n_units = kTopK * kSlices;
  int slot = 0;
  uint32_t parity;
  if (warp >= 4) {
    const int pt = tid - 128;
    if (kMode != 0 && pt != 0) return;
    parity = 1;
    for (int u = blockIdx.x; u < n_units; u += gridDim.x) {
      const long long e = experts[u % kTopK];
      const int slice = u / kTopK;
      const int row0 = static_cast<int>(e * rows + slice * R);
      for (int ks = 0; ks < kStages; ++ks) {
        const uint32_t dst = su32(smem) + slot * kStageW;
        if constexpr (kMode == 0) {
          if (pt == 0) mwait(&empty[slot], parity);
          asm volatile("barrier.sync 2, 128;\n" ::: "memory");
#pragma unroll
          for (int j = 0; j < kPer; ++j) {
            const int c = pt + j * 128, r = c / kWc, col = c % kWc;
            const uint8_t* src = w + (row0 + r) * kRowBytes + ks * (KC / 2) + col * 16;
            const uint32_t d = dst + (col >> 3) * (R * 128) + r * 128 + (((col & 7) ^ (r & 7)) << 4);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
          }
          asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(su32(&full[slot]))
                       : "memory");
        } else {
          mwait(&empty[slot], parity);
          asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(su32(&full[slot])),
                       "r"(kStageW)
                       : "memory");
          if constexpr (kMode == 1) {
            asm volatile(
                "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
                "l"(&tm), "r"(0), "r"(row0), "r"(ks * (KC / 256)), "r"(su32(&full[slot]))
                : "memory");
          } else {
#pragma unroll
            for (int c = 0; c < KC / 256; ++c)
              asm volatile(
                  "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                  " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst + c * R * 128),
                  "l"(&tm), "r"(0), "r"(row0), "r"(ks * (KC / 256) + c), "r"(su32(&full[slot]))
                  : "memory");
          }
        }
        if (++slot == NS) slot = 0, parity ^= 1;
      }
    }
    return;
  }
  consume_stages<kStageW, NS>(smem, full, empty, n_units, kStages, sink, dump);
}


int main() {
  const ProbeSetup ps = probe_setup(kSets * kTopK * kMaxExpertBytes, kSets, kTopK);
  uint4* dump;
  CK(cudaMalloc(&dump, 1 << 20));
  const double lin_bytes = kTopK * double(kMaxExpertBytes);
  const double lin_us = median_us(
      [&](int i) {
        linear_read<<<ps.sms * 4, 512>>>(reinterpret_cast<const uint4*>(ps.w + (i % kSets) * kTopK * kMaxExpertBytes),
                                      static_cast<long long>(lin_bytes / 16), ps.sink);
      },
      30);
  std::printf("linear read of %.0f MB: %.1f us, %.0f GB/s = %.1f%% of copy\n", lin_bytes / 1e6, lin_us,
              lin_bytes / lin_us / 1e3, 100.0 * lin_bytes / lin_us / 1e3 / ps.copy_gbs);

  void* enc_fn = nullptr;
  cudaDriverEntryPointQueryResult q;
  CK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &enc_fn, cudaEnableDefault, &q));
  auto encode = reinterpret_cast<decltype(&cuTensorMapEncodeTiled)>(enc_fn);

  const char* mode_name[] = {"cp.async 4 warps", "TMA 1 box/stage ", "TMA 1 box/chunk "};
  auto run = [&](auto kern, int R, int kc, int ns, int mode, int rows, int k) {
    CUtensorMap tm{};
    const long long nrows = static_cast<long long>(rows) * kSets * kTopK;
    cuuint64_t dims[3] = {128, static_cast<cuuint64_t>(nrows), static_cast<cuuint64_t>(k / 256)};
    cuuint64_t strides[2] = {static_cast<cuuint64_t>(k / 2), 128};
    cuuint32_t box[3] = {128, static_cast<cuuint32_t>(R), static_cast<cuuint32_t>(mode == 2 ? 1 : kc / 256)};
    cuuint32_t es[3] = {1, 1, 1};
    CUresult r = encode(&tm, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, ps.w, dims, strides, box, es,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
      std::printf("%4d x %4d R %d KC %d: cuTensorMapEncodeTiled failed (%d)\n", rows, k, R, kc, int(r));
      return;
    }
    const int ring = R * kc / 2 * ns;
    const int smem = ring + 1024;
    CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int per_sm = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, 256, smem));
    const int grid = per_sm * ps.sms;
    const double bytes = double(kTopK) * rows * (k / 2);
    const long long set_rows = static_cast<long long>(rows) * kTopK;
    // experts[] holds set s's ids s*8..s*8+7: expert id e -> rows [e*rows, (e+1)*rows)
    const double us = median_us(
        [&](int i) { kern<<<grid, 256, smem>>>(tm, ps.w, ps.experts + (i % kSets) * kTopK, ps.sink, rows, k, nullptr); }, 30);
    // Layout check: stage 1 of block 0's first unit, against the cp.async layout computed here.
    kern<<<grid, 256, smem>>>(tm, ps.w, ps.experts + 3 * kTopK, ps.sink, rows, k, dump);
    CK(cudaDeviceSynchronize());
    std::vector<uint8_t> got(R * kc / 2);
    CK(cudaMemcpy(got.data(), dump, got.size(), cudaMemcpyDeviceToHost));
    long long bad = 0;
    for (int r = 0; r < R; ++r)
      for (int col = 0; col < kc / 32; ++col)
        for (int b = 0; b < 16; ++b) {
          const long long gaddr = (3LL * kTopK * rows + r) * (k / 2) + 1LL * (kc / 2) + col * 16 + b;
          const int off = (col >> 3) * (R * 128) + r * 128 + (((col & 7) ^ (r & 7)) << 4) + b;
          if (got[off] != pattern(gaddr)) ++bad;
        }

    (void)set_rows;
    std::printf("%4d x %4d  R %2d KC %4d x %2d (%3d KB), %s, %d blocks/SM, %4d units: %6.1f us, %5.0f GB/s = %5.1f%% of copy, %5.1f GB/s per busy block, layout %s\n",
                rows, k, R, kc, ns, ring / 1024, mode_name[mode], per_sm, kTopK * rows / R, us, bytes / us / 1e3,
                100.0 * bytes / us / 1e3 / ps.copy_gbs, bytes / us / 1e3 / std::min(grid, kTopK * rows / R), bad ? "BAD" : "ok");
    if (bad) std::printf("   LAYOUT MISMATCH: %lld bytes differ\n", bad);
  };
#define RUN3(R, KC, NS, rows, k)                        \
  run(probe<R, KC, NS, 0>, R, KC, NS, 0, rows, k);      \
  run(probe<R, KC, NS, 1>, R, KC, NS, 1, rows, k);      \
  run(probe<R, KC, NS, 2>, R, KC, NS, 2, rows, k);
  // kimi-k2 gemm1 (4096 x 7168) and gemm2 (7168 x 2048) at one token
  RUN3(64, 512, 6, 4096, 7168)
  RUN3(64, 1024, 3, 4096, 7168)
  RUN3(32, 1024, 6, 4096, 7168)
  RUN3(64, 256, 12, 7168, 2048)
  RUN3(64, 512, 6, 7168, 2048)
  RUN3(32, 512, 12, 7168, 2048)
  // kimi-k2-tp8 gemm1 (512 x 7168: 64 / 128 / 256 units) and gemm2 (7168 x 256)
  RUN3(64, 512, 6, 512, 7168)
  RUN3(32, 1024, 6, 512, 7168)
  RUN3(16, 1024, 6, 512, 7168)
  RUN3(64, 256, 6, 7168, 256)
  RUN3(32, 256, 12, 7168, 256)
  // qwen3-30b-a3b gemm1 (1536 x 2048) and gemm2 (2048 x 768)
  RUN3(64, 512, 6, 1536, 2048)
  RUN3(32, 512, 12, 1536, 2048)
  RUN3(64, 256, 6, 2048, 768)
  RUN3(32, 256, 12, 2048, 768)
  CK(cudaDeviceSynchronize());
  return 0;
}
