// Shared pieces of the hand-run probes (bench/probe_stream.cu, probe_tma.cu, probe_layout.cu,
// probe_order.cu, probe_fixed.cu, probe_timing.cu, probe_launch.cu): error checks, the mbarrier
// wait, a plain linear read, the event timings (one run at a time, or queued as the bench does),
// a graph capture, the consumers' read of a stage, the weights' fill pattern, the unit-queue
// ring's producer and consumer steps and the ring probes' setup. Not part of the library.
#pragma once

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

__device__ __forceinline__ uint32_t su32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Waits for the mbarrier phase of the given parity (2 us suspend hint, as the library).
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

// Plain read of n16 16-byte words as one contiguous range (the best case for a read stream).
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

// Median microseconds of launch(i) between two events, over `reps` runs after 5 warm-ups; each
// run waits for its end event. pre(i), if given, is enqueued before the first event (outside the
// timing): with work queued in front, the first event fires only when the GPU reaches it, so the
// host's submission latency of launch(i) drops out of the figure.
template <class F, class P>
double median_us(F&& launch, int reps, P&& pre) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int i = 0; i < reps + 5; ++i) {
    pre(i);
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
template <class F>
double median_us(F&& launch, int reps) {
  return median_us(launch, reps, [](int) {});
}

// A CUDA graph of what body() enqueues on s (instantiated; the graph itself released).
template <class F>
cudaGraphExec_t capture(cudaStream_t s, F&& body) {
  cudaGraph_t g;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  body();
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&exec, g, 0));
  CK(cudaGraphDestroy(g));
  return exec;
}

// Median microseconds of launch(i) on stream s over `reps` runs enqueued back to back after 5
// warm-ups, each between its own two events, with one synchronisation at the end: as `moejit
// bench` times its graph replays (tools/bench_cmd.cpp, timed_ms). Once the queue runs ahead of
// the GPU, an event fires when the GPU reaches it, so the host's submission latency is not in the
// figure, where median_us (one run at a time on an idle GPU) has it.
template <class F>
double queued_us(F&& launch, int reps, cudaStream_t s) {
  for (int i = 0; i < 5; ++i) launch(i);
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) CK(cudaEventCreate(&e));
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(ev[2 * i], s));
    launch(5 + i);
    CK(cudaEventRecord(ev[2 * i + 1], s));
  }
  CK(cudaStreamSynchronize(s));
  CK(cudaGetLastError());
  std::vector<float> t(reps);
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventElapsedTime(&t[i], ev[2 * i], ev[2 * i + 1]));
    t[i] *= 1000.0f;
  }
  for (auto& e : ev) CK(cudaEventDestroy(e));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Cycles a consumer spends on a stage after reading it (spin > 0: a stand-in for arithmetic).
__device__ __forceinline__ void spin_cycles(long long spin) {
  if (spin <= 0) return;
  const long long t0 = clock64();
  while (clock64() - t0 < spin) {
  }
}

// The probes' consumer warps (threads 0-127): for each of the block's units and each of its
// stages, wait for the stage, read it from shared memory (no arithmetic) and release it on its
// "empty" barrier (one arrive per warp). dump (if not null): block 0 copies stage 1 of its first
// unit there, for a layout check.
// A consumer thread (of threads 0-127) reads its share of one stage (no arithmetic, folded into
// acc), spends `spin` cycles, and its warp releases the stage on its "empty" barrier.
template <int kStageW>
__device__ __forceinline__ void consume_stage(const unsigned char* stage, uint64_t* empty, uint32_t& acc,
                                              long long spin = 0) {
  constexpr int kPer = kStageW / 16 / 128;
  const int tid = threadIdx.x;
  const uint4* st = reinterpret_cast<const uint4*>(stage);
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const uint4 v = st[tid + j * 128];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  spin_cycles(spin);
  __syncwarp();
  if ((tid & 31) == 0)
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(su32(empty)) : "memory");
}

