// Compiled layers: plan -> codegen -> (cache | NVRTC) -> driver modules, and the launcher.
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <system_error>
#include <thread>
#include <tuple>

#include <pthread.h>

#include "compiler/compiler.h"
#include "moejit/moejit.h"
#include "moejit_params.h"
#include "runtime/driver.h"
#include "runtime/kernel_cache.h"
#include "runtime/once_map.h"

namespace moejit {

using compiler::KernelRole;
using compiler::Plan;

namespace {

// Throws InvalidArgument "<scope><name>[ = <p>] is not 16-byte aligned" for a pointer the
// kernels access by 16-byte loads or stores (the message is built only then: launch checks).
void require_aligned16(const void* p, const char* scope, const char* name, bool with_value = false) {
  if (reinterpret_cast<uintptr_t>(p) % 16 == 0) return;
  throw Error(ErrorKind::InvalidArgument,
              fmt::format("{}{}{} is not 16-byte aligned", scope, name,
                          with_value ? fmt::format(" = {}", p) : std::string()));
}

constexpr size_t kAlign = 256;
size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// A layer key's first field: the context (by runtime::context_id, which a context created after
// a reset or destroy does not share), so that release_layers() finds a context's layers.
std::string context_key_prefix(unsigned long long ctx) { return fmt::format("ctx={}|", ctx); }

// Everything that selects a compiled layer: the context, the spec, the arch and the buckets.
std::string layer_key(const MoeSpec& s, const std::string& arch, int max_tokens,
                      unsigned long long ctx) {
  return fmt::format("{}{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{:a}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
                     context_key_prefix(ctx), s.hidden, s.intermediate, s.num_experts, s.top_k,
                     static_cast<int>(s.weight_format), static_cast<int>(s.activation_dtype),
                     static_cast<int>(s.gate_up_order), static_cast<int>(s.routing),
                     static_cast<int>(s.logits_dtype), s.n_group, s.topk_group,
                     s.has_routing_bias, s.routed_scaling_factor, static_cast<int>(s.bias_dtype),
                     s.swiglu_alpha, s.swiglu_beta, s.swiglu_limit, s.local_expert_offset,
                     s.local_experts(), s.finalize, arch, max_tokens,
                     compiler::plan_override() + "|pdl=" +
                         (std::getenv("MOEJIT_PDL") ? std::getenv("MOEJIT_PDL") : ""));
}

std::string default_arch(const std::string& requested) {
  if (!requested.empty()) {
    compiler::check_arch(requested);
    return requested;
  }
  if (has_gpu()) return device_arch();
  return "sm_90a";
}

runtime::KernelRequest request_for(const compiler::KernelSource& src, const std::string& arch) {
  return {src.name, src.entry, src.source, arch, compiler::nvrtc_options(arch, false)};
}

runtime::KernelBinary compile_request(const runtime::KernelRequest& req) {
  compiler::CompileOutput out = compiler::nvrtc_compile(req.name, req.source, req.arch);
  return {std::move(out.binary), std::move(out.log), out.ms};
}

// Set while this thread runs a CompileOptions::progress callback (see get_layer).
thread_local bool in_progress_callback = false;

// Index in `sources` of the kernel whose code source i shares (i itself where it has its own).
size_t code_of(const std::vector<compiler::KernelSource>& sources, size_t i) {
  const int j = sources[i].same_as;
  if (j < 0) return i;
  if (static_cast<size_t>(j) >= i || sources[j].same_as >= 0)
    throw Error(ErrorKind::Internal, fmt::format("kernel {} shares the code of kernel {}, which is not an "
                                                 "earlier kernel of its own code", sources[i].name, j));
  return static_cast<size_t>(j);
}

// Compiles (or fetches) every distinct kernel source on `jobs` threads, in plan order; a kernel
// that shares another's code (KernelSource::same_as) gets that kernel's binary.
std::vector<std::shared_ptr<const runtime::KernelBinary>> build_all(
    const std::vector<compiler::KernelSource>& sources, const CompileOptions& opt,
    const std::string& arch) {
  std::vector<size_t> own;  // the kernels of their own code
  for (size_t i = 0; i < sources.size(); ++i)
    if (code_of(sources, i) == i) own.push_back(i);
  std::vector<std::shared_ptr<const runtime::KernelBinary>> bins(sources.size());
  std::vector<std::exception_ptr> errors(sources.size());
  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};  // a progress callback threw: no further kernel is taken
  int done = 0;  // (under progress_mu)
  std::mutex progress_mu;
  auto work = [&] {
    for (size_t n; !stop && (n = next++) < own.size();) {
      const size_t i = own[n];
      try {
        bins[i] = runtime::KernelCache::global().get(request_for(sources[i], arch), compile_request);
      } catch (...) {
        errors[i] = std::current_exception();
      }
      if (opt.progress) {  // (counted under the lock, so that the calls come in order)
        std::lock_guard<std::mutex> lock(progress_mu);
        if (stop) continue;  // (once it threw, the callback is not called again)
        const bool outer = in_progress_callback;  // (a callback may compile another layer)
        in_progress_callback = true;
        try {  // (the caller's exception fails the compile, like a kernel's)
          opt.progress(++done, static_cast<int>(own.size()), sources[i].name);
        } catch (...) {
          if (!errors[i]) errors[i] = std::current_exception();
          stop = true;
        }
        in_progress_callback = outer;
      }
    }
  };
  unsigned jobs = opt.jobs > 0 ? static_cast<unsigned>(opt.jobs)
                               : std::max(1u, std::thread::hardware_concurrency());
  jobs = std::min<unsigned>(jobs, static_cast<unsigned>(own.size()));
  std::vector<std::thread> pool;
  for (unsigned j = 1; j < jobs; ++j) {
    try {
      pool.emplace_back(work);
    } catch (const std::system_error&) {  // no more threads: the ones running do the rest
      break;
    }
  }
  work();
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  for (size_t i = 0; i < sources.size(); ++i) bins[i] = bins[code_of(sources, i)];
  return bins;
}

}  // namespace

class LayerImpl {
 public:
  struct Kernel {
    CUmodule module = nullptr;
    CUfunction fn = nullptr;
    int threads = 0;
    int dynamic_smem = 0;
    unsigned persistent_blocks = 0;  // grid of a persistent kernel: blocks that fit at once
    bool cooperative = false;        // one cooperative launch of `grid` blocks (resident layer)
    unsigned grid = 0;
  };

  static std::string arch_for(const CompileOptions& opt) {
    CUdevice dev;
    runtime::ensure_context(&dev);
    const std::string arch = opt.arch.empty() ? runtime::arch_of(dev) : opt.arch;
    compiler::check_arch(arch);
    return arch;
  }

