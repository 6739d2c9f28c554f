#include "layer_runner.h"

#include <fmt/format.h>

#include <algorithm>

#include "reference/cpu_reference.h"

namespace moejit_cli {

using moejit::ref::DeviceBuffer;

std::string CaseResult::line() const {
  std::string s = fmt::format(
      "tokens={:<5} finalize={:<3} checked={:<3} rel_l2={:.3e} within={:.5f} ids_mismatch={} "
      "near_ties={} w_err={:.1e} time={:.1f}us launches={} {}",
      tokens, finalize ? "on" : "off", checked_tokens, output.rel_l2, output.frac_within,
      routing.id_mismatch, routing.near_tie_accepted, routing.max_weight_rel_err, median_us,
      launches, pass ? "PASS" : "FAIL");
  if (!finalize)
    s += fmt::format(" [gemm2_out rel_l2={:.3e} layout={}]", unfinalized.rel_l2,
                     layout_ok ? "ok" : layout_error);
  if (!pass) {
    if (!routing.pass) s += "\n  routing: " + routing.summary;
    if (!output.pass) s += "\n  output: " + output.summary;
    if (!finalize && !unfinalized.pass) s += "\n  gemm2_out: " + unfinalized.summary;
  }
  return s;
}

namespace {

std::vector<int> checked_subset(int T, int max_checked) {
  std::vector<int> out;
  if (T <= max_checked) {
    for (int t = 0; t < T; ++t) out.push_back(t);
  } else {
    for (int i = 0; i < max_checked; ++i)
      out.push_back(static_cast<int>(static_cast<long long>(i) * (T - 1) / (max_checked - 1)));
  }
  return out;
}

// Median of `runs` timed launches after two warm-ups.
template <class F>
double time_median_us(F&& launch, int runs) {
  if (runs <= 0) return 0;
  cudaEvent_t a, b;
  CUDA_OK(cudaEventCreate(&a));
  CUDA_OK(cudaEventCreate(&b));
  launch();
  launch();
  std::vector<float> ms;
  for (int i = 0; i < runs; ++i) {
    CUDA_OK(cudaEventRecord(a));
    launch();
    CUDA_OK(cudaEventRecord(b));
    CUDA_OK(cudaEventSynchronize(b));
    float v = 0;
    CUDA_OK(cudaEventElapsedTime(&v, a, b));
    ms.push_back(v);
  }
  CUDA_OK(cudaEventDestroy(a));
  CUDA_OK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2] * 1000.0;
}

}  // namespace

