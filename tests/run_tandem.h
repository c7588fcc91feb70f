#pragma once
// Runs the tandem executable (TANDEM_EXE) with `args`; returns its exit code
// and combined stdout/stderr. Shared by the end-to-end tests.
#include <sys/wait.h>

#include <cstdio>
#include <string>
#include <utility>

inline std::pair<int, std::string> run_tandem(const std::string& args) {
  std::string cmd = std::string(TANDEM_EXE) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128, out};
}
