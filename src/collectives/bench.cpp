// `tandem bench comm`: all-reduce micro-benchmark over gloo, ring and ps.
#include "tandem/collectives/bench.h"

#include <algorithm>
#include <cctype>
#include <limits>
#include <chrono>
#include <cstdio>
#include <sstream>

#include <nlohmann/json.hpp>

#include "tandem/collectives/ring_allreduce.h"
#include "tandem/util/check.h"

namespace tandem::collectives {
namespace {

using Clock = std::chrono::steady_clock;

void run_once(comm::Communicator& comm, const std::string& algo, at::Tensor& t, const BenchOptions& o) {
  if (algo == "native") {
    comm.all_reduce(t);
  } else if (algo == "ring") {
    RingOptions r;
    r.chunk_bytes = o.ring_chunk_bytes;
    ring_all_reduce(comm, t, r);
  } else {
    comm.reduce(t, 0);
    comm.broadcast(t, 0);
  }
}

// rank+1+(i%7): small integers, so every sum is exact in float32.
at::Tensor pattern(int64_t numel, int rank) {
  return at::arange(numel, at::kLong).remainder(7).to(at::kFloat).add_(rank + 1);
}

}  // namespace

const std::vector<std::string>& bench_algorithms() {
  static const std::vector<std::string> names{"native", "ring", "ps"};
  return names;
}

std::vector<std::string> parse_algos(const std::string& list) {
  std::vector<std::string> out;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    if (item == "gloo" || item == "shm" || item == "hybrid" || item == "nccl") item = "native";
    const auto& known = bench_algorithms();
    TANDEM_CHECK(std::find(known.begin(), known.end(), item) != known.end(), "--algos: unknown algorithm '", item,
                 "' (accepted: native (the communicator's own all-reduce; also by its name: gloo, shm, hybrid), "
                 "ring, ps)");
    if (std::find(out.begin(), out.end(), item) == out.end()) out.push_back(item);
  }
  TANDEM_CHECK(!out.empty(), "--algos: empty list (accepted: native, ring, ps, comma-separated)");
  return out;
}

int64_t parse_bytes(const std::string& s) {
  auto bad = [&] {
    TANDEM_FAIL("'", s, "' is not a byte size: use a number with an optional K, M or G suffix (4096, 4K, 64M)");
  };
  size_t pos = 0;
  while (pos < s.size() && std::isdigit(static_cast<unsigned char>(s[pos]))) ++pos;
  if (pos == 0 || pos > 15) bad();
  int64_t v = std::stoll(s.substr(0, pos));
  std::string suffix = s.substr(pos);
  for (auto& c : suffix) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (suffix.size() >= 2 && suffix.substr(suffix.size() - 2) == "IB") suffix.resize(suffix.size() - 2);
  else if (suffix.size() >= 2 && suffix.back() == 'B') suffix.pop_back();
  else if (suffix == "B") suffix.clear();
  int64_t mult = 1;
  if (suffix == "K") mult = 1LL << 10;
  else if (suffix == "M") mult = 1LL << 20;
  else if (suffix == "G") mult = 1LL << 30;
  else if (!suffix.empty()) bad();
  if (v > std::numeric_limits<int64_t>::max() / mult) bad();
  return v * mult;
}

void validate(const BenchOptions& o) {
  TANDEM_CHECK(o.min_bytes >= 4, "--min-bytes must be at least 4 (one float), got ", o.min_bytes);
  TANDEM_CHECK(o.max_bytes >= o.min_bytes, "--max-bytes (", o.max_bytes, ") must be >= --min-bytes (", o.min_bytes,
               ")");
  TANDEM_CHECK(o.max_bytes <= (int64_t{1} << 34), "--max-bytes must be at most 16G, got ", o.max_bytes);
  TANDEM_CHECK(o.ring_chunk_bytes >= 4, "--ring-chunk must be at least 4 bytes, got ", o.ring_chunk_bytes);
  TANDEM_CHECK(o.iters >= 1, "--iters must be >= 1, got ", o.iters);
  TANDEM_CHECK(o.warmup >= 0, "--warmup must be >= 0, got ", o.warmup);
  TANDEM_CHECK(!o.algos.empty(), "--algos: no algorithm given (accepted: native, ring, ps)");
  for (const auto& a : o.algos) parse_algos(a);
}