  LayerImpl(const MoeSpec& spec, const CompileOptions& opt)
      : arch_(arch_for(opt)), plan_(compiler::make_plan(spec, opt.max_tokens, arch_)),
        max_tokens_(opt.max_tokens) {
    const runtime::Driver& d = runtime::driver();
    CUdevice dev;
    ctx_ = runtime::ensure_context(&dev);
    int sms = 0;
    MOEJIT_CU_CHECK(d.cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev));
    const auto sources = compiler::generate_all(plan_);
    const auto bins = build_all(sources, opt, arch_);
    kernels_.resize(sources.size());
    // (A constructor that throws runs no destructor: the modules loaded so far go here.)
    try {
      load_kernels(sources, bins, sms);
      assign_roles(sms, dev);
    } catch (...) {
      unload_modules();
      throw;
    }
    // PDL needs sm_90+ and cuLaunchKernelEx; MOEJIT_PDL=0 turns it off (A/B timing).
    const char* pdl_env = std::getenv("MOEJIT_PDL");
    pdl_ = d.cuLaunchKernelEx && std::stoi(arch_.substr(3)) >= 90 &&
           !(pdl_env && std::string(pdl_env) == "0");
  }

  // Each plan kernel's slot by role (the resident layer's only where it can run here).
  void assign_roles(int sms, CUdevice dev) {
    for (size_t i = 0; i < plan_.kernels.size(); ++i) {
      const auto& k = plan_.kernels[i];
      switch (k.role) {
        case KernelRole::Route: route_ = i; break;
        case KernelRole::Dispatch: dispatch_ = i; break;
        case KernelRole::RouteDispatch: route_dispatch_ = i; break;
        case KernelRole::Finalize: finalize_ = i; break;
        case KernelRole::Gemm1: gemm1_.resize(plan_.buckets.size()); gemm1_[k.bucket] = i; break;
        case KernelRole::Gemm2: gemm2_.resize(plan_.buckets.size()); gemm2_[k.bucket] = i; break;
        case KernelRole::Prepare: prepare_ = i; break;
        case KernelRole::Rows: rows_ = i; break;
        case KernelRole::Chain:
          chain_.resize(plan_.buckets.size(), kNone);
          chain_[k.bucket] = i;
          break;
        case KernelRole::Resident:
          // The resident layer needs all of its blocks at once: one per SM, through a
          // cooperative launch. On a device with fewer SMs than its grid, or without cooperative
          // launches, one token runs the bucket's pipeline instead.
          if (resident_usable(kernels_[i], sms, dev)) {
            resident_.resize(plan_.buckets.size(), kNone);
            resident_[k.bucket] = i;
          }
          break;
      }
    }
  }

  // Loads each distinct binary's module once (a kernel that shares another's code takes its
  // function) and sets each kernel's launch attributes.
  void load_kernels(const std::vector<compiler::KernelSource>& sources,
                    const std::vector<std::shared_ptr<const runtime::KernelBinary>>& bins, int sms) {
    const runtime::Driver& d = runtime::driver();
    for (size_t i = 0; i < sources.size(); ++i) {
      Kernel& k = kernels_[i];
      const size_t code = code_of(sources, i);
      if (code != i) {  // the same function, set up alike (compiler::same_launch)
        k = kernels_[code];
        k.module = nullptr;  // (unloaded once, as the other kernel's)
        continue;
      }
      MOEJIT_CU_CHECK(d.cuModuleLoadData(&k.module, bins[i]->cubin.data()));
      MOEJIT_CU_CHECK(d.cuModuleGetFunction(&k.fn, k.module, sources[i].entry.c_str()));
      k.threads = sources[i].threads;
      k.dynamic_smem = sources[i].dynamic_smem;
      k.cooperative = sources[i].cooperative;
      k.grid = static_cast<unsigned>(sources[i].grid);
      if (k.dynamic_smem > 0)
        MOEJIT_CU_CHECK(d.cuFuncSetAttribute(
            k.fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, k.dynamic_smem));
      if (sources[i].persistent) {
        int per_sm = 0;
        MOEJIT_CU_CHECK(d.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, k.fn, k.threads, static_cast<size_t>(k.dynamic_smem)));
        if (per_sm < 1)
          throw Error(ErrorKind::Internal,
                      fmt::format("kernel {} ({} threads, {} bytes of shared memory) cannot be "
                                  "resident on this device",
                                  sources[i].name, k.threads, k.dynamic_smem));
        k.persistent_blocks = static_cast<unsigned>(per_sm * sms);
      }
    }
  }

  void unload_modules() {
    const runtime::Driver* d = runtime::driver_or_null(nullptr);
    if (!d) return;
    for (auto& k : kernels_)
      if (k.module) d->cuModuleUnload(k.module);
  }

  static bool resident_usable(const Kernel& k, int sms, CUdevice dev) {
    const runtime::Driver& d = runtime::driver();
    int coop = 0, per_sm = 0;
    MOEJIT_CU_CHECK(d.cuDeviceGetAttribute(&coop, CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH, dev));
    MOEJIT_CU_CHECK(d.cuOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, k.fn, k.threads, static_cast<size_t>(k.dynamic_smem)));
    return coop != 0 && d.cuLaunchKernelEx != nullptr && per_sm >= 1 &&
           static_cast<long long>(per_sm) * sms >= k.grid;
  }

  // The chain kernel of the bucket of T tokens where one runs this launch (both GEMMs), else kNone.
  size_t chain_for(int T) const {
    if (T < 1) return kNone;
    const int bucket = plan_.bucket_for(T);
    if (static_cast<size_t>(bucket) >= chain_.size() || chain_[bucket] == kNone) return kNone;
    return plan_.buckets[bucket].chain_for(T, plan_.spec.top_k,
                                           plan_.spec.routing == RoutingMethod::Precomputed)
               ? chain_[bucket]
               : kNone;
  }

  // The resident kernel of the bucket of T tokens where one runs this launch, else kNone.
  size_t resident_for(int T, bool finalized) const {
    if (T != 1 || !finalized) return kNone;
    const int bucket = plan_.bucket_for(T);
    return static_cast<size_t>(bucket) < resident_.size() ? resident_[bucket] : kNone;
  }

  ~LayerImpl() { unload_modules(); }

  // Workspace carve-up for T tokens (offsets in bytes from the workspace start).
  struct Layout {
    int tile = 8;
    long long max_tiles = 0;
    long long rows = 0;  // max_tiles * tile
    size_t topk_ids = 0, topk_weights = 0, counts = 0, offsets = 0, tile_expert = 0, tile_rows = 0, e2p = 0,
           p2s = 0, act = 0, y = 0, counters = 0, routed = 0, x16 = 0, act_magic = 0, xp = 0, out = 0,
           total = 0;
    bool f16 = false;  // a chain with fp16 operands runs (StreamConfig::f16): x16 (and act_magic)
  };

  Layout layout(int T) const {
    check_tokens(T);
    Layout l;
    const MoeSpec& s = plan_.spec;
    const int L = s.local_experts();
    if (T > 0) l.tile = plan_.buckets[plan_.bucket_for(T)].tile_rows;
    l.max_tiles = Plan::max_tiles(T, s.top_k, L, l.tile);
    l.rows = l.max_tiles * l.tile;
    const size_t slots = static_cast<size_t>(T) * s.top_k;
    size_t at = 0;
    auto take = [&](size_t bytes) {
      const size_t off = at;
      at = align_up(at + bytes);
      return off;
    };
    l.topk_ids = take(slots * 4);
    l.topk_weights = take(slots * 4);
    l.counts = take(static_cast<size_t>(L) * 4);
    l.offsets = take(static_cast<size_t>(L + 1) * 4);
    l.tile_expert = take(static_cast<size_t>(l.max_tiles) * 4);
    l.tile_rows = take(static_cast<size_t>(l.max_tiles) * 4);
    l.e2p = take(slots * 4);
    l.p2s = take(static_cast<size_t>(l.rows) * 4);
    l.act = take(static_cast<size_t>(l.rows) * s.intermediate * 4);  // bf16 hi + lo planes
    l.y = take(static_cast<size_t>(l.rows) * s.hidden * 4);  // fp32 gemm2 rows
    // The fused finalize's per-token counters, or the stream GEMMs' unit counters (words 0 and
    // 32: one 128-byte line each) and, from word 64, their tiles' ready words (tile_ready), then
    // a chain's finished units per 64-feature slice of the output (StreamConfig::chain_finalize).
    l.counters = take(std::max<size_t>(static_cast<size_t>(T) * (s.hidden / 16),
                                       64 + static_cast<size_t>(l.max_tiles) + s.hidden / 64) * 4);
    // The fused route+dispatch block's word for gemm1's early first unit (its own line: dispatch
    // zeroes the counters after setting it); with more than 8 slots packed (Plan::routed_id_slots)
    // the next line holds packed ids too (moejit_params.h, kRoutedIdWord).
    l.routed = take(plan_.routed_id_slots > 8 ? 256 : 128);
    // A chain with fp16 operands: x as fp16 [T, H] and, where gemm2's are fp16 too, the
    // activation's dequantisation words [max_tiles, I / 8].
    if (chain_for(T) != kNone) {
      const compiler::Bucket& b = plan_.buckets[plan_.bucket_for(T)];
      l.f16 = b.c1.f16;
      if (b.c1.f16) l.x16 = take(static_cast<size_t>(T) * s.hidden * 2);
      if (b.c2.f16) l.act_magic = take(static_cast<size_t>(l.max_tiles) * (s.intermediate / 8) * 4);
    }
    // A padded H (padded_hidden): x [T, H'] and a finalized layer's output [T, H'] (an unfinalized
    // one's rows go to y).
    if (padded_hidden()) {
      l.xp = take(static_cast<size_t>(T) * s.hidden * 2);
      l.out = take(static_cast<size_t>(T) * s.hidden * 2);
    }
    l.total = at;
    return l;
  }

  void check_tokens(int T) const {
    if (T < 0) throw Error(ErrorKind::InvalidArgument, fmt::format("num_tokens = {} is negative", T));
    const long long slots = static_cast<long long>(T) * plan_.spec.top_k;
    if (slots > (1ll << 28))
      throw Error(ErrorKind::InvalidArgument,
                  fmt::format("num_tokens = {} is too large for one launch (num_tokens * top_k "
                              "= {} must be at most 2^28)", T, slots));
    const long long width = std::max(plan_.spec.hidden, plan_.spec.intermediate);
    if (slots * width > (1ll << 40))
      throw Error(ErrorKind::InvalidArgument,
                  fmt::format("num_tokens = {} is too large for one launch (num_tokens * top_k * "
                              "max(hidden, intermediate) = {} must be at most 2^40)",
                              T, slots * width));
    if (T <= 0) return;
    const compiler::Bucket& b = plan_.buckets[plan_.bucket_for(T)];
    // The older family's fused finalize counts its blocks per token and feature block in int32
    // words (GemmParams::token_counters).
    if (plan_.spec.finalize && b.fused_finalize &&
        static_cast<long long>(T) * feature_blocks(b) > std::numeric_limits<int32_t>::max())
      throw Error(ErrorKind::InvalidArgument,
                  fmt::format("num_tokens = {} is too large for one launch of this layer (its "
                              "fused finalize counts num_tokens * {} = {} blocks, at most 2^31 - 1)",
                              T, feature_blocks(b), static_cast<long long>(T) * feature_blocks(b)));
  }

  // The older family's gemm2 blocks along H (the grid's y).
  int feature_blocks(const compiler::Bucket& b) const {
    return plan_.spec.hidden / (16 * b.gemm2.warps_n);
  }

  struct Outs {
    int32_t* ids;       // [T*k] or null (workspace)
    void* y;            // [rows, H] fp32
    float* weights;     // [T*k]
    int32_t* e2p;       // [T*k]
    int32_t* offsets;   // [L+1]
    void* final_out;    // [T, H] or null
  };

  // Tiled weights that pad H (kernel_spec): the kernels run on rows of H' features.
  bool padded_hidden() const { return plan_.spec.hidden != plan_.layer_spec.hidden; }

  // RowsParams (moejit_params.h): `rows` rows of src_cols elements of `elem` bytes to rows of
  // dst_cols; with PDL where allowed (the kernel waits for its predecessor before it reads).
  void copy_rows(const void* src, void* dst, long long rows, int src_cols, int dst_cols, int elem,
                 Stream stream, bool allow_pdl) const {
    moejit_dev::RowsParams rp{static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), rows,
                              src_cols * elem, dst_cols * elem};
    const long long units = rows * (dst_cols * elem / 16);
    launch(rows_, static_cast<unsigned>(std::min<long long>((units + 255) / 256, 1 << 20)), 1, &rp,
           stream, allow_pdl);
  }

  void run(const MoeInputs& in_given, int T, const Workspace& ws, Stream stream, Outs outs) const {
    const MoeSpec& s = plan_.spec;
    check_inputs(in_given);
    const Layout l = layout(T);
    if (ws.bytes < l.total)
      throw Error(ErrorKind::InvalidArgument,
                  fmt::format("workspace.bytes = {} is smaller than workspace_bytes({}) = {}",
                              ws.bytes, T, l.total));
    if (!ws.ptr || reinterpret_cast<uintptr_t>(ws.ptr) % kAlign != 0)
      throw Error(ErrorKind::InvalidArgument,
                  "workspace.ptr must be a non-null device pointer aligned to 256 bytes");
    if (T == 0) {
      // No rows: an unfinalized layer's expert_offsets are all 0 (no kernel runs).
      if (outs.offsets)
        MOEJIT_CU_CHECK(runtime::driver().cuMemsetD32Async(
            reinterpret_cast<CUdeviceptr>(outs.offsets), 0, s.local_experts() + 1,
            reinterpret_cast<CUstream>(stream)));
      return;
    }
    char* base = static_cast<char*>(ws.ptr);
    auto at = [&](size_t off) { return base + off; };
    // A padded H: the kernels read x from rows of H' (copy_x, the padding zero) and write their
    // output rows of H' to the workspace, copied to the caller's rows of H after them. Like the
    // layer's first kernel, the copy of x runs without PDL (after all before it has completed),
    // and the first kernel (never PDL, launch()) after it, as kernels read what the kernels two
    // back wrote before their own waits. It is launched just before that kernel, once every
    // parameter block is complete.
    MoeInputs in = in_given;
    void* const caller_out = outs.final_out;
    void* const caller_y = outs.y;
    const int H = plan_.layer_spec.hidden;
    if (padded_hidden()) {
      in.hidden_states = at(l.xp);
      if (outs.final_out) outs.final_out = at(l.out);
      outs.y = nullptr;  // (the workspace's y)
    }
    auto copy_x = [&] {
      if (padded_hidden()) copy_rows(in_given.hidden_states, at(l.xp), T, H, s.hidden, 2, stream, false);
    };
    // (An unfinalized layer's rows y: all the capacity's, as their number is known on the GPU.)
    auto copy_out = [&](const void* y) {
      if (!padded_hidden()) return;
      if (caller_out) copy_rows(outs.final_out, caller_out, T, s.hidden, H, 2, stream, true);
      else copy_rows(y, caller_y, l.rows, s.hidden, H, 4, stream, true);
    };
    int32_t* topk_ids = outs.ids ? outs.ids : reinterpret_cast<int32_t*>(at(l.topk_ids));
    float* weights = outs.weights ? outs.weights : reinterpret_cast<float*>(at(l.topk_weights));
    int32_t* counts = reinterpret_cast<int32_t*>(at(l.counts));
    int32_t* offsets = outs.offsets ? outs.offsets : reinterpret_cast<int32_t*>(at(l.offsets));
    int32_t* tile_expert = reinterpret_cast<int32_t*>(at(l.tile_expert));
    int32_t* tile_rows = reinterpret_cast<int32_t*>(at(l.tile_rows));
    int32_t* e2p = outs.e2p ? outs.e2p : reinterpret_cast<int32_t*>(at(l.e2p));
    int32_t* p2s = reinterpret_cast<int32_t*>(at(l.p2s));
    void* act = at(l.act);
    void* act_lo = static_cast<char*>(act) + static_cast<size_t>(l.rows) * s.intermediate * 2;
    void* y = outs.y ? outs.y : at(l.y);
    const int bucket = plan_.bucket_for(T);
    const compiler::Bucket& b = plan_.buckets[bucket];

    moejit_dev::RouteParams rp{in.routing_logits, in.routing_bias, in.topk_ids, in.topk_weights,
                               topk_ids, weights, T};
    if (const size_t rk = resident_for(T, outs.final_out != nullptr); rk != kNone) {
      moejit_dev::ResidentParams r{rp, in.hidden_states, in.w13_scale, in.w2_scale,
                                   in.swiglu_alpha, in.swiglu_beta, in.swiglu_limit, act,
                                   outs.final_out, {}, {}, {}, {}};
      r.tma_w1 = weight_map(in.w13, true, 8, b.res.k_part1);
      // w2: a slot's 8 * units2 rows in one box, of a row-major 3-D map (the rows may straddle
      // blocks of the 4-D one) or, tiled, of the 4-D map (moejit_resident.cuh keeps them in one).
      r.tma_w2 = weight_map(in.w2, false, 8 * b.res.units2, s.intermediate, /*flat=*/!tiled());
      if (tiled()) {  // (row-major scales are read by plain bulk copies)
        r.tma_s1 = scale_map(in.w13_scale, true, 8);
        r.tma_s2 = scale_map(in.w2_scale, false, 8 * b.res.units2);
      }
      copy_x();
      launch(rk, kernels_[rk].grid, 1, &r, stream);
      copy_out(nullptr);  // (finalized)
      return;
    }
    // Decode buckets of finalized layers fuse the finalize into gemm2.
    const bool fused = b.fused_finalize && outs.final_out;
    int32_t* counters = reinterpret_cast<int32_t*>(at(l.counters));
    int32_t* routed = reinterpret_cast<int32_t*>(at(l.routed));
    const int feature_blocks = this->feature_blocks(b);
    const bool tile_ready = b.s1.tile_ready;  // (the planner sets it on stream buckets only)
    int32_t* ready = tile_ready ? counters + 64 : nullptr;
    // Both GEMMs as one chain kernel (64-row units, its own stage depths), or the two kernels;
    // a chain of a finalized launch may finalize in its blocks (counts per 64-feature slice).
    const size_t chain = chain_for(T);
    const bool chain_final = chain != kNone && b.c2.chain_finalize && outs.final_out;
    // (Its slice words follow the tile-ready words, H / 64 of them: 64-row units.)
    if (chain_final && (!b.s1.tile_ready || b.c2.unit_rows != 64))
      throw Error(ErrorKind::Internal, "the chain's finalize needs tile_ready and 64-row gemm2 units");
    // The stream GEMMs' weights with the L2 evict-first policy, where their kernels carry it.
    const bool evict_first = b.stream && compiler::evict_first_for(plan_, T);
    moejit_dev::DispatchParams dp{topk_ids, counts, offsets, tile_expert, e2p, p2s, T,
                                  l.tile, static_cast<int32_t>(l.max_tiles),
                                  fused || b.stream ? counters : nullptr,
                                  fused ? T * feature_blocks
                                        : b.stream ? 64 + (tile_ready ? static_cast<int>(l.max_tiles) : 0) +
                                                         (chain_final ? s.hidden / 64 : 0)
                                                   : 0,
                                  fused ? outs.final_out : nullptr, s.hidden, tile_rows};
    moejit_dev::GemmParams g1{in.hidden_states, act_lo, p2s, in.w13, in.w13_scale, counts, offsets,
                              tile_expert, in.swiglu_alpha, in.swiglu_beta, in.swiglu_limit,
                              act, T, static_cast<int32_t>(l.max_tiles), nullptr, nullptr,
                              nullptr, nullptr, 0, {}, {}, {}, tile_rows, counters, nullptr, ready, 0, nullptr, nullptr, 0};
    const compiler::StreamConfig& c1 = chain != kNone ? b.c1 : b.s1;
    const compiler::StreamConfig& c2 = chain != kNone ? b.c2 : b.s2;
    // Group columns (StreamConfig::group_cols), but not at one token outside a chain: there the
    // finalized layer may be the resident one, whose output the unfinalized layer plus
    // moejit::finalize must equal bitwise.
    const bool group_cols = chain != kNone || T > 1;
    // Stream GEMMs: smaller units where the default ones would leave blocks idle.
    if (b.stream) {
      g1.unit_rows = chain != kNone ? c1.unit_rows
                                    : compiler::choose_unit_rows(b.s1, s, true, T,
                                                                 kernels_[gemm1_[bucket]].persistent_blocks);
      if (c1.tma) encode_stream_tma(g1, c1, true);
      g1.group_cols = group_cols && c1.group_cols > 0 ? 1 : 0;
      g1.evict_first = c1.evict_first && evict_first;
      // Early first units read the routed ids of the route kernel two launches back, or those
      // of the fused route+dispatch block once its word reads 1.
      if (b.s1.early_unit) g1.topk_ids = topk_ids;
      if (b.s1.early_unit && b.fused_route) g1.routed = routed;
    }
    if (l.f16) {  // (the planner's conditions for StreamConfig::f16)
      if (!g1.routed || !b.fused_route || T > 4)
        throw Error(ErrorKind::Internal, "a chain with fp16 operands needs the fused block's word and at most 4 tokens");
      g1.x = at(l.x16);
      if (b.c2.f16) g1.act_magic = reinterpret_cast<uint32_t*>(at(l.act_magic));
    }
    moejit_dev::GemmParams g2{act, act_lo, p2s, in.w2, in.w2_scale, counts, offsets, tile_expert,
                              nullptr, nullptr, nullptr, y, T, static_cast<int32_t>(l.max_tiles),
                              fused ? counters : nullptr, e2p, weights,
                              fused ? outs.final_out : nullptr, 0, {}, {}, {}, tile_rows, counters + 32, nullptr,
                              ready, 0, nullptr, g1.act_magic, 0};
    if (chain_final) {
      g2.token_counters = counters + 64 + l.max_tiles;
      g2.final_out = outs.final_out;
    }
    if (b.stream) {
      g2.unit_rows = chain != kNone ? c2.unit_rows
                                    : compiler::choose_unit_rows(b.s2, s, false, T,
                                                                 kernels_[gemm2_[bucket]].persistent_blocks);
      if (c2.tma) encode_stream_tma(g2, c2, false);
      g2.group_cols = group_cols && c2.group_cols > 0 ? 1 : 0;
      g2.evict_first = c2.evict_first && evict_first;
    }
    // Every parameter block is complete (the TMA descriptors can fail to encode) before the
    // first launch, so that an error never leaves part of a layer on the stream.
    if (b.fused_route) {
      // With gemm1's early first units, the block zeroes gemm1's unit counter (word 0) itself,
      // before gemm1 launches; dispatch zeroes the rest.
      moejit_dev::RouteDispatchParams rdp{rp, dp, nullptr, nullptr, nullptr, nullptr};
      if (g1.routed) {
        rdp.routed = routed;
        rdp.gemm1_counter = g1.unit_counter;
        rdp.dispatch.token_counters += 32;
        rdp.dispatch.num_counters -= 32;
      }
      if (l.f16) {  // the second block converts x (moejit_route_dispatch.cuh, convert_x_block)
        rdp.x = in.hidden_states;
        rdp.x16 = at(l.x16);
      }
      copy_x();
      launch(route_dispatch_, l.f16 ? 2 : 1, 1, &rdp, stream);
    } else {
      copy_x();
      launch(route_, (T + compiler::kRouteWarpsPerBlock - 1) / compiler::kRouteWarpsPerBlock, 1,
             &rp, stream);
      launch(dispatch_, 1, 1, &dp, stream);
    }
    if (chain != kNone) {
      moejit_dev::ChainParams cp{g1, g2};
      launch(chain, kernels_[chain].persistent_blocks, 1, &cp, stream);
    } else {
      launch_gemm(gemm1_[bucket], static_cast<unsigned>(l.max_tiles),
                  s.intermediate / (16 * b.gemm1.warps_n), &g1, stream);
      launch_gemm(gemm2_[bucket], static_cast<unsigned>(l.max_tiles), feature_blocks, &g2, stream);
    }
    if (outs.final_out && !fused && !chain_final)
      run_finalize(y, weights, e2p, outs.final_out, T, stream, /*after_gemm2=*/true);
    copy_out(y);
  }

  // The TMA descriptors of a stream GEMM launch (GemmParams::tma_w / tma_s / tma_x) for its unit
  // size: the weights as {128 bytes, row, K / 256 chunks} with boxes of {128, R, k_stage / 256}
  // (R = rows / 2 for gemm1, whose gate and up rows lie apart, else rows; one stage, 128-byte
  // swizzle: the layout the consumers' ldmatrix reads), the scales as {K / 16 bytes, row} with
  // boxes of {k_stage / 16, R}. Rows are indexed by global expert id, as the kernel's row
  // arithmetic does. Gemm2 also reads its activation (both planes) by TMA: {32 elements, row,
  // I / 32 groups, plane} with boxes of {32, 4, k_stage / 32, 2}: four rows of a tile, both
  // planes, one stage, as [plane][group][row][64 bytes] (no swizzle: the consumers' 16-byte loads
  // of two rows of one group are 128 contiguous bytes).
  void encode_stream_tma(moejit_dev::GemmParams& g, const compiler::StreamConfig& c,
                         bool gemm1) const {
    const int rows = g.unit_rows == 16 || g.unit_rows == 32 || g.unit_rows == 64 ? g.unit_rows
                                                                                : c.unit_rows;
    const int kc = c.k_stage_for(rows);
    // The maps depend only on the two base pointers and the box (the rest is the layer's spec):
    // encoded once per combination and kept, so that a launch with weights it has seen does no
    // encoding on the host. Bounded (a model's layers share one LayerImpl per spec, up to four
    // entries each): past the bound the cache starts over.
    // Gemm2's activation map depends on the workspace (x) and on the token count's row capacity
    // (x_lo - x): part of the key as well.
    const bool x_map = !gemm1 && c.x_boxes;
    const TmaKey key{g.w, g.w_scale, x_map ? g.x : nullptr, x_map ? g.x_lo : nullptr, rows, kc, gemm1};
    {
      std::lock_guard<std::mutex> lock(tma_mu_);
      if (auto it = tma_cache_.find(key); it != tma_cache_.end()) {
        g.tma_w = it->second[0];
        g.tma_s = it->second[1];
        g.tma_x = it->second[2];
        return;
      }
    }
    const auto [K, total_rows, B] = weight_shape(gemm1);
    const cuuint32_t box_rows = static_cast<cuuint32_t>(gemm1 ? rows / 2 : rows);
    encode_weights(g.tma_w, g.w, gemm1, box_rows, kc);
    if (tiled()) {
      encode_tiled_scales(g.tma_s, g.w_scale, gemm1, box_rows, kc);
    } else {
      const cuuint64_t s_dims[2] = {K / 16, total_rows};
      const cuuint64_t s_strides[1] = {K / 16};
      const cuuint32_t s_box[2] = {static_cast<cuuint32_t>(kc / 16), box_rows};
      encode_tiled(g.tma_s, g.w_scale, 2, s_dims, s_strides, s_box, CU_TENSOR_MAP_SWIZZLE_NONE,
                   gemm1 ? "w13_scale" : "w2_scale");
    }
    if (x_map) {
      // The planes lie (x_lo - x) bytes apart: the row capacity of this token count's layout.
      const cuuint64_t row_bytes = K * 2;
      const cuuint64_t plane_bytes = static_cast<cuuint64_t>(static_cast<const char*>(g.x_lo) -
                                                             static_cast<const char*>(g.x));
      constexpr cuuint32_t kGroup = moejit_dev::kXBoxGroup;
      const cuuint64_t x_dims[4] = {kGroup, plane_bytes / row_bytes, K / kGroup, 2};
      const cuuint64_t x_strides[3] = {row_bytes, kGroup * 2, plane_bytes};
      const cuuint32_t x_box[4] = {kGroup, moejit_dev::kXBoxRows, static_cast<cuuint32_t>(kc) / kGroup, 2};
      encode_tiled(g.tma_x, g.x, 4, x_dims, x_strides, x_box, CU_TENSOR_MAP_SWIZZLE_NONE, "act",
             CU_TENSOR_MAP_DATA_TYPE_BFLOAT16);
    }
    std::lock_guard<std::mutex> lock(tma_mu_);
    if (tma_cache_.size() >= kTmaCacheEntries) tma_cache_.clear();
    tma_cache_.emplace(key, std::array<moejit_dev::TmaDesc, 3>{g.tma_w, g.tma_s, g.tma_x});
  }

  // Encodes a tensor map (cuTensorMapEncodeTiled; no interleave, L2 promotion of 256 bytes).
  static void encode_tiled(moejit_dev::TmaDesc& out, const void* base, cuuint32_t rank,
                           const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                           CUtensorMapSwizzle swizzle, const char* what,
                           CUtensorMapDataType type = CU_TENSOR_MAP_DATA_TYPE_UINT8) {
    const runtime::Driver& d = runtime::driver();
    if (!d.cuTensorMapEncodeTiled)
      throw Error(ErrorKind::Cuda, "the CUDA driver has no cuTensorMapEncodeTiled (the plan's "
                                   "kernels copy weights by TMA; MOEJIT_PLAN_OVERRIDE tma=0,res=0 "
                                   "selects cp.async copies)");
    const cuuint32_t ones[4] = {1, 1, 1, 1};
    CUtensorMap m;
    const CUresult r = d.cuTensorMapEncodeTiled(
        &m, type, rank, const_cast<void*>(base), dims, strides, box, ones,
        CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS)
      throw Error(ErrorKind::InvalidArgument,
                  fmt::format("cuTensorMapEncodeTiled failed for {} (CUresult {})", what,
                              static_cast<int>(r)));
    static_assert(sizeof(CUtensorMap) == sizeof(moejit_dev::TmaDesc), "TMA descriptor size");
    std::memcpy(&out, &m, sizeof m);
  }

  bool tiled() const { return plan_.spec.weight_format == WeightFormat::MxInt4G32Tiled; }

  // A GEMM's weight tensor (w13, or w2) as its maps see it: K, rows up to the last local
  // expert (rows are indexed by global expert id), and the rows per block of the tiled layout.
  struct WeightShape {
    cuuint64_t K, rows, block;
  };
  WeightShape weight_shape(bool gemm1) const {
    const MoeSpec& s = plan_.spec;
    return {static_cast<cuuint64_t>(gemm1 ? s.hidden : s.intermediate),
            static_cast<cuuint64_t>(s.local_expert_offset + s.local_experts()) *
                static_cast<cuuint64_t>(gemm1 ? 2 * s.intermediate : s.hidden),
            static_cast<cuuint64_t>(gemm1 ? moejit_dev::kTiledRowsW13 : moejit_dev::kTiledRowsW2)};
  }

  // The weights of a GEMM (w13, or w2) as {128 bytes, row in block, K / 256 chunks, block}
  // (blocks of kTiledRowsW13 / kTiledRowsW2 rows, moejit_params.h) with boxes of {128, box_rows,
  // box_k / 256, 1}, landing as [chunk][row][128 bytes] with the 128-byte swizzle: the layout
  // the consumers' ldmatrix reads. Row-major weights get the swizzle from the map; tiled ones
  // (WeightFormat::MxInt4G32Tiled) hold it already and are copied as they are. flat: a 3-D map
  // {128 bytes, row, K / 256 chunks} of row-major weights instead, for boxes that straddle
  // blocks. Rows are indexed by global expert id.
  void encode_weights(moejit_dev::TmaDesc& out, const void* w, bool gemm1, unsigned box_rows,
                      int box_k, bool flat = false) const {
    const auto [K, total_rows, B] = weight_shape(gemm1);
    const char* what = gemm1 ? "w13" : "w2";
    const cuuint32_t chunks = static_cast<cuuint32_t>(box_k / 256);
    if (flat) {
      const cuuint64_t dims[3] = {128, total_rows, K / 256};
      const cuuint64_t strides[2] = {K / 2, 128};
      const cuuint32_t box[3] = {128, box_rows, chunks};
      encode_tiled(out, w, 3, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B, what);
      return;
    }
    const cuuint64_t dims[4] = {128, B, K / 256, total_rows / B};
    const cuuint64_t row_major[3] = {K / 2, 128, B * K / 2};
    const cuuint64_t tiled_strides[3] = {128, B * 128, B * K / 2};
    const cuuint32_t box[4] = {128, box_rows, chunks, 1};
    encode_tiled(out, w, 4, dims, tiled() ? tiled_strides : row_major, box,
                 tiled() ? CU_TENSOR_MAP_SWIZZLE_NONE : CU_TENSOR_MAP_SWIZZLE_128B, what);
  }

  // Tiled scales (WeightFormat::MxInt4G32Tiled): a block's rows of one chunk are contiguous
  // (16 bytes each), so the map is {8-byte words of a chunk's block rows, K / 256 chunks, block}
  // with boxes of {2 box_rows, box_k / 256, 1} (a box row is the box's rows of one chunk: one
  // run of 16 box_rows bytes), landing as [chunk][row][16 bytes]. Coordinates: (2 (row % B),
  // chunk, row / B).
  void encode_tiled_scales(moejit_dev::TmaDesc& out, const void* scales, bool gemm1,
                           unsigned box_rows, int box_k) const {
    const auto [K, total_rows, B] = weight_shape(gemm1);
    const cuuint64_t dims[3] = {2 * B, K / 256, total_rows / B};
    const cuuint64_t strides[2] = {B * 16, B * K / 16};
    const cuuint32_t box[3] = {2 * box_rows, static_cast<cuuint32_t>(box_k / 256), 1};
    encode_tiled(out, scales, 3, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_NONE,
                 gemm1 ? "w13_scale" : "w2_scale", CU_TENSOR_MAP_DATA_TYPE_UINT64);
  }

  // The resident layer's map of tiled scales: encode_tiled_scales' map with boxes of box_rows
  // rows and all of K, landing as [chunk][row][16 bytes] (moejit_resident.cuh Layout::s_at).
  // Kept like weight_map's maps (keyed with a null weight pointer).
  moejit_dev::TmaDesc scale_map(const void* scales, bool gemm1, int box_rows) const {
    return cached_map({nullptr, scales, nullptr, nullptr, box_rows, 0, gemm1}, [&](moejit_dev::TmaDesc& m) {
      encode_tiled_scales(m, scales, gemm1, static_cast<unsigned>(box_rows),
                          static_cast<int>(weight_shape(gemm1).K));
    });
  }

  // The resident layer's weight map of w (encode_weights), kept per pointer and box like the
  // stream GEMMs' maps (scale and activation pointers null in the key; a flat map keyed by
  // -box_rows, apart from a 4-D map of the same box).
  moejit_dev::TmaDesc weight_map(const void* w, bool gemm1, int box_rows, int box_k,
                                 bool flat = false) const {
    return cached_map({w, nullptr, nullptr, nullptr, flat ? -box_rows : box_rows, box_k, gemm1},
                      [&](moejit_dev::TmaDesc& m) {
                        encode_weights(m, w, gemm1, static_cast<unsigned>(box_rows), box_k, flat);
                      });
  }

  // after_gemm2: launched right behind this layer's gemm2, with PDL (the kernel reads the row
  // map and routing weights before its wait, which the layer's kernel order makes safe). From
  // moejit::finalize the predecessor is arbitrary work, so the launch is a plain one: the
  // kernel then starts only after that work has completed.
  void run_finalize(const void* y, const float* weights, const int32_t* e2p, void* out, int T,
                    Stream stream, bool after_gemm2) const {
    if (T == 0) return;
    // moejit::finalize reads and writes rows of the layer's H, the layer's own finalize its
    // kernels' (padded) rows.
    const bool layer_rows = !after_gemm2 && padded_hidden();
    moejit_dev::FinalizeParams fp{y, weights, e2p, out, T, layer_rows ? 1 : 0};
    const int threads = compiler::finalize_threads_for(plan_, T);
    const int per_block = threads * 8;
    const int H = layer_rows ? plan_.layer_spec.hidden : plan_.spec.hidden;
    launch(finalize_, static_cast<unsigned>(T), (H + per_block - 1) / per_block, &fp, stream,
           after_gemm2, threads);
  }

  // Layer::prepare_weights: the local experts' w13, w13_scale, w2, w2_scale, one kernel each.
  // Padded sizes (plan_.spec's H' and I' against the layer's H and I, moejit.h) make each
  // expert's w13 2 I' rows (I of gate, zeros, I of up, zeros) of H' / 2 bytes and w2 H' rows (H,
  // zeros) of I' / 2 bytes, each row's bytes past the source's zero.
  void prepare_weights(const MoeInputs& in, const TiledWeights& out, Stream stream) const {
    const MoeSpec& s = plan_.spec;
    if (!tiled())
      throw Error(ErrorKind::InvalidArgument,
                  fmt::format("prepare_weights: weight_format = {} reads the weights as they are; "
                              "prepare_weights writes MxInt4G32Tiled",
                              to_string(s.weight_format)));
    const long long first = s.local_expert_offset, local = s.local_experts();
    const long long H = plan_.layer_spec.hidden, HP = s.hidden, I = plan_.layer_spec.intermediate,
                    IP = s.intermediate;
    struct Tensor {
      const char* name;
      const void* src;
      void* dst;
      long long rows;  // per expert, of the output
      long long row_bytes, src_row_bytes;
      int block, chunk_units;
      bool pair_order;  // nibbles of each word in pair order (moejit.h)
      int seg_rows, src_seg_rows;  // (PrepareParams; rows is a multiple of seg_rows)
      long long src_bytes() const { return rows / seg_rows * src_seg_rows * src_row_bytes; }  // per expert
      long long dst_bytes() const { return rows * row_bytes; }
    };
    const int i_rows = static_cast<int>(IP), i_src = static_cast<int>(I);
    const int h_rows = static_cast<int>(HP), h_src = static_cast<int>(H);
    const Tensor tensors[4] = {
        {"w13", in.w13, out.w13, 2 * IP, HP / 2, H / 2, moejit_dev::kTiledRowsW13, 8, true, i_rows,
         i_src},
        {"w13_scale", in.w13_scale, out.w13_scale, 2 * IP, HP / 16, H / 16, moejit_dev::kTiledRowsW13,
         1, false, i_rows, i_src},
        {"w2", in.w2, out.w2, HP, IP / 2, I / 2, moejit_dev::kTiledRowsW2, 8, false, h_rows, h_src},
        {"w2_scale", in.w2_scale, out.w2_scale, HP, IP / 16, I / 16, moejit_dev::kTiledRowsW2, 1,
         false, h_rows, h_src}};
    for (const Tensor& t : tensors) {
      if (!t.src || !t.dst)
        throw Error(ErrorKind::InvalidArgument,
                    fmt::format("prepare_weights: {} or its output is null", t.name));
      if (reinterpret_cast<uintptr_t>(t.src) % 16 != 0 || reinterpret_cast<uintptr_t>(t.dst) % 16 != 0)
        throw Error(ErrorKind::InvalidArgument,
                    fmt::format("prepare_weights: {} or its output is not 16-byte aligned", t.name));
    }
    // The local experts' bytes of a tensor's input or output.
    auto src_range = [&](const Tensor& t) {
      const uint8_t* p = static_cast<const uint8_t*>(t.src) + first * t.src_bytes();
      return std::pair{p, p + local * t.src_bytes()};
    };
    auto dst_range = [&](const Tensor& t) {
      uint8_t* p = static_cast<uint8_t*>(t.dst) + first * t.dst_bytes();
      return std::pair{p, p + local * t.dst_bytes()};
    };
    for (const Tensor& t : tensors) {
      const auto [dst, dst_end] = dst_range(t);
      for (const Tensor& o : tensors) {  // no output may overlap any input or another output
        const auto [osrc, osrc_end] = src_range(o);
        const auto [odst, odst_end] = dst_range(o);
        if (osrc < dst_end && dst < osrc_end)
          throw Error(ErrorKind::InvalidArgument,
                      fmt::format("prepare_weights: the output for {} overlaps the input {} (the "
                                  "rewrite is not in place)",
                                  t.name, o.name));
        if (&o != &t && odst < dst_end && dst < odst_end)
          throw Error(ErrorKind::InvalidArgument,
                      fmt::format("prepare_weights: the outputs for {} and {} overlap", t.name, o.name));
      }
      moejit_dev::PrepareParams pp{src_range(t).first, dst, local * t.rows,
                                   static_cast<int32_t>(t.row_bytes), t.block, t.chunk_units,
                                   t.pair_order ? 1 : 0, t.seg_rows, t.src_seg_rows,
                                   static_cast<int32_t>(t.src_row_bytes)};
      const long long blocks = std::min<long long>((local * t.dst_bytes() / 16 + 255) / 256, 1 << 20);
      launch(prepare_, static_cast<unsigned>(blocks), 1, &pp, stream, /*allow_pdl=*/false);
    }
  }

  int launches(int T) const {
    if (T == 0) return 0;
    const int rows = padded_hidden() ? 2 : 0;  // x's copy and the output's
    if (resident_for(T, plan_.spec.finalize) != kNone) return 1 + rows;
    const compiler::Bucket& b = plan_.buckets[plan_.bucket_for(T)];
    const bool chain = chain_for(T) != kNone;
    return rows + (b.fused_route ? 1 : 2) + (chain ? 1 : 2) +
           (plan_.spec.finalize && !b.fused_finalize && !(chain && b.c2.chain_finalize) ? 1 : 0);
  }

  const Plan& plan() const { return plan_; }
  const std::string& arch() const { return arch_; }
  int max_tokens() const { return max_tokens_; }

 private:
  // Every kernel but the first of a layer is launched with programmatic stream serialization
  // on sm_90+ (when the driver has cuLaunchKernelEx), so it is scheduled while its predecessor
  // drains; the templates' pdl_wait() keeps the data dependency.
  // A GEMM over row tiles: a persistent kernel gets the grid that fits on the device (it walks
  // the tiles itself), the others (tiles, feature blocks).
  void launch_gemm(size_t k, unsigned tiles, unsigned feature_blocks, moejit_dev::GemmParams* p,
                   Stream stream) const {
    if (kernels_[k].persistent_blocks > 0) launch(k, kernels_[k].persistent_blocks, 1, p, stream);
    else launch(k, tiles, feature_blocks, p, stream);
  }

  template <class P>
  void launch(size_t k, unsigned gx, unsigned gy, P* params, Stream stream,
              bool allow_pdl = true, int threads = 0) const {
    void* args[] = {params};
    const unsigned block = static_cast<unsigned>(threads > 0 ? threads : kernels_[k].threads);
    const unsigned smem = static_cast<unsigned>(kernels_[k].dynamic_smem);
    const runtime::Driver& d = runtime::driver();
    // With one launch attribute: cooperative for the resident layer (the layer's only kernel, so
    // no PDL; every block must be resident at once for its grid-wide barrier, which a
    // cooperative launch guarantees or refuses), programmatic stream serialization (PDL) for
    // every other kernel but the layer's first.
    CUlaunchAttribute attr{};
    if (kernels_[k].cooperative) {
      attr.id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
      attr.value.cooperative = 1;
    } else if (pdl_ && allow_pdl && k != route_ && k != route_dispatch_) {
      attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
      attr.value.programmaticStreamSerializationAllowed = 1;
    }
    if (attr.id != CU_LAUNCH_ATTRIBUTE_IGNORE) {
      CUlaunchConfig cfg{};
      cfg.gridDimX = gx;
      cfg.gridDimY = gy;
      cfg.gridDimZ = 1;
      cfg.blockDimX = block;
      cfg.blockDimY = 1;
      cfg.blockDimZ = 1;
      cfg.sharedMemBytes = smem;
      cfg.hStream = reinterpret_cast<CUstream>(stream);
      cfg.attrs = &attr;
      cfg.numAttrs = 1;
      MOEJIT_CU_CHECK(d.cuLaunchKernelEx(&cfg, kernels_[k].fn, args, nullptr));
      return;
    }
    MOEJIT_CU_CHECK(d.cuLaunchKernel(kernels_[k].fn, gx, gy, 1, block, 1, 1, smem,
                                     reinterpret_cast<CUstream>(stream), args, nullptr));
  }

  void check_inputs(const MoeInputs& in) const {
    const MoeSpec& s = plan_.spec;
    auto need = [](const void* p, bool required, const char* name, const char* why) {
      if (required && !p)
        throw Error(ErrorKind::InvalidArgument, fmt::format("inputs.{} is null but {}", name, why));
      if (!required && p)
        throw Error(ErrorKind::InvalidArgument,
                    fmt::format("inputs.{} is set but {}", name, why));
    };
    auto aligned = [](const void* p, const char* name) {
      require_aligned16(p, "inputs.", name, true);
    };
    const bool pre = s.routing == RoutingMethod::Precomputed;
    need(in.hidden_states, true, "hidden_states", "it is always required");
    need(in.w13, true, "w13", "it is always required");
    need(in.w13_scale, true, "w13_scale", "it is always required");
    need(in.w2, true, "w2", "it is always required");
    need(in.w2_scale, true, "w2_scale", "it is always required");
    if (pre) {
      need(in.topk_ids, true, "topk_ids", "routing = Precomputed needs it");
      need(in.topk_weights, true, "topk_weights", "routing = Precomputed needs it");
    } else {
      need(in.routing_logits, true, "routing_logits", "the routing method reads it");
      need(in.topk_ids, false, "topk_ids", "only routing = Precomputed reads it");
      need(in.topk_weights, false, "topk_weights", "only routing = Precomputed reads it");
    }
    need(in.routing_bias, s.has_routing_bias, "routing_bias",
         s.has_routing_bias ? "spec.has_routing_bias = true" : "spec.has_routing_bias = false");
    need(in.swiglu_alpha, s.swiglu_alpha, "swiglu_alpha", "it must match spec.swiglu_alpha");
    need(in.swiglu_beta, s.swiglu_beta, "swiglu_beta", "it must match spec.swiglu_beta");
    need(in.swiglu_limit, s.swiglu_limit, "swiglu_limit", "it must match spec.swiglu_limit");
    aligned(in.hidden_states, "hidden_states");
    aligned(in.w13, "w13");
    aligned(in.w2, "w2");
    aligned(in.w13_scale, "w13_scale");
    aligned(in.w2_scale, "w2_scale");
  }

  std::string arch_;  // before plan_: the plan depends on it
  Plan plan_;
  int max_tokens_ = 0;
  CUcontext ctx_ = nullptr;
  std::vector<Kernel> kernels_;
  bool pdl_ = false;
  static constexpr size_t kNone = static_cast<size_t>(-1);
  size_t route_ = kNone, dispatch_ = kNone, route_dispatch_ = kNone, finalize_ = kNone,
         prepare_ = kNone, rows_ = kNone;
  std::vector<size_t> gemm1_, gemm2_, chain_;
  std::vector<size_t> resident_;  // per bucket, kNone where it has none or this device cannot run it
  // Encoded TMA descriptors of stream GEMM launches (encode_stream_tma), by weight and scale
  // pointers, gemm2's activation planes, box (unit rows, stage depth) and GEMM.
  struct TmaKey {
    const void* w;
    const void* s;
    const void* x;
    const void* x_lo;
    int rows, k_stage;
    bool gemm1;
    bool operator<(const TmaKey& o) const {
      return std::tie(w, s, x, x_lo, rows, k_stage, gemm1) <
             std::tie(o.w, o.s, o.x, o.x_lo, o.rows, o.k_stage, o.gemm1);
    }
  };
  static constexpr size_t kTmaCacheEntries = 4096;  // ~1.8 MB
  mutable std::mutex tma_mu_;
  mutable std::map<TmaKey, std::array<moejit_dev::TmaDesc, 3>> tma_cache_;

  // One map kept in tma_cache_ under `key`, encoded by encode(desc) the first time.
  template <class Encode>
  moejit_dev::TmaDesc cached_map(const TmaKey& key, Encode&& encode) const {
    {
      std::lock_guard<std::mutex> lock(tma_mu_);
      if (auto it = tma_cache_.find(key); it != tma_cache_.end()) return it->second[0];
    }
    moejit_dev::TmaDesc m;
    encode(m);
    std::lock_guard<std::mutex> lock(tma_mu_);
    if (tma_cache_.size() >= kTmaCacheEntries) tma_cache_.clear();
    tma_cache_.emplace(key, std::array<moejit_dev::TmaDesc, 3>{m, {}, {}});
    return m;
  }
};

