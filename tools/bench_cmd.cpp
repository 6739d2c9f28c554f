// moejit bench: whole-layer time with CUDA events over CUDA-graph replays, weights rotated so
// they are not served from L2, against baselines measured in the same run: device-to-device
// copy bandwidth (bytes read + written) and cuBLAS bf16 (rate at 8192^3, and a bf16 layer of the
// same shape). cuBLAS is opened with dlopen here only; the library never links it.
#include <cublas_v2.h>
#include <dlfcn.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <regex>
#include <stdexcept>

#include "cli_common.h"
#include "commands.h"
#include "layer_runner.h"
#include "moejit_params.h"
#include "reference/cpu_reference.h"

namespace moejit_cli {

namespace {

using moejit::ref::DeviceBuffer;

struct Cublas {
  cublasStatus_t (*create)(cublasHandle_t*);
  cublasStatus_t (*destroy)(cublasHandle_t);
  cublasStatus_t (*set_stream)(cublasHandle_t, cudaStream_t);
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*,
                            cudaDataType, int, const void*, void*, cudaDataType, int,
                            cublasComputeType_t, cublasGemmAlgo_t);
  cublasHandle_t handle = nullptr;

  Cublas() {
    void* lib = dlopen("libcublas.so.13", RTLD_NOW | RTLD_LOCAL);
    if (!lib) lib = dlopen("libcublas.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) throw std::runtime_error("bench needs cuBLAS (libcublas.so.13) for its baseline");
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (!fn) throw std::runtime_error(std::string("cuBLAS has no ") + name);
    };
    sym(create, "cublasCreate_v2");
    sym(destroy, "cublasDestroy_v2");
    sym(set_stream, "cublasSetStream_v2");
    sym(gemm_ex, "cublasGemmEx");
    check(create(&handle), "cublasCreate");
  }
  ~Cublas() { destroy(handle); }
  static void check(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS)
      throw std::runtime_error(fmt::format("{} failed with cuBLAS status {}", what, static_cast<int>(s)));
  }
  // C[m, n] = A[m, k] x B[k, n], all row-major bf16, fp32 accumulation.
  void gemm(int m, int n, int k, const void* a, const void* b, void* c) const {
    const float one = 1.0f, zero = 0.0f;
    // Row-major C = A B is column-major C^T = B^T A^T.
    check(gemm_ex(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, m, k, &one, b, CUDA_R_16BF, n, a,
                  CUDA_R_16BF, k, &zero, c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                  CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx");
  }
};

// Random bf16 bits in [-1, 1) (never zeros: zeros run faster than real data). A block of at
// most 64 MB is generated on the host and tiled over the buffer with device copies.
void fill_random_bf16(DeviceBuffer& b, uint64_t seed) {
  std::vector<uint16_t> h(std::min<size_t>(b.bytes(), size_t(64) << 20) / 2);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& v : h) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    const float f = static_cast<float>((x >> 40) & 0xffffff) / 8388608.0f - 1.0f;
    uint32_t u;
    std::memcpy(&u, &f, 4);
    v = static_cast<uint16_t>(u >> 16);
  }
  const size_t block = h.size() * 2;
  CUDA_OK(cudaMemcpy(b.get(), h.data(), block, cudaMemcpyHostToDevice));
  for (size_t off = block; off < b.bytes(); off += block)
    CUDA_OK(cudaMemcpy(b.get<char>() + off, b.get(), std::min(block, b.bytes() - off),
                       cudaMemcpyDeviceToDevice));
}

// Milliseconds of each of `runs` launches of fn(i) (after 3 warm-up launches), each timed with
// its own event pair, in launch order; before(i), where given, runs before each launch's first
// event (not timed).
template <class F, class B = void (*)(int)>
std::vector<float> timed_ms(int runs, cudaStream_t s, F&& fn, B&& before = [](int) {}) {
  for (int i = 0; i < 3; ++i) fn(i);
  std::vector<cudaEvent_t> ev(2 * runs);
  for (auto& e : ev) CUDA_OK(cudaEventCreate(&e));
  for (int i = 0; i < runs; ++i) {
    before(i);
    CUDA_OK(cudaEventRecord(ev[2 * i], s));
    fn(i);
    CUDA_OK(cudaEventRecord(ev[2 * i + 1], s));
  }
  CUDA_OK(cudaStreamSynchronize(s));
  std::vector<float> ms(runs);
  for (int i = 0; i < runs; ++i) CUDA_OK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) CUDA_OK(cudaEventDestroy(e));
  return ms;
}