std::vector<int64_t> bench_sizes(const BenchOptions& o) {
  std::vector<int64_t> out;
  for (int64_t b = o.min_bytes; b <= o.max_bytes; b *= 2) out.push_back(b / 4 * 4);
  return out;
}

double busbw_factor(const std::string& algo, int n) {
  if (algo == "ps") return 2.0;
  return n > 1 ? 2.0 * (n - 1) / n : 0.0;
}

std::vector<BenchRow> bench_comm(const std::vector<comm::Communicator*>& comms, const BenchOptions& o) {
  validate(o);
  TANDEM_CHECK(!comms.empty(), "bench comm: no communicator");
  const int n = comms.front()->size(), rank = comms.front()->rank();
  // Targets: every algorithm on every communicator.
  struct Target {
    comm::Communicator* comm;
    std::string algo;
  };
  std::vector<Target> targets;
  for (auto* c : comms)
    for (const auto& a : o.algos) targets.push_back({c, a});
  std::vector<BenchRow> rows;
  for (int64_t bytes : bench_sizes(o)) {
    const int64_t numel = bytes / 4;
    const size_t na = targets.size();
    // Timing on zeros: values stay finite however many iterations run.
    std::vector<at::Tensor> bufs;
    for (size_t k = 0; k < na; ++k) bufs.push_back(at::zeros({numel}, at::kFloat));
    for (int i = 0; i < o.warmup; ++i)
      for (size_t k = 0; k < na; ++k) run_once(*targets[k].comm, targets[k].algo, bufs[k], o);
    // Iterations interleave the targets (in alternating order), so that a
    // load change on the host hits them alike; a barrier starts each timed
    // operation on all ranks.
    std::vector<std::vector<double>> samples_us(na);
    for (int i = 0; i < o.iters; ++i) {
      for (size_t j = 0; j < na; ++j) {
        const size_t k = i % 2 == 0 ? j : na - 1 - j;  // alternate the order: no target always goes first
        auto& c = *targets[k].comm;
        c.barrier();
        auto t0 = Clock::now();
        run_once(c, targets[k].algo, bufs[k], o);
        samples_us[k].push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
      }
    }
    bufs.clear();
    const auto want = at::arange(numel, at::kLong).remainder(7).to(at::kFloat).mul_(n).add_(n * (n + 1) / 2);
    for (size_t k = 0; k < na; ++k) {
      auto& c = *targets[k].comm;
      const auto& algo = targets[k].algo;
      // Correctness on a known pattern.
      auto t = pattern(numel, rank);
      run_once(c, algo, t, o);
      // [time, 1 - ok]: max over ranks of both.
      auto stats = at::zeros({2}, at::kDouble);
      // Median, not mean: on a shared host one descheduled iteration would
      // otherwise decide the row.
      auto& v = samples_us[k];
      std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
      stats[0] = v[v.size() / 2];
      stats[1] = at::equal(t, want) ? 0.0 : 1.0;
      c.all_reduce(stats, comm::ReduceOp::kMax);
      BenchRow row;
      row.comm = c.backend();
      row.algo = algo == "native" ? row.comm : algo;
      row.bytes = bytes;
      row.time_us = stats[0].item<double>();
      row.algbw_gbps = row.time_us > 0 ? bytes / (row.time_us * 1e3) : 0.0;  // bytes/us/1e3 = GB/s
      row.busbw_factor = busbw_factor(algo, n);
      row.busbw_gbps = row.algbw_gbps * row.busbw_factor;
      row.correct = stats[1].item<double>() == 0.0;
      rows.push_back(row);
    }
  }
  return rows;
}

