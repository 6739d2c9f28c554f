// moejit check: the differential comparison of one layer, per (seed, finalize, tokens):
//   * the JIT kernels against the fp64 CPU reference (run_case: routing of every token, the
//     output of up to --check-tokens tokens; finalize off also checks the layout and gemm2_out);
//   * the JIT kernels against the prebuilt GPU reference (nvcc, fp32) on every token, the GPU
//     reference run with routing = Precomputed and the kernel's ids and weights, and the GPU
//     reference's own routing against the CPU reference.
// One line per case, then "N passed, M failed"; the exit status is 1 on any failure.
//
// Weights come from make_weights(spec, seed) and the inputs of T tokens from
// make_inputs(seed * 1000003 + T), as in `moejit run` and tests/gpu/test_differential.cpp, so a
// failing differential test case with plain inputs is reproduced by the command it prints.
//
// --save DIR writes NumPy files and JSON manifests (reference/npy.h), enough to recompute every
// case independently:
//   DIR/seed<S>/weights/            w13 [E,2I,H/2] u1, w13_scale [E,2I,H/32] bf16, w2, w2_scale,
//                                   swiglu_alpha/beta/limit [L] f4 (when the spec has them)
//   DIR/seed<S>/t<T>-finalize-<on|off>/
//                                   inputs (hidden_states, routing_logits, routing_bias,
//                                   topk_ids_in/topk_weights_in for Precomputed), the kernel's
//                                   routing (topk_ids, topk_weights), output, for finalize off
//                                   gemm2_out/expanded_to_permuted/expert_offsets, the references
//                                   (checked_tokens, reference_output f8, gpu_reference_output f4)
// Every manifest carries the spec (IR text and one key per field), the seed and the token count;
// a case's manifest names its weights directory ("weights_dir": "../weights"). bf16 tensors are
// stored as their bits ('<u2'): (np.load(f).astype(np.uint32) << 16).view(np.float32).
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>

#include "cli_common.h"
#include "commands.h"
#include "layer_runner.h"
#include "reference/npy.h"
#ifdef MOEJIT_HAVE_GPU_REFERENCE
#include "reference/gpu_reference.h"
#include "reference/mxint4.h"
#endif