// The weights' bytes: a hash of the address, so that a layout check can tell bytes apart.
__host__ __device__ inline uint8_t pattern(long long a) {
  return static_cast<uint8_t>((a * 2654435761LL) >> 13);
}
__global__ void fill(uint8_t* w, long long n) {
  for (long long i = blockIdx.x * 256LL + threadIdx.x; i < n; i += 256LL * gridDim.x) w[i] = pattern(i);
}

template <int kStageW, int NS>
__device__ void consume_stages(const unsigned char* smem, uint64_t* full, uint64_t* empty,
                               int n_units, int stages_per_unit, uint32_t* sink, uint4* dump) {
  constexpr int kChunks = kStageW / 16;
  const int tid = threadIdx.x;
  int slot = 0;
  uint32_t parity = 0;
  uint32_t acc = 0;
  for (int u = blockIdx.x; u < n_units; u += gridDim.x) {
    for (int ks = 0; ks < stages_per_unit; ++ks) {
      mwait(&full[slot], parity);
      const uint4* st = reinterpret_cast<const uint4*>(smem + slot * kStageW);
      if (dump != nullptr && blockIdx.x == 0 && u == blockIdx.x && ks == 1)
        for (int j = tid; j < kChunks; j += 128) dump[j] = st[j];
      consume_stage<kStageW>(smem + slot * kStageW, &empty[slot], acc);
      if (++slot == NS) slot = 0, parity ^= 1;
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

// Block start: thread 0 sets up ns "full" barriers (full_count arrivals each) and ns "empty"
// barriers (one arrive per consumer warp), then the block syncs.
__device__ __forceinline__ void init_ring(uint64_t* full, uint64_t* empty, int ns, unsigned full_count) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < ns; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(su32(&full[s])), "r"(full_count));
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(su32(&empty[s])), "r"(4));
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
}

// The unit-queue ring probes (probe_layout.cu, probe_order.cu): thread 128 (warp 4) issues each
// stage of the block's units into an NS-slot ring and writes a unit's id into the queue with its
// first stage (-1 after the last); the consumer warps 0-3 read the queue and every stage.

// The dynamic shared memory aligned to 1 KiB (TMA destinations).
__device__ __forceinline__ unsigned char* align_1k(unsigned char* p) {
  return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(p) + 1023) & ~uintptr_t(1023));
}

// The producer's claim of a slot for a stage of stage_bytes: waits for it to be free, puts unit u
// in the queue with a unit's first stage, and arms the slot's "full" barrier for the bytes.
__device__ __forceinline__ void ring_claim(uint64_t* full, uint64_t* empty, int* unit_q, int slot,
                                           uint32_t parity, int i, int ks, int u, int stage_bytes) {
  mwait(&empty[slot], parity);
  if (ks == 0) unit_q[i % 64] = u;
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(su32(&full[slot])),
               "r"(stage_bytes)
               : "memory");
}

// The producer's end: one more "full" arrival with -1 in the queue.
__device__ __forceinline__ void ring_end(uint64_t* full, uint64_t* empty, int* unit_q, int slot,
                                         uint32_t parity, int i) {
  mwait(&empty[slot], parity);
  unit_q[i % 64] = -1;
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(su32(&full[slot])) : "memory");
}

// One bulk copy of `bytes` contiguous bytes, global -> shared, completing its bytes on `bar`.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(su32(bar))
               : "memory");
}

