// moejit: dump generated kernels, compile reports, and (on a GPU) run / check / bench a layer.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <map>

#include "cache_cmd.h"
#include "cli_common.h"
#include "commands.h"

namespace {

void add_dump(CLI::App& app) {
  auto* cmd = app.add_subcommand("dump", "print the IR, plan, CUDA or PTX generated for a layer");
  static moejit_cli::SpecArgs spec;
  static std::string emit = "ir", arch;
  static int tokens = 0;
  spec.add(*cmd);
  cmd->add_option("--emit", emit, "ir | plan | cuda | ptx")
      ->check(CLI::IsMember({"ir", "plan", "cuda", "ptx"}));
  cmd->add_option("--arch", arch, "target arch for ptx (default: this GPU's, else sm_90a)");
  cmd->add_option("--tokens", tokens, "only the kernels a launch with N tokens uses");
  cmd->callback([] {
    static const std::map<std::string, moejit::DumpKind> kinds = {
        {"ir", moejit::DumpKind::Ir},
        {"plan", moejit::DumpKind::Plan},
        {"cuda", moejit::DumpKind::Cuda},
        {"ptx", moejit::DumpKind::Ptx}};
    std::fputs(moejit::dump(spec.load(), kinds.at(emit), arch, tokens).c_str(), stdout);
  });
}

void add_compile(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "compile", "compile every kernel of a layer to CUBIN and print registers and spills");
  static moejit_cli::SpecArgs spec;
  static std::string arch;
  static int max_tokens = 0, jobs = 0;
  spec.add(*cmd);
  cmd->add_option("--arch", arch, "target arch (default: this GPU's, else sm_90a)");
  cmd->add_option("--max-tokens", max_tokens, "only buckets up to this token count");
  cmd->add_option("--jobs", jobs, "parallel compiles (default: hardware threads)");
  cmd->callback([] {
    moejit::CompileOptions opt;
    opt.arch = arch;
    opt.max_tokens = max_tokens;
    opt.jobs = jobs;
    const auto reports = moejit::compile_report(spec.load(), opt);
    fmt::print("{:<15} {:<8} {:>10} {:>5} {:>12} {:>11} {:>6} {:>10}\n", "kernel", "arch",
               "cubin", "regs", "spill_store", "spill_load", "stack", "compile_ms");
    int spills = 0, own = 0;
    for (const auto& r : reports) {
      if (!r.same_as.empty()) {  // compiled once, under the other kernel's row
        fmt::print("{:<15} {:<8} the code of {}\n", r.name, r.arch, r.same_as);
        continue;
      }
      fmt::print("{:<15} {:<8} {:>10} {:>5} {:>12} {:>11} {:>6} {:>10.1f}\n", r.name, r.arch,
                 r.cubin_bytes, r.registers, r.spill_store_bytes, r.spill_load_bytes,
                 r.stack_bytes, r.compile_ms);
      spills += r.spill_store_bytes + r.spill_load_bytes;
      ++own;
    }
    fmt::print("{} kernels ({} distinct), {} spill bytes\n", reports.size(), own, spills);
  });
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moejit: JIT-compiled MXINT4 MoE layers"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(moejit::version()));
  add_dump(app);
  add_compile(app);
  moejit_cli_add_cache_commands(app);
  moejit_cli::add_gpu_commands(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moejit::Error& e) {
    std::fprintf(stderr, "moejit: error (%s): %s\n", moejit::to_string(e.kind()), e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moejit: error: %s\n", e.what());
    return 2;
  }
  return moejit_cli::exit_code();
}