double median_of(std::vector<float> ms) {
  if (ms.empty()) throw std::logic_error("median_of: no runs");
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Median milliseconds of `runs` launches of fn(i).
template <class F>
double median_ms(int runs, cudaStream_t s, F&& fn) {
  return median_of(timed_ms(runs, s, std::forward<F>(fn)));
}

struct Graph {
  cudaGraphExec_t exec = nullptr;
  template <class F>
  Graph(cudaStream_t s, F&& body) {
    cudaGraph_t g;
    CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    body();
    CUDA_OK(cudaStreamEndCapture(s, &g));
    CUDA_OK(cudaGraphInstantiate(&exec, g, 0));
    CUDA_OK(cudaGraphDestroy(g));
  }
  Graph(Graph&& o) noexcept : exec(o.exec) { o.exec = nullptr; }
  ~Graph() {
    if (exec) cudaGraphExecDestroy(exec);
  }
  void launch(cudaStream_t s) const { CUDA_OK(cudaGraphLaunch(exec, s)); }
};

double l2_bytes() {
  int dev = 0, l2 = 0;
  CUDA_OK(cudaGetDevice(&dev));
  CUDA_OK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  return l2;
}

// The timeline diagnostic (--timeline): the layer compiled with "tl=0xADDRESS" stamps, per
// replay, the earliest and latest %globaltimer of each event into this buffer, then per stream
// GEMM (gemm1, gemm2) and block the latest replay's record: slot, SM, start, waited, first stage
// in, end, units (layout and events: templates/moejit_params.h).
using moejit_dev::kTlBlockFields;
using moejit_dev::kTlEvents;
using moejit_dev::kTlMaxBlocks;
using moejit_dev::kTlSlots;
const char* const kTlNames[] = {
    "route: start", "route: routed", "route: end (thread 0)", "gemm1: block start",
    "gemm1: dispatch waited", "gemm1: first copy issued", "gemm1: first stage in", "gemm1: block end",
    "gemm2: block start", "gemm2: first copy issued", "gemm2: gemm1 waited", "gemm2: first stage in",
    "gemm2: block end", "finalize: block start", "finalize: gemm2 waited", "finalize: block end",
    "gemm1 producer: waited", "gemm1 producer: unit known", "gemm2 producer: unit known",
    "gemm2 producer: slot free", "route: token 0 keys", "route: token 0 top-k",
    "dispatch: warp 0 placed", "dispatch: barrier passed", "resident: last gemm1 part in",
    "resident: gemm1 rows written", "resident: grid barrier", "resident: gemm2 weights in",
    "gemm1 producer: routed read", "gemm1 producer: count back", "gemm1 producer: planned",
    "gemm1 producer: unit loop"};
static_assert(std::size(kTlNames) == kTlEvents, "a name per moejit_dev::TlEvent");

// Replays the layer `layer_of(override)` compiled with the timeline, kTlSlots - 3 timed replays
// after 3 warm-ups, and prints per event the mean over replays of the earliest and latest stamp
// in us after the route kernel's start (%globaltimer may tick coarsely: means, not medians).
template <class LayerOf, class Launch>
void print_timeline(const std::string& title, const std::string& plan, int ncopies,
                    cudaStream_t stream, LayerOf&& layer_of, Launch&& launch) {
  const size_t slot_words = 1 + size_t(kTlSlots) * kTlEvents * 2;
  const size_t words = slot_words + 2 * size_t(kTlMaxBlocks) * kTlBlockFields;
  DeviceBuffer buf(words * 8);
  std::vector<unsigned long long> h(words, 0);
  for (size_t i = 1; i < slot_words; i += 2) h[i] = ~0ull;
  CUDA_OK(cudaMemcpy(buf.get(), h.data(), words * 8, cudaMemcpyHostToDevice));
  const std::string ov = (plan.empty() ? "" : plan + ",") +
                         fmt::format("tl={:#x}", reinterpret_cast<uintptr_t>(buf.get()));
  const auto layer = layer_of(ov);
  std::vector<Graph> graphs;
  for (int c = 0; c < ncopies; ++c) graphs.emplace_back(stream, [&] { launch(layer, c); });
  const std::vector<float> ms =
      timed_ms(kTlSlots - 3, stream, [&](int i) { graphs[i % ncopies].launch(stream); });
  CUDA_OK(cudaMemcpy(h.data(), buf.get(), words * 8, cudaMemcpyDeviceToHost));
  fmt::print("timeline {} ({} replays counted by the kernels; {} timed, median {:.1f} us with the "
             "stamps): us after the route kernel's first stamp, mean over the timed replays of the "
             "earliest / latest stamp, and the replays that have the event\n",
             title, h[0], ms.size(), 1e3 * median_of(ms));
  for (int e = 0; e < kTlEvents; ++e) {
    double lo = 0, hi = 0;
    int n = 0;
    for (int sl = 3; sl < kTlSlots && sl < static_cast<int>(h[0]); ++sl) {
      const unsigned long long* v = &h[1 + 2 * size_t(sl * kTlEvents)];
      const unsigned long long mn = v[2 * e], mx = v[2 * e + 1];
      if (mn == ~0ull || v[0] == ~0ull) continue;
      lo += 1e-3 * double(mn - v[0]);
      hi += 1e-3 * double(mx - v[0]);
      ++n;
    }
    if (n > 0) fmt::print("  {:<26} {:>8.2f} {:>8.2f}  {}\n", kTlNames[e], lo / n, hi / n, n);
    else fmt::print("  {:<26} {:>8} {:>8}  0\n", kTlNames[e], "-", "-");
  }
  // The last replay's per-block records of the stream GEMMs, in us after that replay's route
  // start; by units per block: blocks, mean start / first stage / end, latest end.
  auto replay_start = [&](const unsigned long long* r) {  // r[0]: the record's replay slot
    return h[1 + 2 * size_t(r[0] % kTlSlots) * kTlEvents];
  };
  for (int k = 0; k < 2; ++k) {
    std::map<int, std::vector<const unsigned long long*>> by_units;
    std::string rows;
    for (int b = 0; b < kTlMaxBlocks; ++b) {
      const unsigned long long* r = &h[slot_words + (size_t(k) * kTlMaxBlocks + b) * kTlBlockFields];
      if (r[2] == 0) continue;  // no such block
      const unsigned long long t0 = replay_start(r);
      auto us = [&](unsigned long long t) { return t == 0 ? -1.0 : 1e-3 * double(t - t0); };
      // Fields 7-9 (moejit_params.h): gemm1's signal warp, gemm2's producer.
      rows += fmt::format("    block {:4} sm {:3} units {:3} start {:7.2f} waited {:7.2f} first {:7.2f} "
                          "end {:7.2f}{}\n", b, r[1], r[6], us(r[2]), us(r[3]), us(r[4]), us(r[5]),
                          k == 0 ? fmt::format(" sig_got {:7.2f} sig_end {:7.2f}", us(r[7]), us(r[8]))
                                 : fmt::format(" p_in {:7.2f} p_unit {:7.2f} p_slot {:7.2f}", us(r[9]),
                                               us(r[7]), us(r[8])));
      by_units[static_cast<int>(r[6])].push_back(r);
    }
    if (rows.empty()) continue;
    fmt::print("  gemm{} blocks of the last replay, by units per block:\n", k + 1);
    for (const auto& [units, rs] : by_units) {
      double st = 0, fi = 0, en = 0, mx = 0;
      for (const unsigned long long* r : rs) {
        const unsigned long long t0 = replay_start(r);
        st += 1e-3 * double(r[2] - t0);
        fi += r[4] ? 1e-3 * double(r[4] - t0) : 0;
        en += 1e-3 * double(r[5] - t0);
        mx = std::max(mx, 1e-3 * double(r[5] - t0));
      }
      const double n = double(rs.size());
      fmt::print("    units {:3}: {:4} blocks, mean start {:7.2f} first {:7.2f} end {:7.2f}, latest end {:7.2f}\n",
                 units, rs.size(), st / n, fi / n, en / n, mx);
    }
    fmt::print("{}", rows);
  }
}

struct Row {
  std::string preset, plan;
  int tokens = 0, launches = 0, experts = 0, copies = 0;
  double us = 0, weight_mb = 0, gbs = 0, frac_copy = 0, tflops = 0, cublas_us = 0;
  double chain_us = 0;  // per layer, in one graph of `copies` back-to-back layers
  std::vector<double> copy_us;  // median per weight copy
  bool verified = false;
};

void add_bench_cmd(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench", "time the whole layer against copy and cuBLAS baselines");
  static SpecArgs spec_args;
  static std::string tokens = "1,8,33,64", json, overrides;
  static int runs = 100;
  static uint64_t seed = 1;
  static bool no_cublas_layer = false, timeline = false, warm_inputs = false;
  static std::string l2_prep = "write";
  spec_args.add(*cmd);
  cmd->add_option("--tokens", tokens, "token counts, comma-separated");
  cmd->add_option("--json", json, "also write the rows as JSON to this file");
  cmd->add_option("--runs", runs, "timed runs per configuration (median; at least 50)");
  cmd->add_option("--seed", seed, "random seed");
  cmd->add_option("--plans", overrides,
                  "';'-separated MOEJIT_PLAN_OVERRIDE values to compare (tuning)");
  cmd->add_flag("--no-cublas-layer", no_cublas_layer, "skip the bf16 cuBLAS layer baseline");
  cmd->add_flag("--warm-inputs", warm_inputs,
                "before each timed layer of time_us (outside its events) copy its inputs (hidden "
                "states, routing logits and bias, or precomputed ids and weights) once, so that "
                "they start in L2 as in a model, where the kernels before the layer wrote them; by "
                "default they come from DRAM (the previous replay's weights evicted them). Times "
                "with it compare only with each other (chain_us and --timeline stay cold)");
  cmd->add_option("--l2-prep", l2_prep,
                  "before timing each configuration: write = write 64 MiB (a memset, outside the "
                  "timed replays), so that every row starts from the L2 state a process starts in "
                  "(large read-only streams before the layer, e.g. the previous row's bf16 cuBLAS "
                  "layer, leave a state in which the layer's evict-first weight stream runs 1-3% "
                  "slower until some 16 MiB are written; bench/RESULTS.md section 45); none = "
                  "nothing (each row then follows whatever ran before it)")
      ->check(CLI::IsMember({"write", "none"}));
  cmd->add_flag("--timeline", timeline,
                "also replay each configuration compiled with in-kernel %globaltimer stamps and "
                "print when each kernel's phases start and end (a diagnostic; slower layers)");
  cmd->callback([] {
    runs = std::max(runs, 50);
    moejit::MoeSpec spec = spec_args.load();
    const std::vector<int> counts = parse_int_list(tokens, "--tokens");
    // The configurations to compare: an empty item (also a leading or trailing ';', or one of
    // spaces) is the default plan. Each is planned here first, so that a bad override fails
    // before any timing; tl= is --timeline's own.
    std::vector<std::string> plans = {""};
    if (!overrides.empty()) {
      plans.clear();
      auto trimmed = [](const std::string& t) {
        const size_t a = t.find_first_not_of(" \t\n"), b = t.find_last_not_of(" \t\n");
        return a == std::string::npos ? std::string() : t.substr(a, b - a + 1);
      };
      size_t from = 0;
      for (size_t at; (at = overrides.find(';', from)) != std::string::npos; from = at + 1)
        plans.push_back(trimmed(overrides.substr(from, at - from)));
      plans.push_back(trimmed(overrides.substr(from)));
      std::string names;
      static const std::regex own_tl("(^|[,\\s])tl=");
      for (const std::string& plan : plans) {
        if (std::regex_search(plan, own_tl))
          throw moejit::Error(moejit::ErrorKind::InvalidArgument,
                              fmt::format("--plans '{}': tl= is set by --timeline", plan));
        setenv("MOEJIT_PLAN_OVERRIDE", plan.c_str(), 1);
        moejit::dump(spec, moejit::DumpKind::Plan);  // the layer's plan; throws moejit::Error
        names += (names.empty() ? "" : "; ") + (plan.empty() ? std::string("default") : plan);
      }
      unsetenv("MOEJIT_PLAN_OVERRIDE");
      fmt::print("plans: {}\n", names);
    }
    std::string why;
    if (!moejit::has_gpu(&why)) {
      fmt::print("no GPU: {}\n", why);
      set_failed();
      return;
    }
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    const std::string card = moejit::device_name();
    fmt::print("card: {} ({}), L2 {:.0f} MB; weights {}\n", card, moejit::device_arch(),
               l2_bytes() / 1e6, moejit::to_string(spec.weight_format));
    const moejit::TiledWeightBytes padded = moejit::tiled_weight_bytes(spec);
    if (spec.weight_format == moejit::WeightFormat::MxInt4G32Tiled &&
        (padded.hidden != spec.hidden || padded.intermediate != spec.intermediate))
      fmt::print("tiled weights padded from hidden {} and intermediate {} to {} and {}: the layer reads "
                 "{:.1f}% more weight bytes than weight_MB, which counts the unpadded ones\n",
                 spec.hidden, spec.intermediate, padded.hidden, padded.intermediate,
                 100.0 * (double(padded.hidden) * padded.intermediate / (double(spec.hidden) * spec.intermediate) - 1));

    // Baseline 1: device-to-device copy bandwidth, bytes read + written.
    double copy_gbs = 0;
    {
      const size_t bytes = size_t(2) << 30;
      DeviceBuffer a(bytes), b(bytes);
      CUDA_OK(cudaMemset(a.get(), 1, bytes));
      const double ms = median_ms(20, stream, [&](int) {
        CUDA_OK(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, stream));
      });
      copy_gbs = 2.0 * bytes / (ms * 1e-3) / 1e9;
    }
    // Baseline 2: cuBLAS bf16 GEMM rate on random data.
    Cublas blas;
    CUDA_OK(cudaStreamSynchronize(stream));
    Cublas::check(blas.set_stream(blas.handle, stream), "cublasSetStream");
    double cublas_tflops = 0;
    {
      const int n = 8192;
      DeviceBuffer a(size_t(n) * n * 2), b(size_t(n) * n * 2), c(size_t(n) * n * 2);
      fill_random_bf16(a, 1);
      fill_random_bf16(b, 2);
      const double ms = median_ms(10, stream, [&](int) { blas.gemm(n, n, n, a.get(), b.get(), c.get()); });
      cublas_tflops = 2.0 * n * n * double(n) / (ms * 1e-3) / 1e12;
    }
    fmt::print("baseline: copy {:.0f} GB/s (read + write), cuBLAS bf16 8192^3 {:.0f} TFLOP/s\n",
               copy_gbs, cublas_tflops);
    // Baseline 3: what the timing itself costs at this size: a graph of n dependent 4-byte
    // memsets (n = 1 and 4: a layer is 4-5 launches), replayed and timed like the layer.
    std::vector<double> floor_us;
    {
      DeviceBuffer tiny(256);
      for (const int n : {1, 4}) {
        const Graph g(stream, [&] {
          for (int i = 0; i < n; ++i) CUDA_OK(cudaMemsetAsync(tiny.get(), i, 4, stream));
        });
        floor_us.push_back(1e3 * median_ms(runs, stream, [&](int) { g.launch(stream); }));
      }
      fmt::print("timing floor: a graph of 1 / 4 dependent 4-byte memsets {:.1f} / {:.1f} us\n",
                 floor_us[0], floor_us[1]);
    }

    // --l2-prep write: 64 MiB written before each configuration is timed.
    DeviceBuffer l2_prep_buf(l2_prep == "write" ? size_t(64) << 20 : 16);
    auto prepare_l2 = [&] {
      if (l2_prep != "write") return;
      CUDA_OK(cudaMemsetAsync(l2_prep_buf.get(), 0, l2_prep_buf.bytes(), stream));
      CUDA_OK(cudaStreamSynchronize(stream));
    };

    // Weights, rotated over enough copies that one run's weights are evicted before reuse.
    moejit::ref::HostLayer host = moejit::ref::make_weights(spec, seed);
    const int H = spec.hidden, I = spec.intermediate, K = spec.top_k;
    const double expert_bytes =
        double(2 * I) * H / 2 + double(2 * I) * (H / 32) * 2 + double(H) * I / 2 + double(H) * (I / 32) * 2;
    std::vector<moejit::ref::DeviceLayer> copies(1);
    copies[0].upload_weights(host);
    const bool tiled = spec.weight_format == moejit::WeightFormat::MxInt4G32Tiled;

    std::vector<Row> rows;
    for (int T : counts) {
      // Uniform routing (no shared bias), as in a balanced serving workload.
      moejit::ref::InputOptions uniform;
      uniform.bias_std = 0.0;
      moejit::ref::make_inputs(host, T, seed * 7919 + T, uniform);
      const auto routing = moejit::ref::route_all(spec, host, T);
      std::map<int, int> per_expert;  // local expert -> slots
      for (int32_t id : routing.ids) {
        const int l = id - spec.local_expert_offset;
        if (l >= 0 && l < spec.local_experts()) ++per_expert[id];
      }
      const double touched = per_expert.size() * expert_bytes;
      const int want = std::max(2, static_cast<int>(std::ceil(3.0 * l2_bytes() / std::max(touched, 1.0))));
      // (What one copy of every expert's weights occupies: tiled ones padded, tiled_weight_bytes.)
      const double total_w =
          tiled ? double(padded.w13 + padded.w13_scale + padded.w2 + padded.w2_scale)
                : spec.num_experts * expert_bytes;
      const int ncopies = std::max(1, std::min(want, static_cast<int>(40e9 / total_w)));
      while (static_cast<int>(copies.size()) < ncopies) {
        copies.emplace_back();
        auto& c = copies.back();
        // (Tiled weights: only the tiled tensors are copied, the row-major ones stay empty.)
        for (auto [dst, src] : {std::pair{&c.w13, &copies[0].w13}, {&c.w13_scale, &copies[0].w13_scale},
                                {&c.w2, &copies[0].w2}, {&c.w2_scale, &copies[0].w2_scale},
                                {&c.w13_tiled, &copies[0].w13_tiled}, {&c.w2_tiled, &copies[0].w2_tiled},
                                {&c.w13_scale_tiled, &copies[0].w13_scale_tiled},
                                {&c.w2_scale_tiled, &copies[0].w2_scale_tiled},
                                {&c.alpha, &copies[0].alpha}, {&c.beta, &copies[0].beta},
                                {&c.limit, &copies[0].limit}}) {
          if (tiled && (dst == &c.w13 || dst == &c.w2 || dst == &c.w13_scale || dst == &c.w2_scale))
            continue;
          *dst = DeviceBuffer(src->bytes());
          if (src->bytes())
            CUDA_OK(cudaMemcpy(dst->get(), src->get(), src->bytes(), cudaMemcpyDeviceToDevice));
        }
      }
      for (const std::string& plan : plans) {
        if (plan.empty()) unsetenv("MOEJIT_PLAN_OVERRIDE");
        else setenv("MOEJIT_PLAN_OVERRIDE", plan.c_str(), 1);
        // Verify this configuration before timing it (copy 0, fresh inputs of this T).
        CaseOptions vo;
        vo.timing_runs = 0;
        vo.max_checked_tokens = 16;
        const CaseResult check = run_case(spec, host, copies[0], T, seed * 7919 + T, vo, uniform);
        if (!check.pass) {
          fmt::print("VERIFY FAILED tokens={} plan='{}': {}\n", T, plan, check.line());
          set_failed();
          continue;
        }
        const auto layer = moejit::compile_finalized(spec);
        DeviceBuffer ws(std::max<size_t>(256, layer.workspace_bytes(T)));
        DeviceBuffer out(std::max<size_t>(16, size_t(T) * H * 2));
        auto launch_layer = [&](const moejit::MoeInputs& in) {
          layer.launch(in, T, {out.get()}, {ws.get(), ws.bytes()}, stream);
        };
        std::vector<moejit::MoeInputs> ins;  // one per weight copy
        std::vector<Graph> graphs;
        for (int c = 0; c < ncopies; ++c) {
          moejit::MoeInputs in = copies[0].inputs(spec);
          const moejit::MoeInputs w = copies[c].inputs(spec);  // copy c's weights
          in.w13 = w.w13;
          in.w13_scale = w.w13_scale;
          in.w2 = w.w2;
          in.w2_scale = w.w2_scale;
          ins.push_back(in);
          graphs.emplace_back(stream, [&] { launch_layer(in); });
        }
        // --warm-inputs: the inputs read once into L2 before each timed replay.
        const size_t x_bytes = size_t(T) * H * 2;
        const size_t logit_bytes =
            size_t(T) * spec.num_experts * (spec.logits_dtype == moejit::DType::FP32 ? 4 : 2);
        const size_t bias_bytes =
            ins[0].routing_bias ? size_t(spec.num_experts) * (spec.bias_dtype == moejit::DType::FP32 ? 4 : 2) : 0;
        const size_t topk_bytes = size_t(T) * spec.top_k * 4;  // ids (int32) or weights (fp32)
        DeviceBuffer scratch(warm_inputs ? x_bytes + logit_bytes + bias_bytes + 2 * topk_bytes : 16);
        auto warm = [&](int) {
          if (!warm_inputs) return;
          const moejit::MoeInputs& in = ins[0];
          char* dst = scratch.get<char>();
          CUDA_OK(cudaMemcpyAsync(dst, in.hidden_states, x_bytes, cudaMemcpyDeviceToDevice, stream));
          if (in.routing_logits)
            CUDA_OK(cudaMemcpyAsync(dst + x_bytes, in.routing_logits, logit_bytes,
                                    cudaMemcpyDeviceToDevice, stream));
          if (bias_bytes)
            CUDA_OK(cudaMemcpyAsync(dst + x_bytes + logit_bytes, in.routing_bias, bias_bytes,
                                    cudaMemcpyDeviceToDevice, stream));
          char* rest = dst + x_bytes + logit_bytes + bias_bytes;
          for (const void* src : {static_cast<const void*>(in.topk_ids), static_cast<const void*>(in.topk_weights)}) {
            if (src) CUDA_OK(cudaMemcpyAsync(rest, src, topk_bytes, cudaMemcpyDeviceToDevice, stream));
            rest += topk_bytes;
          }
        };
        prepare_l2();
        const std::vector<float> all =
            timed_ms(runs, stream, [&](int i) { graphs[i % ncopies].launch(stream); }, warm);
        const double ms = median_of(all);
        // The same runs grouped by weight copy (run i used copy i % copies): whether the copies,
        // allocated one after another, stream at different speeds. (Small layers take more
        // copies than runs: those past the runs were not timed.)
        std::vector<double> copy_us;
        for (int c = 0; c < std::min(ncopies, runs); ++c) {
          std::vector<float> mine;
          for (int i = c; i < runs; i += ncopies) mine.push_back(all[i]);
          copy_us.push_back(1e3 * median_of(mine));
        }
        // The same layers back to back in one graph (one per weight copy), as in a model's graph:
        // the per-replay cost of a graph launch is shared.
        const Graph chain(stream, [&] {
          for (const auto& in : ins) launch_layer(in);
        });
        const double chain_ms = median_ms(runs, stream, [&](int) { chain.launch(stream); }) / ncopies;
        Row r;
        r.preset = spec_args.preset.empty() ? spec_args.spec_file : spec_args.preset;
        r.plan = plan;
        r.tokens = T;
        r.launches = layer.launches_per_call(T);
        r.experts = static_cast<int>(per_expert.size());
        r.copies = ncopies;
        r.us = ms * 1e3;
        r.chain_us = chain_ms * 1e3;
        r.copy_us = copy_us;
        r.weight_mb = touched / 1e6;
        r.gbs = touched / (ms * 1e-3) / 1e9;
        r.frac_copy = r.gbs / copy_gbs;
        double slots = 0;
        for (auto& kv : per_expert) slots += kv.second;
        r.tflops = 2.0 * slots * (2.0 * I * H + double(I) * H) / (ms * 1e-3) / 1e12;
        r.verified = true;
        rows.push_back(r);
        if (timeline) {
          prepare_l2();  // (the same starting state as the timed replays)
          print_timeline(
              fmt::format("{} tokens {} {}", r.preset, T, plan.empty() ? "default" : plan), plan,
              ncopies, stream,
              [&](const std::string& ov) {
                setenv("MOEJIT_PLAN_OVERRIDE", ov.c_str(), 1);
                return moejit::compile_finalized(spec);
              },
              [&](const auto& l, int c) {
                l.launch(ins[c], T, {out.get()}, {ws.get(), ws.bytes()}, stream);
              });
        }
      }
      unsetenv("MOEJIT_PLAN_OVERRIDE");
      // The bf16 cuBLAS layer of the same shape: per touched expert, [n_e, H] x [H, 2I] and
      // [n_e, I] x [I, H] with bf16 weights (rotated the same way). Routing, SwiGLU and finalize
      // are left out, which favours the baseline.
      if (!no_cublas_layer && !per_expert.empty()) {
        const size_t w1 = size_t(H) * 2 * I * 2, w2 = size_t(I) * H * 2;
        const int bcopies = std::max(1, std::min(want, static_cast<int>(30e9 / (per_expert.size() * (w1 + w2)))));
        std::vector<DeviceBuffer> wb;
        for (int c = 0; c < bcopies; ++c) {
          wb.emplace_back(per_expert.size() * (w1 + w2));
          fill_random_bf16(wb.back(), 10 + c);
        }
        DeviceBuffer xa(size_t(T) * K * std::max(H, 2 * I) * 2), xb(xa.bytes());
        fill_random_bf16(xa, 99);
        std::vector<Graph> graphs;
        for (int c = 0; c < bcopies; ++c)
          graphs.emplace_back(stream, [&] {
            size_t e = 0;
            for (auto& kv : per_expert) {
              const char* base = wb[c].get<char>() + e++ * (w1 + w2);
              blas.gemm(kv.second, 2 * I, H, xa.get(), base, xb.get());
              blas.gemm(kv.second, H, I, xb.get(), base + w1, xa.get());
            }
          });
        const double ms = median_ms(runs, stream, [&](int i) { graphs[i % bcopies].launch(stream); });
        for (auto& r : rows)
          if (r.tokens == T) r.cublas_us = ms * 1e3;
      }
    }
    fmt::print("\n{:<14} {:>6} {:>9} {:>8} {:>7} {:>9} {:>8} {:>7} {:>8} {:>10} {:>7} {:>9} {}\n",
               "preset", "tokens", "time_us", "launches", "experts", "weight_MB", "GB/s", "%copy",
               "TFLOP/s", "cublas_us", "x_blas", "chain_us", "plan");
    auto plan_name = [](const Row& r) { return r.plan.empty() ? std::string("default") : r.plan; };
    for (const auto& r : rows)
      fmt::print("{:<14} {:>6} {:>9.1f} {:>8} {:>7} {:>9.1f} {:>8.0f} {:>6.1f}% {:>8.2f} {:>10.1f} {:>7.2f} {:>9.1f} {}\n",
                 r.preset, r.tokens, r.us, r.launches, r.experts, r.weight_mb, r.gbs,
                 100 * r.frac_copy, r.tflops, r.cublas_us, r.cublas_us > 0 ? r.cublas_us / r.us : 0.0,
                 r.chain_us, plan_name(r));
    fmt::print("(chain_us: per layer in one graph of as many back-to-back layers as weight copies; "
               "time_us: one layer per graph replay, the figure the columns after it use)\n");
    for (const auto& r : rows)
      fmt::print("per weight copy, tokens {} {}: {:.1f} us\n", r.tokens, plan_name(r),
                 fmt::join(r.copy_us, " / "));
    fmt::print("card: {}; copy {:.0f} GB/s; cuBLAS bf16 {:.0f} TFLOP/s; graph floor {:.1f} / {:.1f} us "
               "(1 / 4 memsets); runs {} (median), CUDA graphs, weights rotated over >= 3x L2; "
               "L2 prep {}{}\n",
               card, copy_gbs, cublas_tflops, floor_us[0], floor_us[1], runs, l2_prep,
               warm_inputs ? "; time_us with the inputs copied once before each timed layer "
                             "(--warm-inputs; chain_us and the timeline without)"
                           : "");
    if (!json.empty()) {
      std::ofstream f(json);
      f << "{\n  \"card\": \"" << card << "\",\n  \"copy_gbs\": " << copy_gbs
        << ",\n  \"cublas_bf16_tflops\": " << cublas_tflops << ",\n  \"graph_floor_us\": ["
        << floor_us[0] << ", " << floor_us[1] << "],\n  \"warm_inputs\": "
        << (warm_inputs ? "true" : "false") << ",\n  \"l2_prep\": \"" << l2_prep
        << "\",\n  \"weight_format\": \""
        << moejit::to_string(spec.weight_format) << "\",\n  \"rows\": [\n";
      for (size_t i = 0; i < rows.size(); ++i) {
        const auto& r = rows[i];
        f << fmt::format("    {{\"preset\": \"{}\", \"plan\": \"{}\", \"tokens\": {}, \"time_us\": {:.2f}, "
                         "\"launches\": {}, \"experts\": {}, \"weight_mb\": {:.2f}, \"gbs\": {:.1f}, "
                         "\"frac_copy\": {:.4f}, \"tflops\": {:.3f}, \"cublas_layer_us\": {:.2f}, "
                         "\"weight_copies\": {}, \"chain_us\": {:.2f}, \"copy_us\": [{:.2f}]}}{}\n",
                         r.preset, r.plan, r.tokens, r.us, r.launches, r.experts, r.weight_mb, r.gbs,
                         r.frac_copy, r.tflops, r.cublas_us, r.copies, r.chain_us,
                         fmt::join(r.copy_us, ", "), i + 1 < rows.size() ? "," : "");
      }
      f << "  ]\n}\n";
    }
    CUDA_OK(cudaStreamDestroy(stream));
  });
}

}  // namespace

void add_bench(CLI::App& app) { add_bench_cmd(app); }

}  // namespace moejit_cli