// The producer thread of a ring probe whose stages are single bulk copies: the block's units from
// blockIdx.x on, each next one taken from `counter` (or u + grid where it is null) when the one
// before starts; stage ks of unit u is stage_bytes at src_of(u, ks); then the queue's end.
template <int NS, class Src>
__device__ void ring_produce(const unsigned char* smem, uint64_t* full, uint64_t* empty, int* unit_q, int n_units,
                             int stages_per_unit, int stage_bytes, int* counter, Src&& src_of) {
  uint32_t parity = 1;
  int slot = 0, i = 0;
  for (int u = blockIdx.x; u < n_units; ++i) {
    const int next = static_cast<int>(gridDim.x) + (counter ? atomicAdd(counter, 1) : u);
    for (int ks = 0; ks < stages_per_unit; ++ks) {
      ring_claim(full, empty, unit_q, slot, parity, i, ks, u, stage_bytes);
      bulk_copy(su32(smem) + slot * stage_bytes, src_of(u, ks), stage_bytes, &full[slot]);
      if (++slot == NS) slot = 0, parity ^= 1;
    }
    u = next;
  }
  ring_end(full, empty, unit_q, slot, parity, i);
}

// The consumers: each queued unit's stages_per_unit stages, read and released in ring order
// (kStageW bytes read at the start of each kSlotB-byte slot); with spin > 0 each stage also
// holds its slot for that many cycles after the read, and with unit_spin > 0 the consumers spend
// that many cycles after a unit's last stage (stand-ins for arithmetic and an epilogue).
template <int kStageW, int NS, int kSlotB = kStageW>
__device__ void consume_queue(const unsigned char* smem, uint64_t* full, uint64_t* empty,
                              const int* unit_q, int stages_per_unit, uint32_t* sink, long long spin = 0,
                              long long unit_spin = 0) {
  int slot = 0;
  uint32_t parity = 0, acc = 0;
  for (int i = 0;; ++i) {
    mwait(&full[slot], parity);
    if (unit_q[i % 64] < 0) break;
    for (int ks = 0; ks < stages_per_unit; ++ks) {
      if (ks > 0) mwait(&full[slot], parity);
      consume_stage<kStageW>(smem + slot * kSlotB, &empty[slot], acc, spin);
      if (++slot == NS) slot = 0, parity ^= 1;
    }
    spin_cycles(unit_spin);
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

// The probes' expert sets on the device: set s holds experts s * top_k .. s * top_k + top_k - 1
// (sets are disjoint, so consecutive replays never share weights).
inline int* upload_expert_sets(int sets, int top_k) {
  std::vector<int> h(sets * top_k);
  for (int s = 0; s < sets; ++s)
    for (int j = 0; j < top_k; ++j) h[s * top_k + j] = s * top_k + j;
  int* experts;
  CK(cudaMalloc(&experts, h.size() * sizeof(int)));
  CK(cudaMemcpy(experts, h.data(), h.size() * sizeof(int), cudaMemcpyHostToDevice));
  return experts;
}

// What the ring probes start with: the card, a weight buffer of at least `bytes` (and 2 GiB) with
// the fill pattern, the expert sets, a sink word, and the device-to-device copy rate of 1 GiB
// (read + written, GB/s), printed with the card.
struct ProbeSetup {
  int sms;
  uint8_t* w;
  int* experts;
  uint32_t* sink;
  double copy_gbs;
};
inline ProbeSetup probe_setup(long long bytes, int sets, int top_k) {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  ProbeSetup s{};
  s.sms = prop.multiProcessorCount;
  const long long total = std::max(bytes, 1LL << 31);
  CK(cudaMalloc(&s.w, total));
  fill<<<4096, 256>>>(s.w, total);
  CK(cudaGetLastError());
  s.experts = upload_expert_sets(sets, top_k);
  CK(cudaMalloc(&s.sink, 4));
  std::printf("card: %s, %d SMs\n", prop.name, s.sms);
  const long long cb = 1LL << 30;
  uint8_t* w = s.w;
  const double copy_us = median_us([&](int) { CK(cudaMemcpyAsync(w + cb, w, cb, cudaMemcpyDeviceToDevice)); }, 20);
  s.copy_gbs = 2.0 * cb / copy_us / 1e3;
  std::printf("copy D2D 1 GiB: %.1f us, %.0f GB/s (read + write)\n", copy_us, s.copy_gbs);
  return s;
}
