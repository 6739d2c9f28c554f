// Subcommands that need a GPU (run, check, bench) live in their own files.
#pragma once

#include <CLI/CLI.hpp>

namespace moejit_cli {

void add_gpu_commands(CLI::App& app);
void add_bench(CLI::App& app);
void add_check(CLI::App& app);
// Non-zero after a subcommand reported a failed check.
int exit_code();
void set_failed();

}  // namespace moejit_cli
