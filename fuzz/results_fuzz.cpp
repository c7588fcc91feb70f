// Fuzz target: report::read_results (tandem/report/report.h), which reads
// every DIR/*.json, and format_report, which renders what it read.
// An input is split at NUL bytes (never valid inside JSON) into up to
// kMaxFiles documents, written as results_0.json, results_1.json, ... into a
// private temporary directory, so the corpus can hold several runs that the
// report orders, labels and compares with each other.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <ostream>
#include <streambuf>
#include <string>

#include "fuzz_util.h"
#include "tandem/report/report.h"

namespace {
namespace fs = std::filesystem;

constexpr size_t kMaxFiles = 4;

fs::path* dir = nullptr;
size_t files_written = 0;

// A stream that drops everything (read_results logs each skipped file).
class NullBuf : public std::streambuf {
 protected:
  int overflow(int c) override { return traits_type::not_eof(c); }
  std::streamsize xsputn(const char*, std::streamsize n) override { return n; }
};

void remove_dir() {
  std::error_code ec;
  if (dir) fs::remove_all(*dir, ec);
}

fs::path file_name(size_t k) { return *dir / ("results_" + std::to_string(k) + ".json"); }

void write_file(const fs::path& path, const uint8_t* data, size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  out.close();
  if (!out) tandem::fuzz::die("cannot write", path.c_str());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tandem::fuzz::init_fuzz_process();
  // /dev/shm keeps the per-input writes in memory; TMPDIR where it is missing.
  std::error_code ec;
  fs::path base = fs::is_directory("/dev/shm", ec) ? fs::path("/dev/shm") : fs::temp_directory_path();
  std::string tmpl = (base / "tandem-fuzz-results-XXXXXX").string();
  if (!mkdtemp(tmpl.data())) tandem::fuzz::die("mkdtemp failed", tmpl.c_str());
  dir = new fs::path(tmpl);
  std::atexit(remove_dir);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > tandem::fuzz::kMaxInputBytes) return -1;
  size_t n = 0, start = 0;
  for (size_t i = 0; i <= size && n < kMaxFiles; ++i) {
    if (i == size || data[i] == 0) {
      write_file(file_name(n++), data + start, i - start);
      start = i + 1;
    }
  }
  for (size_t k = n; k < files_written; ++k) fs::remove(file_name(k));
  files_written = n;

  NullBuf null_buf;
  std::ostream log(&null_buf);
  tandem::fuzz::run_guarded([&] {
    auto runs = tandem::report::read_results(*dir, log);
    if (runs.empty()) tandem::fuzz::die("read_results", "returned no runs without throwing");
    for (const auto& run : runs) (void)tandem::report::accuracy_scale(run);
    (void)tandem::report::format_report(runs);
  });
  return 0;
}