// ---- Layer -----------------------------------------------------------------------------------

const MoeSpec& Layer::spec() const { return impl_->plan().layer_spec; }
const std::string& Layer::arch() const { return impl_->arch(); }
size_t Layer::workspace_bytes(int num_tokens) const { return impl_->layout(num_tokens).total; }
int Layer::launches_per_call(int num_tokens) const { return impl_->launches(num_tokens); }
void Layer::prepare_weights(const MoeInputs& in, const TiledWeights& out, Stream stream) const {
  impl_->prepare_weights(in, out, stream);
}
int Layer::max_tokens() const { return impl_->max_tokens(); }
int Layer::tile_rows(int num_tokens) const { return impl_->layout(num_tokens).tile; }

size_t UnfinalizedLayer::unfinalized_rows(int num_tokens) const {
  return static_cast<size_t>(impl_->layout(num_tokens).rows);
}

void FinalizedLayer::launch(const MoeInputs& in, int num_tokens, const FinalizedOutput& out,
                            Workspace ws, Stream stream) const {
  if (!out.output && num_tokens > 0)
    throw Error(ErrorKind::InvalidArgument, "output.output is null");
  require_aligned16(out.output, "output.", "output");
  impl_->run(in, num_tokens, ws, stream,
             {out.topk_ids, nullptr, out.topk_weights, nullptr, nullptr, out.output});
}

