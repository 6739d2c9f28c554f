#include "cli_common.h"

#include <fmt/format.h>

#include <fstream>
#include <sstream>

namespace moejit_cli {

void SpecArgs::add(CLI::App& cmd) {
  auto* p = cmd.add_option("--preset", preset, "named layer: " + [] {
    std::string names;
    for (const auto& n : moejit::preset_names()) names += (names.empty() ? "" : ", ") + n;
    return names;
  }());
  auto* s = cmd.add_option("--spec", spec_file, "layer spec file (IR text form)");
  p->excludes(s);
  cmd.add_option("--weights", weights,
                 "weight layout, replacing the spec's: rowmajor (MxInt4G32) | tiled (MxInt4G32Tiled, "
                 "written by Layer::prepare_weights)")
      ->check(CLI::IsMember({"rowmajor", "tiled"}));
}

moejit::MoeSpec SpecArgs::load() const {
  moejit::MoeSpec spec = load_spec();
  if (weights == "rowmajor") spec.weight_format = moejit::WeightFormat::MxInt4G32;
  if (weights == "tiled") spec.weight_format = moejit::WeightFormat::MxInt4G32Tiled;
  return spec;
}

moejit::MoeSpec SpecArgs::load_spec() const {
  if (!preset.empty()) return moejit::preset(preset);
  if (spec_file.empty())
    throw moejit::Error(moejit::ErrorKind::InvalidArgument, "give --preset NAME or --spec FILE");
  std::ifstream in(spec_file);
  if (!in)
    throw moejit::Error(moejit::ErrorKind::InvalidArgument,
                        fmt::format("cannot read spec file '{}'", spec_file));
  std::stringstream ss;
  ss << in.rdbuf();
  return moejit::parse_spec_text(ss.str());
}

std::vector<int> parse_int_list(const std::string& text, const char* what) {
  std::vector<int> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    int v = 0;
    try {
      v = std::stoi(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size() || item.empty() || v < 0)
      throw moejit::Error(moejit::ErrorKind::InvalidArgument,
                          fmt::format("{} = '{}' is not a list of non-negative integers", what, text));
    out.push_back(v);
  }
  if (out.empty())
    throw moejit::Error(moejit::ErrorKind::InvalidArgument, fmt::format("{} is empty", what));
  return out;
}

}  // namespace moejit_cli
