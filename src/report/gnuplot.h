#pragma once
// Private to src/report: running gnuplot and quoting for its scripts.
#include <filesystem>
#include <string>

namespace tandem::report::detail {

// A gnuplot single-quoted string literal holding `s` verbatim.
std::string gp_quote(const std::string& s);

// Writes `text` to `path`; throws tandem::Error naming the file on failure.
void write_file(const std::filesystem::path& path, const std::string& text);

// Runs `gnuplot SCRIPT` in `dir` (SCRIPT is a file name in `dir`). Throws
// tandem::Error with gnuplot's exit status and stderr when it fails.
void run_gnuplot(const std::filesystem::path& gnuplot, const std::filesystem::path& dir, const std::string& script);

}  // namespace tandem::report::detail
