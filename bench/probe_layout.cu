// Probe: does the order in which a unit's weight bytes are read change how fast DRAM delivers
// them? The stream GEMMs read a unit (R consecutive weight rows of K/2 bytes) one stage at a time
// as a TMA box of KC/256 128-byte chunks x R rows, so a stage touches R rows at a stride of K/2
// bytes (gemm2 of kimi-k2: 64 pieces of 128 bytes, 1 KiB apart). Here the same units, grid and
// ring either read that way ("strided": the library's box) or read the unit's bytes in address
// order, one contiguous bulk copy of the stage's size ("linear": what a weight layout packed per
// stage would give). Units are taken from a counter (as the library's dynamic units) or dealt
// round-robin. A third order ("rowwise") keeps the library's box but walks it row by row: the
// map's dimensions are {128 bytes, K / 256 chunks, row}, so the TMA requests a row's KC / 2 bytes
// together before the next row (the stage lands in shared memory as [row][chunk][128 bytes]
// instead of [chunk][row][128 bytes]). Consumers only read and release each stage. Not part of
// the library; build and run by hand:
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o probe_layout bench/probe_layout.cu -lcuda && ./probe_layout [shapes]
#include <cuda.h>

#include <string>

#include "probe_common.cuh"

constexpr int kSets = 17;
constexpr int kTopK = 8;
constexpr long long kMaxExpertBytes = 4096LL * 3584;  // kimi-k2 gemm1 (the largest shape)

// kMode: kStrided (the library's TMA box), kLinear (one bulk copy of the stage's bytes in
// address order) or kRowwise (the library's box walked row by row).
// kChunked: the library's box over a chunk-major layout ([chunk][row][128 bytes]: a stage's R
// rows of one chunk are R * 128 contiguous bytes), what a weight repacking per 128-byte K chunk
// would give without changing the stage's shared-memory image.
// kRowCopies: R non-tensor bulk copies of KC / 2 bytes per stage, one per row (no swizzle);
// kWide: a 2-D tensor box of {KC / 2 bytes, R rows} without swizzle (one 256-byte line per row
// at KC = 512, where the library's 128-byte swizzle needs two).
// kChunkedE: the same per expert ([expert][chunk][row][128 bytes]: a unit stays inside its
// expert's bytes, where kChunked spreads a unit's chunks over the whole buffer, a page each).
constexpr int kStrided = 0, kLinear = 1, kRowwise = 2, kChunked = 3, kRowCopies = 4, kWide = 5, kChunkedE = 6;
template <int R, int KC, int NS, int kMode>
__global__ void __launch_bounds__(160) probe(const __grid_constant__ CUtensorMap tm, const uint8_t* w,
                                             const int* experts, uint32_t* sink, int rows, int k,
                                             int* counter) {
  constexpr int kStageW = R * KC / 2;
  const int kStages = k / KC;
  const int kSlices = rows / R;
  const long long kRowBytes = k / 2;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = align_1k(smem_raw);
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
        ring_claim(full, empty, unit_q, slot, parity, i, ks, u, kStageW);
        if constexpr (kMode == kLinear) {
          const uint8_t* src = w + row0 * kRowBytes + static_cast<long long>(ks) * kStageW;
          bulk_copy(dst, src, kStageW, &full[slot]);
        } else if constexpr (kMode == kRowCopies) {
          for (int r = 0; r < R; ++r) {
            const uint8_t* src = w + (row0 + r) * kRowBytes + static_cast<long long>(ks) * (KC / 2);
            bulk_copy(dst + r * (KC / 2), src, KC / 2, &full[slot]);
          }
        } else if constexpr (kMode == kChunkedE) {
          asm volatile(
              "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
              " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
              "l"(&tm), "r"(0), "r"((u % kSlices) * R), "r"(ks * (KC / 256)), "r"(static_cast<int>(e)),
              "r"(su32(&full[slot]))
              : "memory");
        } else if constexpr (kMode == kWide) {
          asm volatile(
              "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
              " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
              "l"(&tm), "r"(ks * (KC / 2)), "r"(row0), "r"(su32(&full[slot]))
              : "memory");
        } else {
          asm volatile(
              "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
              " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
              "l"(&tm), "r"(0), "r"(kMode == kRowwise ? ks * (KC / 256) : row0),
              "r"(kMode == kRowwise ? row0 : ks * (KC / 256)), "r"(su32(&full[slot]))
              : "memory");
        }
        if (++slot == NS) slot = 0, parity ^= 1;
      }
      u = next;
    }
    ring_end(full, empty, unit_q, slot, parity, i);  // no more units
    return;
  }
  consume_queue<kStageW, NS>(smem, full, empty, unit_q, kStages, sink);  // consumers (warps 0-3)
}

