// The `moejit` CLI as a user meets it, through the built binary (MOEJIT_CLI_PATH): what works
// without a GPU, and the exit code and message of each kind of mistake.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "moejit/moejit.h"

extern char** environ;

namespace moejit {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

struct CliResult {
  int exit_code = -1;  // -1: killed by a signal
  std::string out;
  std::string err;
};

// Creates an empty file in the temporary directory ($TMPDIR, else /tmp); returns its descriptor.
int make_temp_file(const std::string& stem, std::string* path) {
  *path = (std::filesystem::temp_directory_path() / (stem + "-XXXXXX")).string();
  const int fd = ::mkstemp(path->data());
  EXPECT_GE(fd, 0) << "mkstemp(" << *path << "): " << std::strerror(errno);
  return fd;
}

std::string read_and_remove(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  ::unlink(path.c_str());
  return ss.str();
}

// Runs `moejit args...` with CUDA_VISIBLE_DEVICES="" (so it sees no GPU even on a machine with
// one), stdin from /dev/null, stdout and stderr captured.
CliResult run_cli(const std::vector<std::string>& args) {
  std::string out_path, err_path;
  const int out_fd = make_temp_file("moejit-cli-out", &out_path);
  const int err_fd = make_temp_file("moejit-cli-err", &err_path);

  std::vector<std::string> argv_text = {MOEJIT_CLI_PATH};
  argv_text.insert(argv_text.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_text) argv.push_back(a.data());
  argv.push_back(nullptr);

  std::vector<std::string> env_text = {"CUDA_VISIBLE_DEVICES="};
  for (char** e = environ; *e; ++e)
    if (std::string(*e).rfind("CUDA_VISIBLE_DEVICES=", 0) != 0) env_text.emplace_back(*e);
  std::vector<char*> envp;
  for (std::string& e : env_text) envp.push_back(e.data());
  envp.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, out_fd, 1);
  posix_spawn_file_actions_adddup2(&actions, err_fd, 2);
  pid_t pid = 0;
  const int spawn_rc = ::posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  ::close(out_fd);
  ::close(err_fd);

  CliResult r;
  if (spawn_rc != 0) {
    ADD_FAILURE() << "cannot start " << argv[0] << ": " << std::strerror(spawn_rc);
  } else {
    int status = 0;
    ::waitpid(pid, &status, 0);
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  r.out = read_and_remove(out_path);
  r.err = read_and_remove(err_path);
  return r;
}

std::string describe(const CliResult& r) {
  return "exit " + std::to_string(r.exit_code) + "\n--- stdout:\n" + r.out.substr(0, 2000) +
         "\n--- stderr:\n" + r.err;
}

TEST(Cli, DumpIrWorksWithoutAGpu) {
  const CliResult r = run_cli({"dump", "--preset", "kimi-k2", "--emit", "ir"});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_EQ(r.out, spec_to_ir_text(preset("kimi-k2")));
}

TEST(Cli, DumpCudaForOneTokenCountWorksWithoutAGpu) {
  const CliResult r =
      run_cli({"dump", "--preset", "qwen3-30b-a3b", "--emit", "cuda", "--tokens", "1"});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.out, HasSubstr("moejit_gemm1_b0"));
  EXPECT_THAT(r.out, Not(HasSubstr("moejit_gemm1_b1")));
}

// Targets NVRTC does not have, or suffixes the arch does not take, are argument errors naming
// the targets there are (not NVRTC's compile errors).
TEST(Cli, UnknownArchListsTheTargets) {
  for (const char* arch : {"sm_85", "sm_99", "sm_80a", "sm_90f", "sm_75", "sm_9000", "compute_90"}) {
    const CliResult r = run_cli({"dump", "--preset", "qwen3-30b-a3b", "--emit", "ptx", "--tokens",
                                 "1", "--arch", arch});
    EXPECT_NE(r.exit_code, 0) << describe(r);
    EXPECT_THAT(r.err, HasSubstr(std::string("arch = '") + arch + "' is not a supported target"))
        << describe(r);
    EXPECT_THAT(r.err, HasSubstr("sm_90")) << describe(r);
    EXPECT_THAT(r.err, Not(HasSubstr("Compile"))) << describe(r);
  }
  for (const char* arch : {"sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_100f"}) {
    const CliResult r = run_cli({"dump", "--preset", "qwen3-30b-a3b", "--emit", "ptx", "--tokens",
                                 "1", "--arch", arch});
    EXPECT_EQ(r.exit_code, 0) << arch << ": " << describe(r);
    EXPECT_THAT(r.out, HasSubstr(".target")) << arch;
  }
}

TEST(Cli, NegativeMaxTokensIsRefused) {
  const CliResult r = run_cli({"compile", "--preset", "qwen3-30b-a3b", "--max-tokens", "-5"});
  EXPECT_NE(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.err, HasSubstr("max_tokens = -5 is negative")) << describe(r);
}

TEST(Cli, UnknownPresetListsThePresets) {
  const CliResult r = run_cli({"dump", "--preset", "no-such-model", "--emit", "ir"});
  EXPECT_NE(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.err, HasSubstr("no-such-model")) << describe(r);
  for (const std::string& name : preset_names()) EXPECT_THAT(r.err, HasSubstr(name));
  EXPECT_EQ(r.out, "");
}