void UnfinalizedLayer::launch(const MoeInputs& in, int num_tokens, const UnfinalizedOutput& out,
                              Workspace ws, Stream stream) const {
  if (num_tokens > 0 && (!out.gemm2_out || !out.expert_weights || !out.expanded_to_permuted))
    throw Error(ErrorKind::InvalidArgument,
                "UnfinalizedOutput needs gemm2_out, expert_weights and expanded_to_permuted");
  require_aligned16(out.gemm2_out, "", "gemm2_out");  // (rows written by 16-byte stores)
  impl_->run(in, num_tokens, ws, stream,
             {out.topk_ids, out.gemm2_out, out.expert_weights, out.expanded_to_permuted,
              out.expert_offsets, nullptr});
}

void finalize(const UnfinalizedLayer& layer, const UnfinalizedOutput& in, int num_tokens,
              const FinalizedOutput& out, Stream stream) {
  layer.impl_->check_tokens(num_tokens);  // (the bounds of the launch that wrote `in`)
  if (num_tokens > 0 && (!in.gemm2_out || !in.expert_weights || !in.expanded_to_permuted || !out.output))
    throw Error(ErrorKind::InvalidArgument,
                "finalize needs gemm2_out, expert_weights, expanded_to_permuted and output");
  require_aligned16(in.gemm2_out, "", "gemm2_out");
  require_aligned16(out.output, "output.", "output");
  layer.impl_->run_finalize(in.gemm2_out, in.expert_weights, in.expanded_to_permuted, out.output,
                            num_tokens, stream, /*after_gemm2=*/false);
}

