// Temporary directories and shell commands for the tests that run the `moejit` CLI or many
// processes at once. Shared by the CPU tests (test_cache.cpp) and the GPU tests
// (test_processes.cpp).
#pragma once

#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>

namespace moejit_test {

// A fresh directory under the system's temporary directory, removed with everything in it
// (read-only subdirectories included) when the object goes.
class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "moejit-cache-test-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    namespace fs = std::filesystem;
    std::error_code ec;
    for (auto it = fs::recursive_directory_iterator(path_, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec))
      ::chmod(it->path().c_str(), 0700);
    ::chmod(path_.c_str(), 0700);
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& sub) const { return path_ + "/" + sub; }

 private:
  std::string path_;
};

// Reads everything a popen()ed command writes, closes it, and returns its exit status (-1 when
// it did not exit normally, or when p is null).
inline int read_and_close(FILE* p, std::string* out) {
  out->clear();
  if (p == nullptr) return -1;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out->append(buf, n);
  const int status = ::pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Starts a shell command line with its stderr joined to its stdout, to be read with
// read_and_close() (several may run at once); null where popen() fails.
inline FILE* start_shell(const std::string& command) {
  return ::popen((command + " 2>&1").c_str(), "r");
}

// Runs a shell command line with its stderr joined to its stdout; returns its exit status and
// output.
inline int run_shell(const std::string& command, std::string* out) {
  return read_and_close(start_shell(command), out);
}

}  // namespace moejit_test
