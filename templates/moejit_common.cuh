// Shared device helpers for the moejit templates: ranking keys, warp reductions, bf16 packing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "moejit_params.h"

namespace moejit_dev {

constexpr unsigned kFullMask = 0xffffffffu;

// Byte offset of 16-byte unit u of row `row` of a tensor whose rows hold kRowBytes bytes:
// row-major, or with kTiled in blocks of kBlock rows (moejit.h, WeightFormat::MxInt4G32Tiled),
// each block as [chunk][kBlock rows][kChunkUnits units]: weights (kChunkUnits 8: unit u holds
// k = 32u .. 32u + 31, stored at u ^ (row % 8) in its chunk) or scales (kChunkUnits 1: unit u
// holds the scales of k = 256u .. 256u + 255).
template <bool kTiled, int kBlock, int kRowBytes, int kChunkUnits = 8>
__device__ __forceinline__ long long weight_unit_offset(long long row, int u) {
  if constexpr (!kTiled) {
    return row * kRowBytes + u * 16;
  } else {
    const long long blk = row / kBlock;
    const int r = static_cast<int>(row - blk * kBlock);
    const int in_chunk = kChunkUnits == 8 ? (u & 7) ^ (r & 7) : 0;
    return blk * (kBlock * static_cast<long long>(kRowBytes)) + (u / kChunkUnits) * (kBlock * kChunkUnits * 16) +
           r * (kChunkUnits * 16) + (in_chunk << 4);
  }
}

// Programmatic dependent launch (sm_90+; no-ops before). A kernel launched with the PDL
// attribute may start while its predecessor still runs: pdl_wait() blocks until the predecessor
// grid has completed and its writes are visible. Every moejit kernel waits before it triggers
// its own dependents, so a kernel may read what the kernel two back wrote before its own wait;
// two exceptions: gemm2 with tile_ready (moejit_stream.cuh) triggers first, so the finalize
// reads only what the kernels three back (routing) wrote before its wait; and gemm1 with
// Cfg::kEarlyRouted reads the routed ids of the fused route+dispatch block, the kernel one back,
// before its wait, once that block's word says they are written (moejit_route_dispatch.cuh).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// An L2 eviction priority (createpolicy's 64-bit handle) for accesses that carry a cache hint:
// every line they touch is evicted before lines of normal priority.
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// The first word of packed routed-id vector i < kRoutedIdSlots / 8 (moejit_params.h).
__device__ __forceinline__ int routed_id_word(int i) { return i == 0 ? 4 : kRoutedIdWord + 4 * i; }
// Packed routed-id vector v's four words (moejit_params.h): code(s) is slot s's id, or
// kRoutedIdNone; two slots per word, bit 31 set. Every lane that calls it evaluates code for
// its slots (code may shuffle).
template <class Code>
__device__ __forceinline__ void packed_id_words(int v, Code code, uint32_t (&w)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = 0x80000000u | (code(8 * v + 2 * i + 1) << 16) | code(8 * v + 2 * i);
}
// Stores the four words whole (gemm1's pollers read them with one 16-byte volatile load).
__device__ __forceinline__ void st_volatile_v4(int* p, const uint32_t (&w)[4]) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]),
               "r"(w[3])
               : "memory");
}