namespace {

// The process's compiled layers by layer_key (runtime::OnceMap: built once, outside the lock).
// Never destroyed: the fork handlers may run at any time; the modules go with the process.
runtime::OnceMap<LayerImpl>& layers() {
  static auto* m = new runtime::OnceMap<LayerImpl>;
  return *m;
}

// Registered when the library loads (not at the first compile, which a fork could interrupt).
[[maybe_unused]] const int kLayerForkHandlers = ::pthread_atfork(
    [] { layers().lock_for_fork(); }, [] { layers().unlock_in_parent(); },
    [] { layers().unlock_in_child(); });

std::shared_ptr<const LayerImpl> get_layer(const MoeSpec& spec, const CompileOptions& opt) {
  spec.validate();
  CUdevice dev;
  const CUcontext ctx = runtime::ensure_context(&dev);
  const std::string arch = opt.arch.empty() ? runtime::arch_of(dev) : opt.arch;
  const std::string key = layer_key(spec, arch, opt.max_tokens, runtime::context_id(ctx));
  return layers().get(
      key,
      [&] {
        CompileOptions o = opt;
        o.arch = arch;
        return std::make_shared<const LayerImpl>(spec, o);
      },
      [] {
        // A progress callback that waited for a layer still being built could wait for its
        // own compile (whose thread waits for the callback to return).
        if (in_progress_callback)
          throw Error(ErrorKind::InvalidArgument,
                      "a CompileOptions::progress callback asked for a layer that is still "
                      "being compiled; request it after compile_* returns");
      });
}

}  // namespace