int main(int argc, char** argv) {
  const ProbeSetup ps = probe_setup(kSets * kTopK * kMaxExpertBytes, kSets, kTopK);
  int* counter;
  CK(cudaMalloc(&counter, 4));

  void* enc_fn = nullptr;
  cudaDriverEntryPointQueryResult q;
  CK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &enc_fn, cudaEnableDefault, &q));
  auto encode = reinterpret_cast<decltype(&cuTensorMapEncodeTiled)>(enc_fn);

  auto run = [&](auto kern, int R, int kc, int ns, int mode, int bps, bool dyn, int rows, int k) {
    CUtensorMap tm{};
    const long long nrows = static_cast<long long>(rows) * kSets * kTopK;
    const bool rw = mode == kRowwise;
    cuuint64_t dims[3] = {128, static_cast<cuuint64_t>(rw ? k / 256 : nrows),
                          static_cast<cuuint64_t>(rw ? nrows : k / 256)};
    cuuint64_t strides[2] = {static_cast<cuuint64_t>(rw || mode == kChunked ? 128 : k / 2),
                             static_cast<cuuint64_t>(rw ? k / 2 : mode == kChunked ? nrows * 128 : 128)};
    cuuint32_t box[3] = {128, static_cast<cuuint32_t>(rw ? kc / 256 : R), static_cast<cuuint32_t>(rw ? R : kc / 256)};
    cuuint32_t es[3] = {1, 1, 1};
    const cuuint64_t wdims[2] = {static_cast<cuuint64_t>(k / 2), static_cast<cuuint64_t>(nrows)};
    const cuuint64_t wstrides[1] = {static_cast<cuuint64_t>(k / 2)};
    const cuuint32_t wbox[2] = {static_cast<cuuint32_t>(kc / 2), static_cast<cuuint32_t>(R)};
    const bool wide = mode == kWide;
    const bool ce = mode == kChunkedE;
    const cuuint64_t cdims[4] = {128, static_cast<cuuint64_t>(rows), static_cast<cuuint64_t>(k / 256),
                                 static_cast<cuuint64_t>(kSets * kTopK)};
    const cuuint64_t cstrides[3] = {128, static_cast<cuuint64_t>(rows) * 128, static_cast<cuuint64_t>(rows) * (k / 2)};
    const cuuint32_t cbox[4] = {128, static_cast<cuuint32_t>(R), static_cast<cuuint32_t>(kc / 256), 1};
    const cuuint32_t ces[4] = {1, 1, 1, 1};
    CUresult r = encode(&tm, CU_TENSOR_MAP_DATA_TYPE_UINT8, wide ? 2 : ce ? 4 : 3, ps.w,
                        wide ? wdims : ce ? cdims : dims, wide ? wstrides : ce ? cstrides : strides,
                        wide ? wbox : ce ? cbox : box, ce ? ces : es, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        wide ? CU_TENSOR_MAP_SWIZZLE_NONE : CU_TENSOR_MAP_SWIZZLE_128B,
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
                rows, k, R, kc, ns, R * kc / 2 * ns / 1024, per_sm,
                mode == kLinear ? "linear " : mode == kRowwise ? "rowwise" : mode == kChunked ? "chunked"
                : mode == kRowCopies ? "rowcopy" : mode == kWide ? "wide   " : mode == kChunkedE ? "chunk/e" : "strided",
                dyn ? "counter    " : "round-robin", kTopK * rows / R, us, bytes / us / 1e3,
                100.0 * bytes / us / 1e3 / ps.copy_gbs);
  };
#define RUN_MODE(M, R, KC, NS, BPS, rows, k)                   \
  run(probe<R, KC, NS, M>, R, KC, NS, M, BPS, true, rows, k); \
  run(probe<R, KC, NS, M>, R, KC, NS, M, BPS, false, rows, k);
#define RUN4(R, KC, NS, BPS, rows, k)              \
  RUN_MODE(kStrided, R, KC, NS, BPS, rows, k)      \
  RUN_MODE(kLinear, R, KC, NS, BPS, rows, k)       \
  RUN_MODE(kRowwise, R, KC, NS, BPS, rows, k)       \
  RUN_MODE(kChunked, R, KC, NS, BPS, rows, k)       \
  RUN_MODE(kRowCopies, R, KC, NS, BPS, rows, k)     \
  RUN_MODE(kWide, R, KC, NS, BPS, rows, k)          \
  RUN_MODE(kChunkedE, R, KC, NS, BPS, rows, k)
  // Mode "shapes" (argv[1] == "shapes"): the library's strided box only, units from the counter
  // and round-robin, for other unit sizes, stage depths and blocks per SM of the same bytes.
  const bool shapes = argc > 1 && std::string(argv[1]) == "shapes";
#define RUN2(R, KC, NS, BPS, rows, k) RUN_MODE(kStrided, R, KC, NS, BPS, rows, k)
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
    // kimi-k2 at one token: gemm2 (7168 x 2048) as its own kernel runs it (3 blocks per SM,
    // three 8 KiB stages: one chunk per row, so rowwise = strided) and as the chain runs it (2
    // blocks per SM, three 16 KiB stages of two chunks per row); gemm1 (4096 x 7168, 2 blocks per
    // SM, three 32 KiB stages), also with 1024-deep stages (four chunks per row).
    RUN4(64, 256, 3, 3, 7168, 2048)
    RUN4(64, 512, 3, 2, 7168, 2048)
    RUN4(64, 512, 3, 2, 4096, 7168)
    RUN4(32, 512, 3, 2, 4096, 7168)
  }
  CK(cudaDeviceSynchronize());
  return 0;
}
