// Helpers shared by the moejit CLI subcommands.
#pragma once

#include <CLI/CLI.hpp>

#include <string>

#include "moejit/moejit.h"

namespace moejit_cli {

// --preset NAME | --spec FILE, added to a subcommand.
// --weights rowmajor|tiled replaces the spec's weight format.
struct SpecArgs {
  std::string preset;
  std::string spec_file;
  std::string weights;
  void add(CLI::App& cmd);
  moejit::MoeSpec load() const;  // throws moejit::Error

 private:
  moejit::MoeSpec load_spec() const;
};

// Parses "1,33,1000" into token counts.
std::vector<int> parse_int_list(const std::string& text, const char* what);

}  // namespace moejit_cli
