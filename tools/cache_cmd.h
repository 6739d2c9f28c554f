// `moejit cache ls|stats|verify|prune|clear|export|import|timing` and `moejit warmup`.
#pragma once

#include <CLI/CLI.hpp>

// Adds the subcommands to the moejit CLI; every one takes --cache-dir DIR.
void moejit_cli_add_cache_commands(CLI::App& app);
