// MPI_Allreduce reference for `tandem bench comm`: the same float32 sum
// all-reduce over the same sizes, timed the same way (barrier before each
// iteration, median over iterations, maximum over ranks, busbw = algbw *
// 2(n-1)/n), so tandem's communicators can be set beside the MPI library of
// this machine (bench/comm_vs_mpi.sh). Only MPI, no LibTorch; optional target.
// glibc malloc is tuned as in the `tandem` executable (device::tune_host_allocator:
// freed memory stays in the process) unless TANDEM_MALLOC_TUNING=0 or a MALLOC_*
// / GLIBC_TUNABLES variable is set: Open MPI's all-reduce mallocs a temporary
// buffer of the message size per call, which from 32 MiB up glibc otherwise
// maps and unmaps every time, and fresh pages fault slowly on a VM (seen: 64 MiB
// went from 12 ms to 230 ms).
//
// Usage: mpirun -np N mpi_allreduce [--min-bytes 4K] [--max-bytes 64M]
//                                   [--iters 20] [--warmup 5] [--json PATH]
#include <mpi.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  int64_t min_bytes = 4 << 10;
  int64_t max_bytes = 64 << 20;
  int iters = 20;
  int warmup = 5;
  std::string json;
};

struct Row {
  int64_t bytes = 0;
  double time_us = 0;  // median over iterations, max over ranks
  double algbw_gbps = 0;
  double busbw_gbps = 0;
  double busbw_factor = 0;
  bool correct = false;
};

const char* kUsage =
    "usage: mpirun -np N mpi_allreduce [options]\n"
    "  --min-bytes B   smallest buffer (4096, 4K, 64M; default 4K)\n"
    "  --max-bytes B   largest buffer, sizes double from min (default 64M)\n"
    "  --iters N       timed iterations per size (default 20)\n"
    "  --warmup N      untimed iterations per size (default 5)\n"
    "  --json PATH     also write the rows as JSON (rank 0)\n";

// Every rank parses the same argv, so every rank fails alike: no hang.
[[noreturn]] void fail(int rank, const std::string& msg) {
  if (rank == 0) std::fprintf(stderr, "mpi_allreduce: %s\n%s", msg.c_str(), kUsage);
  MPI_Finalize();
  std::exit(2);
}

// "4096", "4K", "64M", "1G" (binary, case-insensitive, optional B/iB); -1 if malformed.
int64_t parse_bytes(const std::string& s) {
  size_t pos = 0;
  while (pos < s.size() && std::isdigit(static_cast<unsigned char>(s[pos]))) ++pos;
  if (pos == 0 || pos > 15) return -1;
  const int64_t v = std::stoll(s.substr(0, pos));
  std::string suffix = s.substr(pos);
  for (auto& c : suffix) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (suffix.size() >= 2 && suffix.compare(suffix.size() - 2, 2, "IB") == 0) suffix.resize(suffix.size() - 2);
  else if (!suffix.empty() && suffix.back() == 'B') suffix.pop_back();
  int64_t mult = 1;
  if (suffix == "K") mult = int64_t{1} << 10;
  else if (suffix == "M") mult = int64_t{1} << 20;
  else if (suffix == "G") mult = int64_t{1} << 30;
  else if (!suffix.empty()) return -1;
  if (v > std::numeric_limits<int64_t>::max() / mult) return -1;
  return v * mult;
}

int parse_count(int rank, const std::string& flag, const std::string& s, int min) {
  char* end = nullptr;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || v < min || v > std::numeric_limits<int>::max())
    fail(rank, flag + ": expected an integer >= " + std::to_string(min) + ", got '" + s + "'");
  return static_cast<int>(v);
}

Options parse_args(int argc, char** argv, int rank) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      if (rank == 0) std::fputs(kUsage, stdout);
      MPI_Finalize();
      std::exit(0);
    }
    if (i + 1 >= argc) fail(rank, "unknown option or missing value: " + flag);
    const std::string value = argv[++i];
    if (flag == "--min-bytes" || flag == "--max-bytes") {
      const int64_t b = parse_bytes(value);
      if (b < 0) fail(rank, flag + ": '" + value + "' is not a byte size (4096, 4K, 64M)");
      (flag == "--min-bytes" ? o.min_bytes : o.max_bytes) = b;
    } else if (flag == "--iters") {
      o.iters = parse_count(rank, flag, value, 1);
    } else if (flag == "--warmup") {
      o.warmup = parse_count(rank, flag, value, 0);
    } else if (flag == "--json") {
      o.json = value;
    } else {
      fail(rank, "unknown option: " + flag);
    }
  }
  if (o.min_bytes < 4) fail(rank, "--min-bytes must be at least 4 (one float)");
  if (o.max_bytes < o.min_bytes) fail(rank, "--max-bytes must be >= --min-bytes");
  // MPI counts are int: stay below 2^31 floats.
  if (o.max_bytes > (int64_t{1} << 33)) fail(rank, "--max-bytes must be at most 8G");
  return o;
}

// Same sizes as tandem bench comm: doubling, rounded down to whole floats.
std::vector<int64_t> bench_sizes(const Options& o) {
  std::vector<int64_t> out;
  for (int64_t b = o.min_bytes; b <= o.max_bytes; b *= 2) out.push_back(b / 4 * 4);
  return out;
}

