#pragma once
// Runs the tandem executable (TANDEM_EXE) with `args`; returns its exit code
// and combined stdout/stderr. Shared by the end-to-end tests.
#include <sys/wait.h>

#include <cstdio>
#include <string>
#include <utility>

// Runs a shell command line; returns its exit code and stdout + stderr.
inline std::pair<int, std::string> run_tandem_cmd(const std::string& command) {
  std::string cmd = command + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128, out};
}

inline std::pair<int, std::string> run_tandem(const std::string& args) {
  return run_tandem_cmd(std::string(TANDEM_EXE) + " " + args);
}