size_t release_layers() {
  const runtime::Driver* d = runtime::driver_or_null(nullptr);
  if (!d) return 0;  // (no driver: nothing was built)
  CUcontext ctx = nullptr;
  MOEJIT_CU_CHECK(d->cuCtxGetCurrent(&ctx));
  if (!ctx) return 0;
  const std::string prefix = context_key_prefix(runtime::context_id(ctx));
  // The references go when `taken` does, here, with the context current: each layer no Layer
  // object still holds unloads its modules then.
  const auto taken = layers().take_made_if(
      [&](const std::string& key) { return key.compare(0, prefix.size(), prefix) == 0; });
  return taken.size();
}

FinalizedLayer compile_finalized(const MoeSpec& spec, const CompileOptions& options) {
  if (!spec.finalize)
    throw Error(ErrorKind::InvalidSpec,
                "finalize = false: compile_finalized needs finalize = true (use "
                "compile_unfinalized for the unfinalized result)");
  return FinalizedLayer(get_layer(spec, options));
}

UnfinalizedLayer compile_unfinalized(const MoeSpec& spec, const CompileOptions& options) {
  if (spec.finalize)
    throw Error(ErrorKind::InvalidSpec,
                "finalize = true: compile_unfinalized needs finalize = false (use "
                "compile_finalized for the finalized result)");
  return UnfinalizedLayer(get_layer(spec, options));
}

