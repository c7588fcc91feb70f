// Counters and histograms of tandem serve, and their Prometheus text form.
#include <cstdio>
#include <sstream>

#include "internal.h"

namespace tandem::serve {

void Histogram::observe(double v) {
  size_t i = 0;
  while (i < bounds.size() && v > bounds[i]) ++i;
  ++counts[i];
  sum += v;
  ++count;
}

uint64_t Histogram::count_above(double bound) const {
  uint64_t n = 0;
  for (size_t i = 0; i < counts.size(); ++i)
    if (i == bounds.size() || bounds[i] > bound) n += counts[i];
  return n;
}

uint64_t Metrics::errors() const {
  uint64_t n = 0;
  for (const auto& [code, count] : requests_by_code)
    if (code >= 400) n += count;
  return n;
}

namespace {

// Prometheus wants Go-style floats: "+Inf", and no locale.
std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

// Label values: backslash, double quote and newline escaped (exposition format).
std::string label(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

void write_histogram(std::ostringstream& os, const std::string& name, const std::string& help,
                     const Histogram& h) {
  os << "# HELP " << name << ' ' << help << "\n# TYPE " << name << " histogram\n";
  uint64_t cumulative = 0;
  for (size_t i = 0; i < h.bounds.size(); ++i) {
    cumulative += h.counts[i];
    os << name << "_bucket{le=\"" << num(h.bounds[i]) << "\"} " << cumulative << '\n';
  }
  os << name << "_bucket{le=\"+Inf\"} " << h.count << '\n';
  os << name << "_sum " << num(h.sum) << '\n' << name << "_count " << h.count << '\n';
}

Histogram make_histogram(std::vector<double> bounds) {
  Histogram h;
  h.counts.assign(bounds.size() + 1, 0);
  h.bounds = std::move(bounds);
  return h;
}

}  // namespace

std::string Metrics::to_prometheus() const {
  std::ostringstream os;
  os << "# HELP tandem_serve_info The model being served, its device and precision.\n"
     << "# TYPE tandem_serve_info gauge\n"
     << "tandem_serve_info{model=\"" << label(model) << "\",device=\"" << label(device) << "\",precision=\""
     << label(precision) << "\"} 1\n";
  os << "# HELP tandem_serve_requests_total HTTP requests answered, by status code.\n"
     << "# TYPE tandem_serve_requests_total counter\n";
  for (const auto& [code, n] : requests_by_code)
    os << "tandem_serve_requests_total{code=\"" << code << "\"} " << n << '\n';
  os << "# HELP tandem_serve_errors_total HTTP requests answered with status >= 400, by status code.\n"
     << "# TYPE tandem_serve_errors_total counter\n";
  for (const auto& [code, n] : requests_by_code)
    if (code >= 400) os << "tandem_serve_errors_total{code=\"" << code << "\"} " << n << '\n';
  write_histogram(os, "tandem_serve_request_latency_seconds", "Time from request parsed to response written.",
                  latency_seconds);
  write_histogram(os, "tandem_serve_batch_size", "Rows per forward pass.", batch_size);
  os << "# HELP tandem_serve_batches_total Forward passes run.\n# TYPE tandem_serve_batches_total counter\n"
     << "tandem_serve_batches_total " << batches << '\n'
     << "# HELP tandem_serve_rows_total Inputs answered by forward passes.\n"
     << "# TYPE tandem_serve_rows_total counter\ntandem_serve_rows_total " << rows << '\n'
     << "# HELP tandem_serve_oom_halvings_total Times an out-of-memory error halved the max batch.\n"
     << "# TYPE tandem_serve_oom_halvings_total counter\ntandem_serve_oom_halvings_total " << oom_halvings << '\n'
     << "# HELP tandem_serve_queue_depth Rows waiting for a forward pass.\n"
     << "# TYPE tandem_serve_queue_depth gauge\ntandem_serve_queue_depth " << queue_depth << '\n'
     << "# HELP tandem_serve_max_batch Current max batch (lower than configured after out-of-memory).\n"
     << "# TYPE tandem_serve_max_batch gauge\ntandem_serve_max_batch " << max_batch << '\n'
     << "# HELP tandem_serve_in_flight Prediction requests being handled.\n"
     << "# TYPE tandem_serve_in_flight gauge\ntandem_serve_in_flight " << in_flight << '\n';
  if (device_memory_bytes >= 0)
    os << "# HELP tandem_serve_device_memory_bytes Memory in use on the serving device (every process's).\n"
       << "# TYPE tandem_serve_device_memory_bytes gauge\ntandem_serve_device_memory_bytes{device=\"" << device
       << "\"} " << device_memory_bytes << '\n';
  return os.str();
}

namespace detail {

MetricsRegistry::MetricsRegistry(std::string model, std::string device, std::string precision) {
  // Latency from 0.5 ms (a batch-1 cnn on a quiet core) to 10 s (a queue of
  // requests behind a slow model).
  m_.latency_seconds =
      make_histogram({0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10});
  m_.batch_size = make_histogram({1, 2, 4, 8, 16, 32, 64, 128, 256});
  m_.model = std::move(model);
  m_.device = std::move(device);
  m_.precision = std::move(precision);
}

void MetricsRegistry::record_request(int status, double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  ++m_.requests_by_code[status];
  m_.latency_seconds.observe(seconds);
}

void MetricsRegistry::record_batch(int64_t rows) {
  std::lock_guard<std::mutex> lock(mu_);
  m_.batch_size.observe(static_cast<double>(rows));
  ++m_.batches;
  m_.rows += static_cast<uint64_t>(rows);
}

void MetricsRegistry::record_oom() {
  std::lock_guard<std::mutex> lock(mu_);
  ++m_.oom_halvings;
}

Metrics MetricsRegistry::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return m_;
}

}  // namespace detail
}  // namespace tandem::serve
