// Finding and running gnuplot.
#include "gnuplot.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "tandem/report/report.h"
#include "tandem/util/check.h"

namespace tandem::report {
namespace fs = std::filesystem;

std::optional<fs::path> find_gnuplot() {
  const char* path = std::getenv("PATH");
  if (!path) return std::nullopt;
  std::stringstream dirs(path);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    fs::path candidate = fs::path(dir.empty() ? "." : dir) / "gnuplot";
    std::error_code ec;
    if (fs::is_regular_file(candidate, ec) && ::access(candidate.c_str(), X_OK) == 0)
      return fs::absolute(candidate, ec);
  }
  return std::nullopt;
}

namespace detail {
namespace {

// A POSIX shell single-quoted word holding `s` verbatim.
std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

}  // namespace

std::string gp_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\n' || c == '\r') c = ' ';
    out += c == '\'' ? std::string("''") : std::string(1, c);
  }
  return out + "'";
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  out.close();
  TANDEM_CHECK(out, "cannot write '", path.string(), "': check that the directory is writable");
}

void run_gnuplot(const fs::path& gnuplot, const fs::path& dir, const std::string& script) {
  // gnuplot's stderr goes to a log next to the script: shown when it fails,
  // removed when it succeeds (it only holds warnings then).
  const std::string log = script + ".log";
  const std::string cmd = "cd " + shell_quote(dir.string()) + " && " + shell_quote(gnuplot.string()) + " " +
                          shell_quote(script) + " > /dev/null 2> " + shell_quote(log);
  const int status = std::system(cmd.c_str());
  std::string err;
  {
    std::ifstream in(dir / log);
    std::stringstream ss;
    ss << in.rdbuf();
    err = ss.str();
  }
  const bool ok = status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  if (!ok) {
    const std::string how = status == -1        ? "could not be started"
                            : WIFEXITED(status) ? "exited with status " + std::to_string(WEXITSTATUS(status))
                                                : "was killed by a signal";
    if (err.size() > 2000) err = "..." + err.substr(err.size() - 2000);
    TANDEM_FAIL("gnuplot (", gnuplot.string(), ") ", how, " on ", (dir / script).string(), ":\n", err);
  }
  std::error_code ec;
  fs::remove(dir / log, ec);
}

}  // namespace detail
}  // namespace tandem::report