TEST(Cli, BadEmitNamesTheChoices) {
  const CliResult r = run_cli({"dump", "--preset", "kimi-k2", "--emit", "sass"});
  EXPECT_NE(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.err, HasSubstr("sass")) << describe(r);
  EXPECT_THAT(r.err, HasSubstr("ptx")) << describe(r);
}

TEST(Cli, MissingSpecFileNamesThePath) {
  const std::string path =
      (std::filesystem::temp_directory_path() / "moejit-test-no-such-spec.moe").string();
  ::unlink(path.c_str());
  const CliResult r = run_cli({"dump", "--spec", path, "--emit", "ir"});
  EXPECT_NE(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.err, HasSubstr(path)) << describe(r);
}

TEST(Cli, MalformedSpecFileGivesLineAndColumn) {
  std::string path;
  const int fd = make_temp_file("moejit-cli-spec", &path);
  ASSERT_GE(fd, 0);
  const std::string text = "moejit.module version=1 activation=bf16 {\n  %route = rout\n}\n";
  ASSERT_EQ(::write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  ::close(fd);
  const CliResult r = run_cli({"dump", "--spec", path, "--emit", "ir"});
  ::unlink(path.c_str());
  EXPECT_NE(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.err, HasSubstr("line 2, column 12")) << describe(r);
  EXPECT_THAT(r.err, HasSubstr("'rout'")) << describe(r);
}

TEST(Cli, PresetAndSpecTogetherAreRefused) {
  const CliResult r = run_cli({"dump", "--preset", "kimi-k2", "--spec", "x.moe"});
  EXPECT_NE(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.err, HasSubstr("--spec")) << describe(r);
}

TEST(Cli, NoSubcommandIsAnError) {
  const CliResult r = run_cli({});
  EXPECT_NE(r.exit_code, 0) << describe(r);
}

TEST(Cli, RunWithoutAGpuFailsSayingWhy) {
  const CliResult r = run_cli({"run", "--preset", "kimi-k2-tp8", "--tokens", "1,33"});
  EXPECT_NE(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.out + r.err, HasSubstr("no GPU")) << describe(r);
}

TEST(Cli, RunWithoutAGpuSkipsWhenAsked) {
  const CliResult r =
      run_cli({"run", "--preset", "kimi-k2-tp8", "--tokens", "1,33", "--skip-without-gpu"});
  EXPECT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.out + r.err, HasSubstr("no GPU")) << describe(r);
}

TEST(Cli, RunRejectsABadTokenList) {
  const CliResult r =
      run_cli({"run", "--preset", "kimi-k2-tp8", "--tokens", "1,x", "--skip-without-gpu"});
  EXPECT_NE(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.err, HasSubstr("--tokens")) << describe(r);
}

// bench --l2-prep takes write (the default) or none; anything else is refused before the GPU
// is looked for, naming the choices.
TEST(Cli, BenchRejectsABadL2Prep) {
  const CliResult r = run_cli({"bench", "--preset", "qwen3-30b-a3b", "--l2-prep", "flush"});
  EXPECT_NE(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.err, HasSubstr("--l2-prep")) << describe(r);
  EXPECT_THAT(r.err, HasSubstr("write")) << describe(r);
  EXPECT_THAT(r.err, HasSubstr("none")) << describe(r);
  const CliResult ok = run_cli({"bench", "--preset", "qwen3-30b-a3b", "--l2-prep", "none"});
  EXPECT_THAT(ok.out + ok.err, Not(HasSubstr("--l2-prep"))) << describe(ok);
}

// --plans: an empty item, leading or trailing, is the default plan; every plan is made before the
// GPU is looked for, so a bad override fails on any machine.
TEST(Cli, BenchPlansKeepEmptyItemsAndRejectUnknownKeys) {
  const CliResult r = run_cli({"bench", "--preset", "qwen3-30b-a3b", "--plans", "gc=0;"});
  EXPECT_THAT(r.out, HasSubstr("plans: gc=0; default")) << describe(r);
  const CliResult lead = run_cli({"bench", "--preset", "qwen3-30b-a3b", "--plans", ";gc=0"});
  EXPECT_THAT(lead.out, HasSubstr("plans: default; gc=0")) << describe(lead);
  const CliResult typo = run_cli({"bench", "--preset", "qwen3-30b-a3b", "--plans", "gc=0;gcc=0"});
  EXPECT_NE(typo.exit_code, 0) << describe(typo);
  EXPECT_THAT(typo.err, HasSubstr("'gcc=0'")) << describe(typo);
  EXPECT_THAT(typo.out, Not(HasSubstr("plans:"))) << describe(typo);
  const CliResult spaces = run_cli({"bench", "--preset", "qwen3-30b-a3b", "--plans", "gc=0;  ; ef=0 "});
  EXPECT_THAT(spaces.out, HasSubstr("plans: gc=0; default; ef=0\n")) << describe(spaces);
  const CliResult own = run_cli({"bench", "--preset", "qwen3-30b-a3b", "--plans", "gc=0,tl=0x10"});
  EXPECT_NE(own.exit_code, 0) << describe(own);
  EXPECT_THAT(own.err, HasSubstr("--timeline")) << describe(own);
}

TEST(Cli, VersionPrintsTheLibraryVersion) {
  const CliResult r = run_cli({"--version"});
  EXPECT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.out, HasSubstr(version()));
}

}  // namespace
}  // namespace moejit
