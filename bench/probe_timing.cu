// Probe: what a pure stream of each missed decode row's weight bytes takes when it is timed as
// `moejit bench` times the layer. Section 32d of bench/RESULTS.md timed the ring of
// bench/probe_order.cu one run at a time on an idle GPU (median_us: each run waits for its end
// event), which puts the host's submission latency (~3.5 us, section 13b) into every figure,
// while the bench enqueues its graph replays back to back. Here the same kind of ring (one TMA
// thread, one 16 KiB bulk copy per stage, three stages, two blocks of 160 threads per SM, units
// of two stages from a counter, consumers that only read) and a plain linear read stream the
// bytes of kimi-k2's one token (198.2 MB), qwen3-30b-a3b's 8 tokens (138.0 MB), kimi-k2-tp8's one
// token (24.8 MB) and qwen3-30b-a3b's one token (21.2 MB), each timed three ways:
//   alone   one run at a time, as section 32d (median_us);
//   queued  plain launches enqueued back to back, events around each (queued_us);
//   graph   the same as one-kernel CUDA graphs replayed back to back, as the bench does.
// An empty kernel of the ring's grid and a graph of one 4-byte memset (the bench's "graph
// floor") give the timing's own cost. Weights rotate over 8 disjoint ranges 208 MiB apart
// (consecutive runs never share bytes; a range comes back after 7 others, at least 149 MB
// later, over twice the L2). Each ring run zeroes the counter of the run 32 later, so that
// graphs need no memset node. Not part of the library; build and run by hand:
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o probe_timing bench/probe_timing.cu && ./probe_timing
#include "probe_common.cuh"

constexpr int kR = 64, kKC = 512, kNS = 3;
constexpr int kStageW = kR * kKC / 2;  // 16 KiB
constexpr int kSpu = 2;                // stages per unit
constexpr long long kSetStride = 208LL << 20;
constexpr int kSets = 8, kCounters = 64;

__global__ void __launch_bounds__(160) ring(const uint8_t* w, int n_units, uint32_t* sink, int* counter,
                                            int* zero_later) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = align_1k(smem_raw);
  __shared__ uint64_t full[kNS], empty[kNS];
  __shared__ int unit_q[64];
  const int tid = threadIdx.x, warp = tid >> 5;
  if (blockIdx.x == 0 && tid == 0) *zero_later = 0;
  init_ring(full, empty, kNS, 1);
  if (warp == 4) {
    if (tid != 128) return;
    ring_produce<kNS>(smem, full, empty, unit_q, n_units, kSpu, kStageW, counter,
                      [&](int u, int ks) { return w + (static_cast<long long>(u) * kSpu + ks) * kStageW; });
    return;
  }
  consume_queue<kStageW, kNS>(smem, full, empty, unit_q, kSpu, sink);
}

__global__ void __launch_bounds__(160) empty_kernel(uint32_t* sink, int never) {
  if (never == 12345) sink[0] = 1;
}