CaseResult run_case(const moejit::MoeSpec& spec, moejit::ref::HostLayer& layer,
                    moejit::ref::DeviceLayer& dev, int T, uint64_t seed,
                    const CaseOptions& options, const moejit::ref::InputOptions& input_opts,
                    CaseOutputs* outputs) {
  CaseResult r;
  r.tokens = T;
  r.finalize = spec.finalize;
  moejit::ref::make_inputs(layer, T, seed, input_opts);
  dev.upload_inputs(layer);
  const moejit::MoeInputs in = dev.inputs(spec);
  const int K = spec.top_k, H = spec.hidden, L = spec.local_experts();
  const size_t slots = static_cast<size_t>(T) * K;

  DeviceBuffer out(std::max<size_t>(1, static_cast<size_t>(T) * H * 2));
  DeviceBuffer ids(std::max<size_t>(1, slots * 4));
  DeviceBuffer weights(std::max<size_t>(1, slots * 4));
  std::vector<uint16_t> got_out;
  std::vector<float> got_y;
  std::vector<int32_t> got_e2p, got_offsets;
  std::function<void()> launch;
  DeviceBuffer ws, y, e2p, offsets;
  int tile = 0;
  if (spec.finalize) {
    const auto fl = moejit::compile_finalized(spec);
    ws = DeviceBuffer(std::max<size_t>(256, fl.workspace_bytes(T)));
    moejit::FinalizedOutput fo{out.get(), ids.get<int32_t>(), weights.get<float>()};
    launch = [=, &ws] { fl.launch(in, T, fo, {ws.get(), ws.bytes()}, nullptr); };
    r.launches = fl.launches_per_call(T);
    out.poison_finite();
    ids.poison_finite();
    weights.poison_finite();
    launch();
    CUDA_OK(cudaDeviceSynchronize());
  } else {
    const auto ul = moejit::compile_unfinalized(spec);
    tile = ul.tile_rows(T);
    ws = DeviceBuffer(std::max<size_t>(256, ul.workspace_bytes(T)));
    y = DeviceBuffer(std::max<size_t>(16, ul.unfinalized_rows(T) * H * 4));
    e2p = DeviceBuffer(std::max<size_t>(4, slots * 4));
    offsets = DeviceBuffer((L + 1) * 4);
    moejit::UnfinalizedOutput uo{y.get(), weights.get<float>(), e2p.get<int32_t>(),
                                 offsets.get<int32_t>(), ids.get<int32_t>()};
    moejit::FinalizedOutput fo{out.get()};
    launch = [=, &ws] {
      ul.launch(in, T, uo, {ws.get(), ws.bytes()}, nullptr);
      moejit::finalize(ul, uo, T, fo, nullptr);
    };
    r.launches = ul.launches_per_call(T) + 1;
    for (auto* b : {&out, &ids, &weights, &y, &e2p, &offsets}) b->poison_finite();
    launch();
    CUDA_OK(cudaDeviceSynchronize());
    got_y = y.download<float>();
    got_e2p = e2p.download<int32_t>();
    got_offsets = offsets.download<int32_t>();
    got_e2p.resize(slots);
  }
  CUDA_OK(cudaGetLastError());
  got_out = out.download<uint16_t>();
  got_out.resize(static_cast<size_t>(T) * H);
  std::vector<int32_t> got_ids = ids.download<int32_t>();
  std::vector<float> got_w = weights.download<float>();
  got_ids.resize(slots);
  got_w.resize(slots);

  // Routing over all tokens (cheap), the expert compute on a subset.
  r.routing = moejit::ref::compare_routing(spec, layer, T, got_ids.data(), got_w.data());
  const std::vector<int> subset = checked_subset(T, options.max_checked_tokens);
  r.checked_tokens = static_cast<int>(subset.size());
  const auto ref = moejit::ref::reference_layer(spec, layer, T, subset, &r.routing.accepted);
  r.output = moejit::ref::compare_output_bf16(
      ref.out, [&] {
        std::vector<uint16_t> rows;
        for (int t : subset) rows.insert(rows.end(), got_out.begin() + static_cast<long>(t) * H,
                                         got_out.begin() + static_cast<long>(t + 1) * H);
        return rows;
      }(),
      moejit::ref::by_rows(static_cast<size_t>(H)));
  r.unfinalized.pass = true;
  if (!spec.finalize) {
    // Layout: the kernel's dispatch must equal the reference dispatch of the kernel's own ids.
    const auto disp = moejit::ref::reference_dispatch(spec, got_ids, T, tile);
    if (disp.expanded_to_permuted != got_e2p) {
      r.layout_ok = false;
      r.layout_error = "expanded_to_permuted differs from the reference dispatch";
    } else if (std::vector<int32_t>(got_offsets.begin(), got_offsets.end()) != disp.expert_offsets) {
      r.layout_ok = false;
      r.layout_error = "expert_offsets differ from the reference dispatch";
    }
    // gemm2_out rows of the checked slots vs the reference y.
    std::vector<double> ref_rows;
    std::vector<float> got_rows;
    for (size_t i = 0; i < subset.size(); ++i)
      for (int j = 0; j < K; ++j) {
        const int row = got_e2p[static_cast<size_t>(subset[i]) * K + j];
        if (row < 0) continue;
        ref_rows.insert(ref_rows.end(), ref.y.begin() + static_cast<long>((i * K + j) * H),
                        ref.y.begin() + static_cast<long>((i * K + j + 1) * H));
        got_rows.insert(got_rows.end(), got_y.begin() + static_cast<long>(row) * H,
                        got_y.begin() + static_cast<long>(row + 1) * H);
      }
    r.unfinalized = moejit::ref::compare_output(ref_rows, got_rows,
                                                moejit::ref::by_rows(static_cast<size_t>(H)));
    // Padding rows are zero.
    for (int l = 0; l < L && r.layout_ok; ++l) {
      const int first_pad = got_offsets[l] + disp.counts[l];
      for (long long i = static_cast<long long>(first_pad) * H;
           i < static_cast<long long>(got_offsets[l + 1]) * H; ++i)
        if (got_y[i] != 0.0f) {
          r.layout_ok = false;
          r.layout_error = fmt::format("padding row {} of expert {} is not zero", i / H, l);
          break;
        }
    }
  }
  if (outputs) {
    outputs->tile = tile;
    outputs->topk_ids = got_ids;
    outputs->topk_weights = got_w;
    outputs->checked_tokens = subset;
    outputs->reference_out = ref.out;
    if (!spec.finalize) {
      const size_t used = got_offsets.empty() ? 0 : static_cast<size_t>(std::max(0, got_offsets[L]));
      got_y.resize(std::min(got_y.size(), used * H));
      outputs->gemm2_out = std::move(got_y);
      outputs->expanded_to_permuted = std::move(got_e2p);
      outputs->expert_offsets = std::move(got_offsets);
    }
    outputs->out = std::move(got_out);
  }
  r.median_us = time_median_us(launch, options.timing_runs);
  r.pass = r.routing.pass && r.output.pass && r.unfinalized.pass && r.layout_ok;
  return r;
}

}  // namespace moejit_cli