// ---- inspection --------------------------------------------------------------------------------

std::string dump(const MoeSpec& spec, DumpKind kind, const std::string& arch_in, int tokens) {
  spec.validate();
  if (kind == DumpKind::Ir) return spec_to_ir_text(spec);
  const std::string arch = default_arch(arch_in);
  const Plan plan = compiler::make_plan(spec, 0, arch);
  if (kind == DumpKind::Plan) return compiler::describe(plan);
  const int bucket = tokens > 0 ? plan.bucket_for(tokens) : -1;
  const auto sources = compiler::generate_all(plan);
  std::string out;
  std::set<std::string> printed;  // entries whose PTX is out
  for (size_t i = 0; i < plan.kernels.size(); ++i) {
    const auto& k = plan.kernels[i];
    if (bucket >= 0 && k.bucket >= 0 && k.bucket != bucket) continue;
    if (tokens > 1 && k.role == KernelRole::Resident) continue;  // one token only
    if (tokens > 0 && k.role == KernelRole::Chain && !plan.buckets[k.bucket].chain_covers(tokens)) continue;
    const compiler::KernelSource& src = sources[i];
    // A bucket's kernel: the token counts it runs for (its bucket's; the chain kernel's and the
    // resident layer's within it). A kernel of several buckets' code names the first one.
    std::string range;
    if (k.bucket >= 0) {
      const compiler::Bucket& b = plan.buckets[k.bucket];
      const int lo = k.role == KernelRole::Chain ? b.chain_min_tokens : b.min_tokens;
      const int hi = k.role == KernelRole::Chain ? b.chain_tokens : k.role == KernelRole::Resident ? 1 : b.max_tokens;
      range = fmt::format("tokens [{}, {}], ", lo, hi == 0 ? std::string("inf") : std::to_string(hi));
    }
    const std::string first = src.same_as < 0 ? "" : sources[code_of(sources, i)].name;
    const std::string shared = first.empty() ? "" : fmt::format(", the code of {}", first);
    if (kind == DumpKind::Cuda) {
      out += fmt::format("// ---- kernel {} ({}entry {}{}, {} threads) ----\n{}\n", src.name, range,
                         src.entry, shared, src.threads, src.source);
    } else {
      out += fmt::format("// ---- kernel {} ({}entry {}{}, {}) ----\n", src.name, range, src.entry, shared, arch);
      if (!first.empty() && printed.count(src.entry)) {  // (printed above)
        out += fmt::format("// (the PTX of {} above)\n", first);
        continue;
      }
      const auto ptx = compiler::nvrtc_compile(src.name, src.source, arch, /*ptx=*/true);
      out.append(ptx.binary.begin(), ptx.binary.end());
      out += "\n";
      printed.insert(src.entry);
    }
  }
  return out;
}

