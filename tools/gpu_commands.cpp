// GPU subcommands: run (one preset, several token counts, checked against the CPU reference).
#include <fmt/format.h>

#include <chrono>

#include "cli_common.h"
#include "commands.h"
#include "layer_runner.h"

namespace moejit_cli {

namespace {

int g_exit_code = 0;

// Prints why and returns false when there is no GPU.
bool gpu_or_explain(bool skip_ok) {
  std::string why;
  if (moejit::has_gpu(&why)) return true;
  fmt::print("no GPU: {}\n", why);
  if (!skip_ok) set_failed();
  return false;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void add_run(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "run", "run a layer on the GPU with random inputs and check it against the CPU reference");
  static SpecArgs spec_args;
  static std::string tokens = "1,33,1000", finalize = "both";
  static uint64_t seed = 1;
  static int checked = 64, runs = 20;
  static bool skip_without_gpu = false;
  spec_args.add(*cmd);
  cmd->add_option("--tokens", tokens, "token counts, comma-separated");
  cmd->add_option("--seed", seed, "random seed (weights and inputs)");
  cmd->add_option("--finalize", finalize, "on | off | both")
      ->check(CLI::IsMember({"on", "off", "both"}));
  cmd->add_option("--check-tokens", checked, "tokens compared with the CPU reference");
  cmd->add_option("--runs", runs, "timed runs (median)");
  cmd->add_flag("--skip-without-gpu", skip_without_gpu, "exit 0 when there is no GPU");
  cmd->callback([] {
    moejit::MoeSpec spec = spec_args.load();
    const std::vector<int> counts = parse_int_list(tokens, "--tokens");
    if (!gpu_or_explain(skip_without_gpu)) return;
    fmt::print("device: {} ({})\n", moejit::device_name(), moejit::device_arch());
    const auto t0 = std::chrono::steady_clock::now();
    moejit::ref::HostLayer layer = moejit::ref::make_weights(spec, seed);
    moejit::ref::DeviceLayer dev;
    dev.upload_weights(layer);
    fmt::print("weights: {:.2f} GB generated and uploaded in {:.1f} s\n",
               (layer.w13.size() + layer.w2.size() + 2.0 * (layer.w13_scale.size() + layer.w2_scale.size())) / 1e9,
               seconds_since(t0));
    std::vector<bool> modes;
    if (finalize != "off") modes.push_back(true);
    if (finalize != "on") modes.push_back(false);
    int failed = 0, total = 0;
    for (bool fin : modes) {
      spec.finalize = fin;
      const auto tc = std::chrono::steady_clock::now();
      if (fin) moejit::compile_finalized(spec); else moejit::compile_unfinalized(spec);
      fmt::print("compiled finalize={} in {:.2f} s\n", fin ? "on" : "off", seconds_since(tc));
      for (int T : counts) {
        CaseOptions opt;
        opt.max_checked_tokens = checked;
        opt.timing_runs = runs;
        const CaseResult r = run_case(spec, layer, dev, T, seed * 1000003ull + T, opt);
        fmt::print("{}\n", r.line());
        ++total;
        if (!r.pass) ++failed;
      }
    }
    fmt::print("{} passed, {} failed\n", total - failed, failed);
    if (failed) set_failed();
  });
}

}  // namespace

void set_failed() { g_exit_code = 1; }
int exit_code() { return g_exit_code; }

void add_gpu_commands(CLI::App& app) {
  add_run(app);
  add_check(app);
  add_bench(app);
}

}  // namespace moejit_cli
