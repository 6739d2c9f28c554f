// Many processes on one GPU sharing one kernel cache, as inference workers on a node do: eight
// `moejit run` processes start at once on an empty cache directory, compile what their layers
// need (each kernel once across them), run their layers on the GPU and check them against the
// CPU reference; a second wave with MOEJIT_JIT=off then runs from the directory alone.
//
// The CLI is the one this build made (MOEJIT_CLI_PATH), or $MOEJIT_CLI where the test binary
// was carried to another machine.
#include <fmt/format.h>
#include <gmock/gmock.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "gpu_env.h"
#include "tests/process_helpers.h"

namespace {

using ::testing::HasSubstr;

std::string cli_path() {
  if (const char* p = std::getenv("MOEJIT_CLI"); p != nullptr && *p != '\0') return p;
  return MOEJIT_CLI_PATH;
}

// One counter of `moejit cache stats` ("  misses          12 (12 compiled, 0 failed)"): the
// first number after label, or -1.
long stat_after(const std::string& stats, const std::string& label) {
  const size_t at = stats.find(label);
  long v = -1;
  if (at == std::string::npos ||
      std::sscanf(stats.c_str() + at + label.size(), " %ld", &v) != 1)
    return -1;
  return v;
}

// The compiles of the counters' "misses" line, or -1 where it is unreadable or counts a failed
// compile.
long compiled_count(const std::string& stats) {
  const size_t at = stats.find("misses");
  long misses = -1, compiled = -1, failed = -1;
  if (at == std::string::npos ||
      std::sscanf(stats.c_str() + at, "misses %ld (%ld compiled, %ld failed)", &misses, &compiled,
                  &failed) != 3 ||
      failed != 0)
    return -1;
  return compiled;
}

struct Wave {
  int ok = 0;
  double seconds = 0;
};

// Starts one `moejit run` per process at once (two presets, both weight layouts, both finalize
// modes, the resident, chain-free stream and 64-token buckets) and checks each one's verdict.
Wave run_wave(const std::string& cache_dir, bool jit, int processes, int seed0) {
  const char* presets[] = {"qwen3-30b-a3b", "kimi-k2-tp8"};
  const char* layouts[] = {"rowmajor", "tiled"};
  std::vector<FILE*> pipes;
  std::vector<std::string> commands;
  const auto t0 = std::chrono::steady_clock::now();
  for (int p = 0; p < processes; ++p) {
    commands.push_back(fmt::format(
        "MOEJIT_CACHE_DIR={} MOEJIT_JIT={} {} run --preset {} --weights {} --tokens 1,8,64 "
        "--finalize both --runs 1 --seed {}",
        cache_dir, jit ? "on" : "off", cli_path(), presets[p % 2], layouts[(p / 2) % 2],
        seed0 + p));
    pipes.push_back(moejit_test::start_shell(commands.back()));
  }
  Wave w;
  for (int p = 0; p < processes; ++p) {
    std::string out;
    const int rc = moejit_test::read_and_close(pipes[p], &out);
    // Three token counts, finalized and not: six cases per process.
    const bool pass = rc == 0 && out.find("6 passed, 0 failed") != std::string::npos;
    w.ok += pass;
    EXPECT_TRUE(pass) << commands[p] << "\nexit status " << rc << "\n" << out;
  }
  w.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return w;
}

TEST(GpuProcesses, ColdProcessesShareOneCacheCompileEachKernelOnceAndEveryLayerChecks) {
  MOEJIT_REQUIRE_GPU();
  const std::string cli = cli_path();
  ASSERT_TRUE(std::filesystem::exists(cli))
      << "no moejit CLI at " << cli << " (set MOEJIT_CLI to the built tools/moejit)";
  moejit_test::TempDir tmp;
  const std::string dir = tmp / "cache";
  constexpr int kProcesses = 8;

  const Wave cold = run_wave(dir, /*jit=*/true, kProcesses, 100);
  EXPECT_EQ(cold.ok, kProcesses);
  std::string stats, out;
  ASSERT_EQ(moejit_test::run_shell(cli + " cache stats --cache-dir " + dir, &stats), 0) << stats;
  const long entries = stat_after(stats, "entries"), compiled = compiled_count(stats);
  EXPECT_GT(entries, 0) << stats;
  // Every compile published one entry: no kernel was compiled twice by processes racing for it.
  EXPECT_EQ(compiled, entries) << stats;
  EXPECT_EQ(stat_after(stats, "lock timeouts"), 0) << stats;
  EXPECT_EQ(stat_after(stats, "quarantined"), 0) << stats;
  EXPECT_EQ(moejit_test::run_shell(cli + " cache verify --cache-dir " + dir, &out), 0) << out;

  // Warm, with compiling switched off: a miss would be an error naming the kernel.
  const Wave warm = run_wave(dir, /*jit=*/false, kProcesses, 200);
  EXPECT_EQ(warm.ok, kProcesses);
  std::string after;
  ASSERT_EQ(moejit_test::run_shell(cli + " cache stats --cache-dir " + dir, &after), 0) << after;
  EXPECT_EQ(compiled_count(after), compiled) << after;
  EXPECT_EQ(stat_after(after, "entries"), entries) << after;
  EXPECT_GT(stat_after(after, "hits"), stat_after(stats, "hits")) << after;
  std::printf("%d processes cold: %d/%d checked, %ld compiles for %ld entries, %.1f s; warm with "
              "MOEJIT_JIT=off: %d/%d checked, %.1f s\n",
              kProcesses, cold.ok, kProcesses, compiled, entries, cold.seconds, warm.ok,
              kProcesses, warm.seconds);
}

// `moejit bench` on a layer whose weights (one token: 8 experts of H 2048, I 96) are so few that
// it rotates more weight copies than it times runs (it crashed there until session 35), tiled and
// so padded to I 256 (the bench says by how much). Checks only that it verified and printed its
// row, in text and JSON; the times it prints are not asserted.
TEST(GpuProcesses, BenchOfASmallPaddedLayerWithMoreWeightCopiesThanRuns) {
  MOEJIT_REQUIRE_GPU();
  const std::string cli = cli_path();
  ASSERT_TRUE(std::filesystem::exists(cli)) << "no moejit CLI at " << cli;
  moejit_test::TempDir tmp;
  const std::string spec = tmp / "small.moe", json = tmp / "rows.json";
  FILE* f = std::fopen(spec.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fputs(
      "moejit.module version=1 activation=bf16 {\n"
      "  %route = route method=RenormalizeNaive experts=128 top_k=8 n_group=1 topk_group=1 scale=1 logits=fp32 bias=none\n"
      "  %dispatch = dispatch %route local_offset=0 local_experts=128\n"
      "  %gemm1 = gemm1 %dispatch k=2048 n=96 weight=mxint4_g32_tiled order=gate_up act=swiglu alpha=0 beta=0 limit=0\n"
      "  %gemm2 = gemm2 %gemm1 k=96 n=2048 weight=mxint4_g32_tiled\n"
      "  %out = finalize %gemm2 %route top_k=8\n"
      "}\n",
      f);
  std::fclose(f);
  std::string out;
  ASSERT_EQ(moejit_test::run_shell(fmt::format("MOEJIT_CACHE_DIR={} {} bench --spec {} --tokens 1 --runs 50 "
                                               "--no-cublas-layer --json {}",
                                               tmp / "cache", cli, spec, json),
                                   &out),
            0)
      << out;
  EXPECT_THAT(out, HasSubstr("tiled weights padded from hidden 2048 and intermediate 96 to 2048 and 256")) << out;
  EXPECT_THAT(out, HasSubstr("small.moe      1 ")) << out;
  EXPECT_THAT(out, ::testing::Not(HasSubstr("VERIFY FAILED"))) << out;
  std::string rows;
  ASSERT_EQ(moejit_test::run_shell("cat " + json, &rows), 0);
  EXPECT_THAT(rows, HasSubstr("\"tokens\": 1,")) << rows;  // (a row is written once verified)
  const size_t at = rows.find("\"weight_copies\": ");
  int copies = 0;
  ASSERT_NE(at, std::string::npos) << rows;
  ASSERT_EQ(std::sscanf(rows.c_str() + at, "\"weight_copies\": %d", &copies), 1) << rows;
  EXPECT_GT(copies, 50) << rows;  // the case this test is for
}

}  // namespace