std::vector<KernelReport> compile_report(const MoeSpec& spec, const CompileOptions& options) {
  spec.validate();
  const std::string arch = default_arch(options.arch);
  const Plan plan = compiler::make_plan(spec, options.max_tokens, arch);
  const auto sources = compiler::generate_all(plan);
  const auto bins = build_all(sources, options, arch);
  std::vector<KernelReport> out;
  for (size_t i = 0; i < sources.size(); ++i) {
    const auto usage = compiler::parse_ptxas_log(bins[i]->compile_log);
    const size_t code = code_of(sources, i);
    out.push_back({sources[i].name, arch, bins[i]->cubin.size(), usage.registers,
                   usage.spill_store_bytes, usage.spill_load_bytes, usage.stack_bytes,
                   code == i ? bins[i]->compile_ms : 0, code == i ? "" : sources[code].name});
  }
  return out;
}

// ---- device queries ------------------------------------------------------------------------

bool has_gpu(std::string* why_not) { return runtime::driver_or_null(why_not) != nullptr; }

std::string device_arch() {
  CUdevice dev;
  runtime::ensure_context(&dev);
  return runtime::arch_of(dev);
}

std::string device_name() {
  CUdevice dev;
  runtime::ensure_context(&dev);
  char name[256] = {};
  MOEJIT_CU_CHECK(runtime::driver().cuDeviceGetName(name, sizeof(name), dev));
  return name;
}

}  // namespace moejit