std::string format_table(const std::vector<BenchRow>& rows, int world_size, const BenchOptions& o) {
  std::ostringstream os;
  char line[256];
  os << "# tandem bench comm: " << world_size << " ranks, float32 sum, " << o.iters << " iterations after " << o.warmup
     << " warm-up; time = median iteration, max over ranks\n"
     << "# busbw = algbw * 2(n-1)/n for all-reduce, algbw * 2 for ps (reduce + broadcast)\n";
  // Blocks in the order the rows first name them.
  std::vector<std::pair<std::string, std::string>> blocks;
  for (const auto& r : rows)
    if (std::find(blocks.begin(), blocks.end(), std::make_pair(r.algo, r.comm)) == blocks.end())
      blocks.emplace_back(r.algo, r.comm);
  for (const auto& [algo, comm] : blocks) {
    os << "#\n# " << algo;
    if (algo == "gloo") os << ": c10d ProcessGroupGloo all-reduce";
    else if (algo == "shm") os << ": tandem shared-memory all-reduce";
    else if (algo == "hybrid") os << ": tandem hybrid all-reduce (shared memory in a host, Gloo across hosts)";
    else if (algo == "ring") os << ": tandem ring all-reduce (send/recv over " << comm << ")";
    else os << ": reduce to rank 0 + broadcast from rank 0 over " << comm << " (parameter-server push + pull)";
    os << "\n";
    std::snprintf(line, sizeof line, "# %12s %12s %12s %12s %6s\n", "size(B)", "time(us)", "algbw(GB/s)",
                  "busbw(GB/s)", "check");
    os << line;
    for (const auto& r : rows) {
      if (r.algo != algo || r.comm != comm) continue;
      std::snprintf(line, sizeof line, "  %12lld %12.1f %12.3f %12.3f %6s\n", static_cast<long long>(r.bytes),
                    r.time_us, r.algbw_gbps, r.busbw_gbps, r.correct ? "ok" : "WRONG");
      os << line;
    }
  }
  // Every other block's busbw against gloo's own all-reduce, size by size.
  const bool has_gloo = std::any_of(rows.begin(), rows.end(), [](const BenchRow& r) { return r.algo == "gloo"; });
  if (has_gloo && world_size > 1 && blocks.size() > 1) {
    os << "#\n# busbw / gloo busbw\n# " << std::string(12 - 7, ' ') << "size(B)";
    for (const auto& [algo, comm] : blocks)
      if (algo != "gloo") os << " " << std::string(std::max<int>(0, 11 - static_cast<int>(algo.size() + comm.size() + 1)), ' ') << algo << "/" << comm;
    os << "\n";
    for (const auto& g : rows) {
      if (g.algo != "gloo") continue;
      std::snprintf(line, sizeof line, "  %12lld", static_cast<long long>(g.bytes));
      os << line;
      for (const auto& [algo, comm] : blocks) {
        if (algo == "gloo") continue;
        for (const auto& r : rows)
          if (r.algo == algo && r.comm == comm && r.bytes == g.bytes) {
            std::snprintf(line, sizeof line, " %11.2f", g.busbw_gbps > 0 ? r.busbw_gbps / g.busbw_gbps : 0.0);
            os << line;
          }
      }
      os << "\n";
    }
  }
  return os.str();
}

std::string to_json(const std::vector<BenchRow>& rows, int world_size, const BenchOptions& o) {
  nlohmann::json j;
  j["world_size"] = world_size;
  j["iters"] = o.iters;
  j["warmup"] = o.warmup;
  j["dtype"] = "float32";
  j["rows"] = nlohmann::json::array();
  for (const auto& r : rows) {
    j["rows"].push_back({{"algo", r.algo},
                         {"comm", r.comm},
                         {"bytes", r.bytes},
                         {"time_us", r.time_us},
                         {"algbw_gbps", r.algbw_gbps},
                         {"busbw_gbps", r.busbw_gbps},
                         {"busbw_factor", r.busbw_factor},
                         {"correct", r.correct}});
  }
  return j.dump(2) + "\n";
}

}  // namespace tandem::collectives
