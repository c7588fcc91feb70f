// The load generator behind `tandem bench serve`: closed-loop clients, each on
// its own keep-alive connection, sending the next request as soon as the last
// one is answered. Throughput is answered requests over wall time; latency is
// per request, client side (connect included when a connection is reopened).
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "tandem/serve/server.h"
#include "tandem/util/check.h"

namespace tandem::serve {
namespace {

using Clock = std::chrono::steady_clock;

double percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  // Nearest rank: the smallest value with at least q of the samples at or below it.
  const size_t rank = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted.size())));
  return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
}

struct ClientResult {
  std::vector<double> latencies_ms;
  int64_t ok = 0;
  std::map<int, int64_t> errors;
  std::string first_error;
};

}  // namespace

LoadReport run_load(const LoadOptions& o, const std::vector<std::vector<uint8_t>>& bodies,
                    const std::string& content_type) {
  TANDEM_CHECK(!bodies.empty(), "bench serve: no request bodies given; pass at least one image");
  TANDEM_CHECK(o.clients >= 1, "bench serve: --clients must be at least 1, got ", o.clients);
  TANDEM_CHECK(o.requests >= 1, "bench serve: --requests must be at least 1, got ", o.requests);
  TANDEM_CHECK(o.warmup >= 0, "bench serve: --warmup must be >= 0, got ", o.warmup);
  {
    httplib::Client probe(o.url);
    TANDEM_CHECK(probe.is_valid(), "bench serve: cannot use --url '", o.url,
                 "'; give scheme://host:port, e.g. http://127.0.0.1:8080");
  }
  std::vector<std::string> payloads;
  for (const auto& b : bodies) payloads.emplace_back(b.begin(), b.end());

  // One phase: `count` requests over o.clients connections, each client
  // taking the next request number until none are left. Warm-up is a phase of
  // its own, so the measured one never overlaps it (it pays its own connects).
  auto phase = [&](int64_t count, std::vector<ClientResult>& results) {
    std::atomic<int64_t> next{0};
    results.assign(static_cast<size_t>(o.clients), ClientResult{});
    auto client = [&](size_t id) {
      auto& out = results[id];
      httplib::Client cli(o.url);
      cli.set_keep_alive(true);
      cli.set_tcp_nodelay(true);
      const auto us = std::chrono::duration_cast<std::chrono::microseconds>(o.timeout).count();
      cli.set_connection_timeout(us / 1000000, us % 1000000);
      cli.set_read_timeout(us / 1000000, us % 1000000);
      cli.set_write_timeout(us / 1000000, us % 1000000);
      for (;;) {
        const int64_t i = next.fetch_add(1);
        if (i >= count) break;
        const auto& body = payloads[static_cast<size_t>(i) % payloads.size()];
        const auto t0 = Clock::now();
        auto res = cli.Post(o.path.c_str(), body, content_type.c_str());
        out.latencies_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
        const int status = res ? res->status : 0;
        if (status >= 200 && status < 300) {
          ++out.ok;
          continue;
        }
        ++out.errors[status];
        if (out.first_error.empty())
          out.first_error = res ? "HTTP " + std::to_string(status) + ": " + res->body
                                : "transport: " + httplib::to_string(res.error());
      }
    };
    std::vector<std::thread> threads;
    for (int c = 0; c < o.clients; ++c) threads.emplace_back(client, static_cast<size_t>(c));
    for (auto& t : threads) t.join();
  };
  std::vector<ClientResult> results;
  if (o.warmup > 0) phase(o.warmup, results);
  const auto start = Clock::now();
  phase(o.requests, results);
  const auto end = Clock::now();

  LoadReport r;
  std::vector<double> all;
  for (auto& c : results) {
    all.insert(all.end(), c.latencies_ms.begin(), c.latencies_ms.end());
    r.ok += c.ok;
    for (const auto& [code, n] : c.errors) {
      r.errors_by_code[code] += n;
      r.errors += n;
    }
    if (r.first_error.empty()) r.first_error = c.first_error;
  }
  r.requests = static_cast<int64_t>(all.size());
  r.seconds = std::chrono::duration<double>(end - start).count();
  r.throughput = r.seconds > 0 ? static_cast<double>(r.requests) / r.seconds : 0;
  std::sort(all.begin(), all.end());
  if (!all.empty()) {
    double sum = 0;
    for (double v : all) sum += v;
    r.mean_ms = sum / static_cast<double>(all.size());
    r.p50_ms = percentile(all, 0.50);
    r.p90_ms = percentile(all, 0.90);
    r.p99_ms = percentile(all, 0.99);
    r.max_ms = all.back();
  }
  return r;
}

std::string to_json(const LoadReport& r) {
  nlohmann::json j{{"requests", r.requests}, {"ok", r.ok},         {"errors", r.errors},
                   {"seconds", r.seconds},   {"throughput", r.throughput}, {"mean_ms", r.mean_ms},
                   {"p50_ms", r.p50_ms},     {"p90_ms", r.p90_ms}, {"p99_ms", r.p99_ms},
                   {"max_ms", r.max_ms}};
  nlohmann::json by_code = nlohmann::json::object();
  for (const auto& [code, n] : r.errors_by_code) by_code[code == 0 ? "transport" : std::to_string(code)] = n;
  j["errors_by_code"] = by_code;
  if (!r.first_error.empty()) j["first_error"] = r.first_error;
  return j.dump();
}

}  // namespace tandem::serve