// Same rule and thresholds as tandem's device::tune_host_allocator().
std::string tune_host_allocator() {
#if defined(__GLIBC__)
  for (const char* v : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES"})
    if (std::getenv(v)) return std::string("glibc malloc as configured by ") + v;
  const char* off = std::getenv("TANDEM_MALLOC_TUNING");
  if (off && std::string(off) == "0") return "glibc malloc defaults (TANDEM_MALLOC_TUNING=0)";
  const int gib = 1 << 30;
  if (mallopt(M_MMAP_THRESHOLD, gib) == 1 && mallopt(M_TRIM_THRESHOLD, gib) == 1)
    return "glibc malloc keeps freed memory (mmap and trim thresholds 1 GiB)";
  return "glibc malloc defaults (mallopt refused the thresholds)";
#else
  return "the C library's allocator, untouched";
#endif
}

void all_reduce(std::vector<float>& buf) {
  MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(buf.size()), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
}

// rank+1+(i%7) at element i: small integers, so the sum n(n+1)/2 + n(i%7) is exact in float32.
bool check_pattern(int64_t numel, int rank, int n) {
  std::vector<float> buf(static_cast<size_t>(numel));
  for (int64_t i = 0; i < numel; ++i) buf[i] = static_cast<float>(rank + 1 + i % 7);
  all_reduce(buf);
  for (int64_t i = 0; i < numel; ++i)
    if (buf[i] != static_cast<float>(n * (n + 1) / 2 + n * (i % 7))) return false;
  return true;
}

Row bench_size(int64_t bytes, const Options& o, int rank, int n) {
  const int64_t numel = bytes / 4;
  // Timing on zeros: values stay finite however many iterations run.
  std::vector<float> buf(static_cast<size_t>(numel), 0.0f);
  for (int i = 0; i < o.warmup; ++i) all_reduce(buf);
  std::vector<double> samples_us;
  for (int i = 0; i < o.iters; ++i) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = Clock::now();
    all_reduce(buf);
    samples_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  buf = {};
  // Median, not mean: one descheduled iteration must not decide the row.
  std::nth_element(samples_us.begin(), samples_us.begin() + samples_us.size() / 2, samples_us.end());
  // [time, 1 - ok]: max over ranks of both.
  double stats[2] = {samples_us[samples_us.size() / 2], check_pattern(numel, rank, n) ? 0.0 : 1.0};
  MPI_Allreduce(MPI_IN_PLACE, stats, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  Row r;
  r.bytes = bytes;
  r.time_us = stats[0];
  r.algbw_gbps = r.time_us > 0 ? bytes / (r.time_us * 1e3) : 0.0;  // bytes/us/1e3 = GB/s
  r.busbw_factor = n > 1 ? 2.0 * (n - 1) / n : 0.0;
  r.busbw_gbps = r.algbw_gbps * r.busbw_factor;
  r.correct = stats[1] == 0.0;
  return r;
}

void print_table(const std::vector<Row>& rows, int n, const Options& o, const std::string& library,
                 const std::string& allocator) {
  std::printf("# mpi_allreduce: %d ranks, float32 sum, %d iterations after %d warm-up; "
              "time = median iteration, max over ranks\n"
              "# busbw = algbw * 2(n-1)/n; %s; %s\n",
              n, o.iters, o.warmup, library.c_str(), allocator.c_str());
  std::printf("# %12s %12s %12s %12s %6s\n", "size(B)", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "check");
  for (const auto& r : rows)
    std::printf("  %12lld %12.1f %12.3f %12.3f %6s\n", static_cast<long long>(r.bytes), r.time_us, r.algbw_gbps,
                r.busbw_gbps, r.correct ? "ok" : "WRONG");
  std::fflush(stdout);
}

// Field names as tandem's bench JSON (collectives::to_json), algo "mpi".
bool write_json(const std::string& path, const std::vector<Row>& rows, int n, const Options& o,
                const std::string& allocator) {
  std::ofstream f(path);
  if (!f) return false;
  char num[64];
  auto fmt = [&](double v) {
    std::snprintf(num, sizeof num, "%.6g", v);
    return std::string(num);
  };
  f << "{\n  \"world_size\": " << n << ",\n  \"iters\": " << o.iters << ",\n  \"warmup\": " << o.warmup
    << ",\n  \"dtype\": \"float32\",\n  \"allocator\": \"" << allocator << "\",\n  \"rows\": [";
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    f << (i ? ",\n" : "\n") << "    {\"algo\": \"mpi\", \"bytes\": " << r.bytes << ", \"time_us\": " << fmt(r.time_us)
      << ", \"algbw_gbps\": " << fmt(r.algbw_gbps) << ", \"busbw_gbps\": " << fmt(r.busbw_gbps)
      << ", \"busbw_factor\": " << fmt(r.busbw_factor) << ", \"correct\": " << (r.correct ? "true" : "false") << "}";
  }
  f << "\n  ]\n}\n";
  return static_cast<bool>(f);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string allocator = tune_host_allocator();  // before MPI allocates anything
  MPI_Init(&argc, &argv);
  int rank = 0, n = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  const Options o = parse_args(argc, argv, rank);
  std::vector<Row> rows;
  bool all_correct = true;
  for (int64_t bytes : bench_sizes(o)) {
    rows.push_back(bench_size(bytes, o, rank, n));
    all_correct = all_correct && rows.back().correct;
  }
  int rc = all_correct ? 0 : 1;
  if (rank == 0) {
    char library[MPI_MAX_LIBRARY_VERSION_STRING] = {};
    int len = 0;
    MPI_Get_library_version(library, &len);
    std::string lib(library, static_cast<size_t>(len));
    lib = lib.substr(0, lib.find_first_of(",\n"));
    print_table(rows, n, o, lib, allocator);
    if (!o.json.empty() && !write_json(o.json, rows, n, o, allocator)) {
      std::fprintf(stderr, "mpi_allreduce: cannot write %s\n", o.json.c_str());
      rc = 1;
    }
  }
  MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return rc;
}