int main() {
  const ProbeSetup ps = probe_setup(kSets * kSetStride, kSets, 8);
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  int* counters;
  CK(cudaMalloc(&counters, kCounters * sizeof(int)));
  CK(cudaMemset(counters, 0, kCounters * sizeof(int)));
  const int grid = 2 * ps.sms, lin_grid = 4 * ps.sms;
  const int smem = kStageW * kNS + 1024;
  CK(cudaFuncSetAttribute(ring, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  long long run = 0;  // ring runs so far: run r uses counter r % 64 and zeroes (r + 32) % 64
  auto ring_on = [&](cudaStream_t st, long long r, int n_units) {
    const int c = static_cast<int>(r % kCounters);
    ring<<<grid, 160, smem, st>>>(ps.w + (r % kSets) * kSetStride, n_units, ps.sink, counters + c,
                                  counters + (c + kCounters / 2) % kCounters);
    CK(cudaGetLastError());
  };
  auto linear_on = [&](cudaStream_t st, long long r, long long bytes) {
    linear_read<<<lin_grid, 512, 0, st>>>(reinterpret_cast<const uint4*>(ps.w + (r % kSets) * kSetStride),
                                          bytes / 16, ps.sink);
    CK(cudaGetLastError());
  };
  auto report = [&](const char* what, double bytes, double alone, double queued, double graph) {
    std::printf("%-22s alone %7.1f  queued %7.1f  graph %7.1f us", what, alone, queued, graph);
    if (bytes > 0) std::printf("   (graph: %5.0f GB/s = %5.1f%% of copy)", bytes / graph / 1e3,
                               100.0 * bytes / graph / 1e3 / ps.copy_gbs);
    std::printf("\n");
  };
  // The timing's own cost.
  {
    // (median_us records its events on the legacy stream: its runs launch there.)
    const double alone = median_us([&](int) { empty_kernel<<<grid, 160>>>(ps.sink, 0); }, 40, [](int) {});
    const double queued = queued_us([&](int) { empty_kernel<<<grid, 160, 0, s>>>(ps.sink, 0); }, 100, s);
    cudaGraphExec_t g = capture(s, [&] { empty_kernel<<<grid, 160, 0, s>>>(ps.sink, 0); });
    const double graph = queued_us([&](int) { CK(cudaGraphLaunch(g, s)); }, 100, s);
    report("empty kernel", 0, alone, queued, graph);
    cudaGraphExec_t m = capture(s, [&] { CK(cudaMemsetAsync(ps.sink, 0, 4, s)); });
    const double mq = queued_us([&](int) { CK(cudaGraphLaunch(m, s)); }, 100, s);
    std::printf("%-22s graph %7.1f us (the bench's graph floor)\n", "one 4-byte memset", mq);
  }
  struct Row {
    const char* name;
    long long bytes;
    double target;  // fraction of copy the issue asks for
  };
  const Row rows[] = {{"kimi-k2 1 token", 198180864LL, 0.85},
                      {"qwen3 8 tokens", 138018816LL, 0.75},
                      {"kimi-k2-tp8 1 token", 24772608LL, 0.0},
                      {"qwen3 1 token", 21233664LL, 0.75}};
  for (int pass = 0; pass < 2; ++pass)
    for (const Row& row : rows) {
      const int n_units = static_cast<int>((row.bytes + kSpu * kStageW / 2) / (kSpu * kStageW));
      const double ring_bytes = double(n_units) * kSpu * kStageW;
      // median_us passes the run's index; the ring's runs count on `run` instead (its counters).
      // Its own warm-ups (5) and runs (40) are 45 launches, all of them counted.
      const double r_alone = median_us([&](int) { ring_on(0, run++, n_units); }, 40, [](int) {});
      CK(cudaDeviceSynchronize());
      const double r_queued = queued_us([&](int) { ring_on(s, run++, n_units); }, 100, s);
      std::vector<cudaGraphExec_t> gs(kCounters);
      const long long base = run;  // graph j replays run base + j (mod 64) forever after
      for (int j = 0; j < kCounters; ++j) gs[j] = capture(s, [&] { ring_on(s, base + j, n_units); });
      long long rep = 0;
      const double r_graph = queued_us([&](int) { CK(cudaGraphLaunch(gs[rep++ % kCounters], s)); }, 100, s);
      // The next plain run continues the counters' cycle where the replays left it.
      run = base + rep;
      for (auto g : gs) CK(cudaGraphExecDestroy(g));
      char what[64];
      std::snprintf(what, sizeof what, "ring %s", row.name);
      report(what, ring_bytes, r_alone, r_queued, r_graph);
      long long lr = 0;
      const double l_alone = median_us([&](int) { linear_on(0, lr++, row.bytes); }, 40, [](int) {});
      CK(cudaDeviceSynchronize());
      const double l_queued = queued_us([&](int) { linear_on(s, lr++, row.bytes); }, 100, s);
      std::vector<cudaGraphExec_t> ls(kSets);
      for (int j = 0; j < kSets; ++j) ls[j] = capture(s, [&] { linear_on(s, j, row.bytes); });
      long long lrep = 0;
      const double l_graph = queued_us([&](int) { CK(cudaGraphLaunch(ls[lrep++ % kSets], s)); }, 100, s);
      for (auto g : ls) CK(cudaGraphExecDestroy(g));
      std::snprintf(what, sizeof what, "linear %s", row.name);
      report(what, double(row.bytes), l_alone, l_queued, l_graph);
      if (pass == 0 && row.target > 0)
        std::printf("%-22s target %.0f%% of copy: %.1f us\n", row.name, 100.0 * row.target,
                    row.bytes / (row.target * ps.copy_gbs * 1e3));
      if (pass == 0 && row.target == 0)
        std::printf("%-22s target 2x the floor at copy rate: %.1f us\n", row.name,
                    2.0 * row.bytes / (ps.copy_gbs * 1e3));
    }
  CK(cudaDeviceSynchronize());
  return 0;
}