// A word other blocks update: red_release_gpu / st_release_gpu order this thread's earlier
// writes (and those ordered before them, e.g. by a barrier) before the addition or store; ld_acquire_gpu (not served from
// L1) orders this thread's later accesses after the writes released into the value it reads.
__device__ __forceinline__ void red_release_gpu(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_release_gpu(int* p, int v) {
  asm volatile("st.release.gpu.global.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// An addition that returns the old value, ordered after this thread's earlier writes (and those
// ordered before them, e.g. by a barrier: release) and before its later accesses (acquire).
__device__ __forceinline__ int atom_add_acq_rel_gpu(int* p, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
// A count taken by one thread that waits for the old value where it is first used. ptxas turns
// an integer add at a uniform address (atomicAdd, atom.add or atom.inc in inline PTX, 32 or 64
// bits) into a warp-aggregated atomic whose result is shuffled to the lanes right after it, so
// the thread waits there for the atomic's round trip (H200 SASS, CUDA 13.0). A float add is not
// aggregated; the count is exact while below 2^24. The word holds a float (0 bits = 0.0f).
// (Converted to int where it is used: a conversion next to the atomic waits there too.)
__device__ __forceinline__ float atom_take_gpu(int* p) {
  float old;
  asm volatile("atom.relaxed.gpu.global.add.f32 %0, [%1], 1.0;\n" : "=f"(old) : "l"(p) : "memory");
  return old;
}

// Timeline (a diagnostic: `moejit bench --timeline`, plan override "tl=0xADDRESS"): the buffer's
// layout and events are in moejit_params.h. Without MOEJIT_TIMELINE the calls compile to nothing.
#ifdef MOEJIT_TIMELINE
__device__ __forceinline__ unsigned long long tl_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned long long* tl_base() {
  return reinterpret_cast<unsigned long long*>(MOEJIT_TIMELINE);
}
// The slot of the replay in flight (read once per thread, at kernel entry).
__device__ __forceinline__ int tl_slot() {
  const unsigned long long n = *reinterpret_cast<volatile unsigned long long*>(tl_base());
  return static_cast<int>((n + kTlSlots - 1) % kTlSlots);
}
__device__ __forceinline__ void tl_stamp(int slot, int ev, unsigned long long t = tl_now()) {
  unsigned long long* e = tl_base() + 1 + 2 * (slot * kTlEvents + ev);
  // Reductions without a result: the thread does not wait for them.
  asm volatile("red.global.min.u64 [%0], %1;\n" ::"l"(e), "l"(t) : "memory");
  asm volatile("red.global.max.u64 [%0], %1;\n" ::"l"(e + 1), "l"(t) : "memory");
}
// A stamp taken once `v` is computed (the empty asm orders the timer read after it).
__device__ __forceinline__ void tl_stamp_after(int slot, int ev, uint32_t v) {
  asm volatile("" ::"r"(v));
  tl_stamp(slot, ev);
}
// Field f of this block's record (kernel 0: gemm1, 1: gemm2).
__device__ __forceinline__ void tl_block(int kernel, int f, unsigned long long v) {
  if (blockIdx.x >= kTlMaxBlocks) return;
  unsigned long long* r = tl_base() + 1 + 2 * kTlSlots * kTlEvents +
                          (kernel * kTlMaxBlocks + blockIdx.x) * kTlBlockFields;
  *reinterpret_cast<volatile unsigned long long*>(r + f) = v;
}
__device__ __forceinline__ unsigned smid() {
  unsigned v;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(v));
  return v;
}
// By one thread of the layer's first kernel, before its dependents launch.
__device__ __forceinline__ void tl_next_replay() {
  atomicAdd(tl_base(), 1ull);
  __threadfence();
}
#else
__device__ __forceinline__ unsigned long long tl_now() { return 0; }
__device__ __forceinline__ int tl_slot() { return 0; }
__device__ __forceinline__ void tl_stamp(int, int, unsigned long long = 0) {}
__device__ __forceinline__ void tl_stamp_after(int, int, uint32_t) {}
__device__ __forceinline__ void tl_next_replay() {}
__device__ __forceinline__ void tl_block(int, int, unsigned long long) {}
__device__ __forceinline__ unsigned smid() { return 0; }
#endif

// (w & 0x000f000f) ^ 0x43084308 as one lop3: the nibbles at bits 0-3 and 16-19 (two's
// complement v) become bf16x2 (136 + v), exact (bit 3 flipped maps v to v + 8; exponent 0x43 makes
// 128 + (v + 8)). Written out because ptxas emits two LOP3s for the C expression (two immediates).
__device__ __forceinline__ uint32_t nib_pair(uint32_t w) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0x6a;\n" : "=r"(r) : "r"(w), "n"(0x000f000f), "n"(0x43084308));
  return r;  // lut 0x6a = (a & b) ^ c
}

// (w & mask) ^ c as one lop3 with c in a register: the fp16 operands' dequantisation
// (StreamConfig::f16), whose constant may differ per group.
template <uint32_t kMask>
__device__ __forceinline__ uint32_t lop3_and_xor(uint32_t w, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0x6a;\n" : "=r"(r) : "r"(w), "n"(kMask), "r"(c));
  return r;
}

// A relaxed load at gpu scope (L2): no ordering of what follows, unlike ld_acquire_gpu.
__device__ __forceinline__ int ld_relaxed_gpu(const int* p) {
  int v;
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Routing method codes; codegen writes these as Cfg::kMethod (same order as moejit::RoutingMethod).
enum Method : int {
  kDefault = 0,
  kRenormalize = 1,
  kDeepSeekV3 = 2,
  kLlama4 = 3,
  kRenormalizeNaive = 4,
  kTopK = 5,
  kSigmoidRenorm = 6,
  kSigmoid = 7,
  kTopKSigmoid = 8,
  kPrecomputed = 9,
};

// Order-preserving map of a float to uint32 for "largest first" ranking. NaN ranks above every
// number; -0 and +0 rank equal. 0 is never produced, so it marks "not selectable".
__device__ __forceinline__ uint32_t rank_key(float x) {
  if (x != x) return 0xffffffffu;
  if (x == 0.0f) x = 0.0f;
  uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A ranking key with the index folded in so that max() prefers the lower index on ties.
__device__ __forceinline__ unsigned long long rank_key_index(uint32_t key, int index) {
  return (static_cast<unsigned long long>(key) << 32) | (0xffffffffu - static_cast<uint32_t>(index));
}
__device__ __forceinline__ int index_of(unsigned long long k) {
  return static_cast<int>(0xffffffffu - static_cast<uint32_t>(k & 0xffffffffu));
}

__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    unsigned long long other = __shfl_xor_sync(kFullMask, v, o);
    v = other > v ? other : v;
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Max that propagates NaN (fmaxf would drop it).
__device__ __forceinline__ float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

__device__ __forceinline__ float warp_max_nan(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// SwiGLU of one feature (DESIGN.md): with kLimit, gate clamped from above and up both ways to
// limit; then gate * sigmoid(alpha * gate) * (up + beta).
template <bool kLimit>
__device__ __forceinline__ float swiglu(float gate, float up, float alpha, float beta, float limit) {
  if constexpr (kLimit) {
    gate = gate > limit ? limit : gate;
    up = up > limit ? limit : (up < -limit ? -limit : up);
  }
  return gate * sigmoidf_(alpha * gate) * (up + beta);
}

template <bool kBF16>
__device__ __forceinline__ float load_as_float(const void* p, long long i) {
  if constexpr (kBF16) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  } else {
    return static_cast<const float*>(p)[i];
  }
}

// v = hi + lo with hi = bf16(v) and lo = bf16(v - hi): about 16 significant bits. A non-finite
// v keeps its value in hi and gets lo = 0 (inf - inf would be NaN).
__device__ __forceinline__ void split_bf16(float v, __nv_bfloat16& hi, __nv_bfloat16& lo) {
  hi = __float2bfloat16_rn(v);
  const float h = __bfloat162float(hi);
  lo = __float2bfloat16_rn(isfinite(h) ? v - h : 0.0f);
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// The finalize of 8 features h .. h + 7 of one token: bf16(sum_j ws[j] * y[rows[j], h ..]) over
// ascending j in fp32, slots with rows[j] < 0 skipped. Shared by the finalize kernel and a chain
// kernel's finalize (moejit_stream.cuh), which must give the same bits. y: fp32 rows of H
// features (stride: floats per row); kL2: loads not served from L1 (rows other blocks wrote
// during the launch).
template <int K, bool kL2>
__device__ __forceinline__ uint4 weighted_rows8(const float* y, long long stride, const int (&rows)[K],
                                                const float (&ws)[K], int h) {
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int row = rows[j];
    if (row < 0) continue;
    const float w = ws[j];
    const float4* r = reinterpret_cast<const float4*>(y + static_cast<long long>(row) * stride + h);
    const float4 a = kL2 ? __ldcg(r) : r[0], b = kL2 ? __ldcg(r + 1) : r[1];
    const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] += w * f[i];
  }
  uint4 o;
  o.x = pack_bf16x2(acc[0], acc[1]);
  o.y = pack_bf16x2(acc[2], acc[3]);
  o.z = pack_bf16x2(acc[4], acc[5]);
  o.w = pack_bf16x2(acc[6], acc[7]);
  return o;
}

}  // namespace moejit_dev