namespace moejit_cli {

namespace {

using moejit::ref::DeviceBuffer;
using moejit::ref::NpyDir;
using moejit::ref::NpyType;

// Bytes of all weights of a spec (every expert: the canonical layout is indexed globally).
double weight_bytes(const moejit::MoeSpec& s) {
  const double E = s.num_experts, H = s.hidden, I = s.intermediate;
  return E * 2 * I * H / 2 + E * 2 * I * H / 32 * 2 + E * H * I / 2 + E * H * I / 32 * 2;
}

// The spec: its IR text (moejit::parse_spec_text reads it back) and one entry per field.
void spec_meta(NpyDir& d, const moejit::MoeSpec& s) {
  d.meta("spec", moejit::spec_to_ir_text(s));
  d.meta("hidden", s.hidden);
  d.meta("intermediate", s.intermediate);
  d.meta("num_experts", s.num_experts);
  d.meta("top_k", s.top_k);
  d.meta("weight_format", moejit::to_string(s.weight_format));
  d.meta("gate_up_order", moejit::to_string(s.gate_up_order));
  d.meta("routing", moejit::to_string(s.routing));
  d.meta("logits_dtype", moejit::to_string(s.logits_dtype));
  d.meta("n_group", s.n_group);
  d.meta("topk_group", s.topk_group);
  d.meta("routed_scaling_factor", s.routed_scaling_factor);
  d.meta("has_routing_bias", s.has_routing_bias);
  d.meta("bias_dtype", moejit::to_string(s.bias_dtype));
  d.meta("swiglu_alpha", s.swiglu_alpha);
  d.meta("swiglu_beta", s.swiglu_beta);
  d.meta("swiglu_limit", s.swiglu_limit);
  d.meta("local_expert_offset", s.local_expert_offset);
  d.meta("local_num_experts", s.local_experts());
  d.meta("finalize", s.finalize);
}

void save_weights(const std::string& dir, const moejit::MoeSpec& s,
                  const moejit::ref::HostLayer& l, uint64_t seed) {
  NpyDir d(dir);
  const size_t E = s.num_experts, H = s.hidden, I = s.intermediate, L = s.local_experts();
  d.save("w13", NpyType::U8, l.w13.data(), {E, 2 * I, H / 2},
         "two signed int4 per byte (two's complement), low nibble = even k; rows [0, I) are "
         "gate for gate_up_order GateUp, up for UpGate");
  d.save("w13_scale", NpyType::BF16, l.w13_scale.data(), {E, 2 * I, H / 32},
         "one scale per 32 consecutive k: weight = int4 x scale");
  d.save("w2", NpyType::U8, l.w2.data(), {E, H, I / 2}, "packed like w13");
  d.save("w2_scale", NpyType::BF16, l.w2_scale.data(), {E, H, I / 32});
  const char* note = "per local expert (index = expert - local_expert_offset)";
  if (s.swiglu_alpha) d.save("swiglu_alpha", NpyType::F32, l.alpha, {L}, note);
  if (s.swiglu_beta) d.save("swiglu_beta", NpyType::F32, l.beta, {L}, note);
  if (s.swiglu_limit) d.save("swiglu_limit", NpyType::F32, l.limit, {L}, note);
  spec_meta(d, s);
  d.meta("seed", static_cast<long long>(seed));
  d.meta("activation", "gate * sigmoid(alpha * gate) * (up + beta), gate <= limit, |up| <= limit");
  d.write_manifest();
}

// What the GPU reference said about one case.
struct GpuCheck {
  bool ran = false;
  std::string skipped;                        // why it did not run
  moejit::ref::RoutingCompareResult routing;  // its own routing vs the CPU reference
  moejit::ref::CompareResult output;          // JIT output vs GPU reference, every token
  moejit::ref::CompareResult rows;            // finalize off: gemm2_out rows vs its per-slot y
  std::vector<float> out;                     // [T, H] fp32, with the kernel's routing
  bool pass() const { return !ran || (routing.pass && output.pass && rows.pass); }
};

#ifdef MOEJIT_HAVE_GPU_REFERENCE
template <class T>
std::vector<T> fetch(const T* p, size_t n) {
  std::vector<T> v(n);
  if (n) CUDA_OK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}
#endif

GpuCheck gpu_reference_check(const moejit::MoeSpec& spec, const moejit::ref::HostLayer& layer,
                             const moejit::ref::DeviceLayer& dev, int T, const CaseOutputs& o) {
  GpuCheck g;
#ifdef MOEJIT_HAVE_GPU_REFERENCE
  const size_t slots = static_cast<size_t>(T) * spec.top_k, H = spec.hidden;
  // The GPU reference reads row-major weights (DESIGN.md) whatever the spec's format.
  const moejit::MoeInputs in = dev.row_major(dev.inputs(spec));
  DeviceBuffer ws(std::max<size_t>(256, moejit::ref::gpu_reference_workspace_bytes(spec, T)));
  // Its own routing first.
  auto r = moejit::ref::gpu_reference_run(spec, in, T, ws.get(), ws.bytes(), nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  g.routing = moejit::ref::compare_routing(spec, layer, T, fetch(r.topk_ids, slots).data(),
                                           fetch(r.topk_weights, slots).data());
  // Then the expert path with the kernel's routing, so that near-ties cannot diverge.
  moejit::MoeSpec pre = spec;
  pre.routing = moejit::RoutingMethod::Precomputed;
  pre.n_group = pre.topk_group = 1;
  pre.routed_scaling_factor = 1.0;
  pre.has_routing_bias = false;
  const DeviceBuffer ids = DeviceBuffer::upload(o.topk_ids);
  const DeviceBuffer weights = DeviceBuffer::upload(o.topk_weights);
  moejit::MoeInputs pin = in;
  pin.topk_ids = ids.get<int32_t>();
  pin.topk_weights = weights.get<float>();
  r = moejit::ref::gpu_reference_run(pre, pin, T, ws.get(), ws.bytes(), nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  g.out = fetch(r.out, static_cast<size_t>(T) * H);
  std::vector<double> got(o.out.size());
  for (size_t i = 0; i < got.size(); ++i) got[i] = moejit::ref::bf16_to_float(o.out[i]);
  g.output = moejit::ref::compare_output(std::vector<double>(g.out.begin(), g.out.end()), got,
                                         moejit::ref::by_rows(H));
  g.rows.pass = true;
  if (!spec.finalize && o.expanded_to_permuted.size() == slots) {
    const std::vector<float> y = fetch(r.y, slots * H);
    std::vector<double> want, have;
    for (size_t s = 0; s < slots; ++s) {
      const int row = o.expanded_to_permuted[s];
      if (row < 0 || static_cast<size_t>(row + 1) * H > o.gemm2_out.size()) continue;
      want.insert(want.end(), y.begin() + static_cast<long>(s * H), y.begin() + static_cast<long>((s + 1) * H));
      for (size_t h = 0; h < H; ++h)
        have.push_back(o.gemm2_out[static_cast<size_t>(row) * H + h]);
    }
    g.rows = moejit::ref::compare_output(want, have, moejit::ref::by_rows(H));
  }
  g.ran = true;
#else
  (void)spec, (void)layer, (void)dev, (void)T, (void)o;
  g.skipped = "the GPU reference is not built (MOEJIT_BUILD_GPU_REFERENCE=OFF)";
#endif
  return g;
}

void save_case(const std::string& dir, const moejit::MoeSpec& s, const moejit::ref::HostLayer& l,
               uint64_t seed, uint64_t input_seed, const CaseResult& r, const GpuCheck& g,
               const CaseOutputs& o) {
  NpyDir d(dir);
  const size_t T = r.tokens, H = s.hidden, E = s.num_experts, k = s.top_k;
  const bool bf16_logits = s.logits_dtype == moejit::DType::BF16;
  d.save("hidden_states", NpyType::BF16, l.hidden, {T, H});
  if (s.routing == moejit::RoutingMethod::Precomputed) {
    d.save("topk_ids_in", NpyType::I32, l.topk_ids, {T, k}, "the caller's routing (input)");
    d.save("topk_weights_in", NpyType::F32, l.topk_weights, {T, k}, "the caller's routing (input)");
  } else {
    d.save("routing_logits", bf16_logits ? NpyType::BF16 : NpyType::F32, l.logits_data(), {T, E});
  }
  if (s.has_routing_bias)
    d.save("routing_bias", s.bias_dtype == moejit::DType::BF16 ? NpyType::BF16 : NpyType::F32,
           l.bias_data(), {E});
  d.save("topk_ids", NpyType::I32, o.topk_ids, {T, k}, "kernel output: global expert ids");
  d.save("topk_weights", NpyType::F32, o.topk_weights, {T, k}, "kernel output");
  d.save("output", NpyType::BF16, o.out, {T, H},
         s.finalize ? "kernel output" : "kernel output: moejit::finalize of gemm2_out");
  if (!s.finalize) {
    d.save("gemm2_out", NpyType::F32, o.gemm2_out, {o.gemm2_out.size() / H, H},
           "rows grouped by local expert, each expert padded to tile_rows (zero rows)");
    d.save("expanded_to_permuted", NpyType::I32, o.expanded_to_permuted, {T * k},
           "row of slot t*k+j in gemm2_out, -1 for non-local experts");
    d.save("expert_offsets", NpyType::I32, o.expert_offsets, {o.expert_offsets.size()});
    d.meta("tile_rows", o.tile);
  }
  d.save("checked_tokens", NpyType::I32, std::vector<int32_t>(o.checked_tokens.begin(), o.checked_tokens.end()),
         {o.checked_tokens.size()}, "tokens compared with the CPU reference");
  d.save("reference_output", NpyType::F64, o.reference_out, {o.checked_tokens.size(), H},
         "fp64 CPU reference of checked_tokens, with the routing the acceptance rule took");
  if (g.ran)
    d.save("gpu_reference_output", NpyType::F32, g.out, {T, H},
           "prebuilt GPU reference (fp32) with the kernel's topk_ids/topk_weights");
  spec_meta(d, s);
  d.meta("seed", static_cast<long long>(seed));
  d.meta("input_seed", static_cast<long long>(input_seed));
  d.meta("tokens", r.tokens);
  d.meta("weights_dir", "../weights");
  d.meta("cpu_rel_l2", r.output.rel_l2);
  if (g.ran) d.meta("gpu_rel_l2", g.output.rel_l2);
  d.meta("pass", r.pass && g.pass());
  d.write_manifest();
}

std::string check_line(uint64_t seed, const CaseResult& r, const GpuCheck& g, bool pass) {
  std::string s = fmt::format(
      "seed={:<4} tokens={:<5} finalize={:<3} cpu: checked={} rel_l2={:.3e} within={:.5f} "
      "ids_mismatch={} near_ties={} w_err={:.1e}",
      seed, r.tokens, r.finalize ? "on" : "off", r.checked_tokens, r.output.rel_l2,
      r.output.frac_within, r.routing.id_mismatch, r.routing.near_tie_accepted,
      r.routing.max_weight_rel_err);
  if (!r.finalize)
    s += fmt::format(" gemm2_out_rel_l2={:.3e} layout={}", r.unfinalized.rel_l2,
                     r.layout_ok ? "ok" : "BAD");
  if (g.ran) {
    s += fmt::format(" | gpu_ref: rel_l2={:.3e} within={:.5f} routing={}", g.output.rel_l2,
                     g.output.frac_within, g.routing.pass ? "ok" : "BAD");
    if (!r.finalize) s += fmt::format(" rows_rel_l2={:.3e}", g.rows.rel_l2);
  } else {
    s += " | gpu_ref: skipped (" + g.skipped + ")";
  }
  s += pass ? "  PASS" : "  FAIL";
  auto detail = [&](bool ok, const char* what, const std::string& summary) {
    if (!ok) s += fmt::format("\n  {}: {}", what, summary);
  };
  detail(r.routing.pass, "routing vs cpu", r.routing.summary);
  detail(r.output.pass, "output vs cpu", r.output.summary);
  detail(r.finalize || r.unfinalized.pass, "gemm2_out vs cpu", r.unfinalized.summary);
  detail(r.layout_ok, "layout", r.layout_error);
  if (g.ran) {
    detail(g.routing.pass, "gpu reference routing vs cpu", g.routing.summary);
    detail(g.output.pass, "output vs gpu reference", g.output.summary);
    detail(g.rows.pass, "gemm2_out vs gpu reference", g.rows.summary);
  }
  return s;
}

}  // namespace

void add_check(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "check", "differential test of a layer: JIT kernels vs the fp64 CPU reference and the "
               "prebuilt GPU reference, per token count, seed and finalize mode");
  static SpecArgs spec_args;
  static std::string tokens = "1,33,1000", seeds = "1", finalize = "both", save_dir;
  static int checked = 64;
  static bool save_large = false, skip_without_gpu = false;
  spec_args.add(*cmd);
  cmd->add_option("--tokens", tokens, "token counts, comma-separated");
  cmd->add_option("--seeds", seeds, "seeds (weights and inputs), comma-separated");
  cmd->add_option("--finalize", finalize, "on | off | both")
      ->check(CLI::IsMember({"on", "off", "both"}));
  cmd->add_option("--check-tokens", checked, "tokens compared with the CPU reference per case");
  cmd->add_option("--save", save_dir,
                  "write every input, weight, routing result and output as .npy with a JSON "
                  "manifest under DIR");
  cmd->add_flag("--save-large", save_large, "allow --save to write more than 2 GB of weights");
  cmd->add_flag("--skip-without-gpu", skip_without_gpu, "exit 0 when there is no GPU");
  cmd->callback([] {
    moejit::MoeSpec spec = spec_args.load();
    spec.validate();
    const std::vector<int> counts = parse_int_list(tokens, "--tokens");
    const std::vector<int> seed_list = parse_int_list(seeds, "--seeds");
    const double gb = weight_bytes(spec) / 1e9;
    if (!save_dir.empty() && gb > 2.0 && !save_large)
      throw moejit::Error(moejit::ErrorKind::InvalidArgument,
                          fmt::format("--save would write {:.1f} GB of weights per seed (more "
                                      "than 2 GB); pass --save-large to write them",
                                      gb));
    std::string why;
    if (!moejit::has_gpu(&why)) {
      fmt::print("no GPU: {}\n", why);
      if (!skip_without_gpu) set_failed();
      return;
    }
    fmt::print("device: {} ({})\n", moejit::device_name(), moejit::device_arch());
    if (!save_dir.empty() && gb > 2.0)
      fmt::print("warning: --save writes {:.1f} GB of weights per seed\n", gb);
    std::vector<bool> modes;
    if (finalize != "off") modes.push_back(true);
    if (finalize != "on") modes.push_back(false);
    int passed = 0, failed = 0;
    for (int seed_value : seed_list) {
      const auto seed = static_cast<uint64_t>(seed_value);
      moejit::ref::HostLayer layer = moejit::ref::make_weights(spec, seed);
      moejit::ref::DeviceLayer dev;
      dev.upload_weights(layer);
      const std::string seed_dir = fmt::format("{}/seed{}", save_dir, seed);
      if (!save_dir.empty()) save_weights(seed_dir + "/weights", spec, layer, seed);
      for (bool fin : modes) {
        spec.finalize = fin;
        for (int T : counts) {
          if (T == 0) {
            fmt::print("seed={:<4} tokens=0     finalize={:<3} skipped: nothing to compute\n",
                       seed, fin ? "on" : "off");
            continue;
          }
          const uint64_t input_seed = seed * 1000003ull + static_cast<uint64_t>(T);
          try {
            CaseOptions opt;
            opt.max_checked_tokens = checked;
            opt.timing_runs = 0;
            CaseOutputs out;
            const CaseResult r = run_case(spec, layer, dev, T, input_seed, opt, {}, &out);
            const GpuCheck g = gpu_reference_check(spec, layer, dev, T, out);
            const bool pass = r.pass && g.pass();
            fmt::print("{}\n", check_line(seed, r, g, pass));
            ++(pass ? passed : failed);
            if (!save_dir.empty())
              save_case(fmt::format("{}/t{}-finalize-{}", seed_dir, T, fin ? "on" : "off"), spec,
                        layer, seed, input_seed, r, g, out);
          } catch (const std::exception& e) {
            fmt::print("seed={:<4} tokens={:<5} finalize={:<3} FAIL\n  error: {}\n", seed, T,
                       fin ? "on" : "off", e.what());
            ++failed;
          }
          std::fflush(stdout);
        }
      }
    }
    if (!save_dir.empty()) fmt::print("saved to {}\n", save_dir);
    fmt::print("{} passed, {} failed\n", passed, failed);
    if (failed) set_failed();
  });
}

}  // namespace moejit_cli
