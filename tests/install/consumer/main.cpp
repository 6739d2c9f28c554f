// Uses the installed header and library: a preset, its IR dump, and an error thrown across the
// library boundary. Prints the IR; exits non-zero on any surprise.
#include <moejit/moejit.h>

#include <cstdio>
#include <string>

int main() {
  const moejit::MoeSpec spec = moejit::preset("kimi-k2");
  const std::string ir = moejit::dump(spec, moejit::DumpKind::Ir);
  if (ir.find("experts=384") == std::string::npos) return 1;
  std::fputs(ir.c_str(), stdout);
  try {
    moejit::preset("no-such-preset");
    return 1;
  } catch (const moejit::Error& e) {
    if (e.kind() != moejit::ErrorKind::InvalidArgument) return 1;
  }
  std::printf("moejit %s: consumer ok\n", moejit::version());
  return 0;
}
