// Probe: what is the fixed cost of a short weight stream? A plain linear read of X MB, timed
// alone with CUDA events (as bench/probe_stream.cu and bench/probe_tma.cu time their kernels),
// with the bytes (a) in a region not touched by the previous 16 replays (17 regions spread
// over 2 GB: the probes' rotation), (b) in 17 regions packed next to each other, (c) in one
// region re-read after a 192 MB scrub read of another buffer (not in L2; its pages recently
// used), (d) in one region re-read with nothing between (L2 hot where it fits), and an empty
// kernel of the same grid. Not part of the library; build and run by hand:
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o probe_fixed bench/probe_fixed.cu && ./probe_fixed
#include "probe_common.cuh"

__global__ void __launch_bounds__(512) empty_kernel(uint32_t* sink, int never) {
  if (never == 12345) sink[0] = 1;
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  const long long span = 2LL << 30;
  uint8_t *w, *scrub;
  uint32_t* sink;
  CK(cudaMalloc(&w, span));
  CK(cudaMalloc(&scrub, 192LL << 20));
  CK(cudaMalloc(&sink, 4));
  CK(cudaMemset(w, 0x5a, span));
  CK(cudaMemset(scrub, 0x33, 192LL << 20));
  std::printf("card: %s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);
  const int grid = sms * 4;
  auto read = [&](const uint8_t* p, long long bytes) {
    linear_read<<<grid, 512>>>(reinterpret_cast<const uint4*>(p), bytes / 16, sink);
  };
  // pre(i) runs before the first event, body(i) between the events; median of 40.
  auto time = [&](auto pre, auto body) { return median_us(body, 40, pre); };
  auto none = [](int) {};
  std::printf("empty kernel <<<%d, 512>>>: %.2f us\n", grid,
              time(none, [&](int) { empty_kernel<<<grid, 512>>>(sink, 0); }));
  std::printf("%8s %10s %10s %10s %10s  (us; GB/s in parentheses)\n", "MB", "spread", "packed",
              "scrubbed", "hot");
  for (long long mb : {1, 2, 4, 8, 16, 32, 64, 117}) {
    const long long bytes = mb << 20;
    const long long stride = span / 17 / 4096 * 4096;
    const double t_spread = time(none, [&](int i) { read(w + (i % 17) * stride, bytes); });
    const double t_packed = time(none, [&](int i) { read(w + (i % 17) * bytes, bytes); });
    const double t_scrub = time([&](int) { read(scrub, 192LL << 20); }, [&](int) { read(w, bytes); });
    const double t_hot = time(none, [&](int) { read(w, bytes); });
    auto gbs = [&](double us) { return bytes / us / 1e3; };
    std::printf("%8lld %6.2f (%4.0f) %6.2f (%4.0f) %6.2f (%4.0f) %6.2f (%4.0f)\n", mb, t_spread, gbs(t_spread),
                t_packed, gbs(t_packed), t_scrub, gbs(t_scrub), t_hot, gbs(t_hot));
  }
  return 0;
}
