#pragma once
// tandem serve: an HTTP model service with dynamic batching, and the load
// generator that measures it (`tandem bench serve`).
//
// Threads (see Note [Serve threads] in src/serve/server.cpp):
//  - HTTP worker threads (ServeOptions::http_threads) parse and validate a
//    request, turn it into normalised input rows, queue them and wait.
//  - One inference thread per predictor (a model instance: `tandem serve
//    --instances`, or one per device) takes batches off the shared queue and
//    runs them. A batch runs when it holds
//    max_batch rows or its oldest row has waited max_wait_ms.
// Failure policy:
//  - Bad input (malformed HTTP, undecodable image, wrong size) answers 4xx
//    with {"error": "..."} and costs the service nothing.
//  - A full queue answers 503 with Retry-After; nothing is queued.
//  - Out of memory in a batch halves the max batch size and reruns the same
//    rows in smaller batches; a row fails (507) only if batch 1 runs out too.
//  - Any other exception from the predictor fails that batch's requests (500)
//    and the service goes on.
// Thread-safety: start(), wait(), stop() and snapshot() may be called from any
// thread; stop() is idempotent. Never call them from a signal handler: the CLI
// waits for SIGTERM on a thread of its own (sigwait) and calls stop() there.
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace tandem::models {
struct Model;
}

namespace tandem::serve {

// Maps a float [B, C, H, W] batch of normalised inputs to logits [B, classes].
// Each predictor is called from its own inference thread only. Several
// predictors may share one model (instances): its forward must then only
// read it, as an eval-mode forward under InferenceMode does. Precision and
// device policies (bf16, int8, CUDA) wrap this function; the server sees
// only it.
using Predictor = std::function<at::Tensor(const at::Tensor&)>;

// The model's forward under c10::InferenceMode, after module->eval().
Predictor make_predictor(const models::Model& model);

// Fault injection by wrapping the seam (for tests and `TANDEM_TEST_OOM`):
// the first `n` calls with a batch larger than 1 throw std::bad_alloc instead
// of running `inner`.
Predictor fail_first_batches_with_oom(Predictor inner, int n);

// Fashion-MNIST's ten class names, in label order.
const std::vector<std::string>& fashion_mnist_classes();

struct ServeOptions {
  std::string host = "127.0.0.1";  // loopback unless the user opens it up
  int port = 8080;                 // 0 = an ephemeral port; start() returns it
  int max_batch = 16;              // rows per forward pass
  double max_wait_ms = 5;          // how long the oldest queued row may wait for company
  int max_queue = 1024;            // rows queued at most; beyond it 503 + Retry-After
  double max_body_mb = 8;          // request bodies above it: 413
  // Input geometry and normalisation: (x/255 - mean[c]) / stddev[c], as the
  // Fashion-MNIST training data (data/idx.h). One value or one per channel.
  std::vector<int64_t> input_shape{1, 28, 28};  // [C, H, W]
  std::vector<double> mean{0.2860};
  std::vector<double> stddev{0.3530};
  // Names by class index; empty = Fashion-MNIST's when the model has 10
  // classes, else "0", "1", ...
  std::vector<std::string> class_names;
  // HTTP worker threads. A keep-alive connection holds one for its lifetime,
  // so fewer threads than concurrent clients caps the batch size.
  int http_threads = 64;
  // How long an HTTP thread waits for its rows to be answered before 504.
  std::chrono::milliseconds request_timeout{30000};
  // How long stop() waits for requests in flight to be answered.
  std::chrono::milliseconds drain_timeout{30000};
  int retry_after_s = 1;  // the Retry-After of a 503
  // One line per request: time, client, method, path, status, latency, the
  // batch it rode in. Written whole under the server's lock. nullptr or
  // quiet: none.
  std::ostream* access_log = &std::cerr;
  bool quiet = false;
  // Start, stop and out-of-memory halvings (not silenced by quiet); nullptr: none.
  std::ostream* event_log = &std::cerr;
  // Labels for /metrics and /healthz.
  std::string model_name = "model";
  std::string device = "cpu";
  std::string precision = "fp32";
  // Intra-op threads of each predictor, for the start-up line; 0: this thread's.
  int intra_op_threads = 0;
  // Device memory in use (bytes) for /metrics; nullptr or a negative answer: not shown.
  std::function<int64_t()> device_memory;
};

// Buckets are upper bounds (Prometheus "le"); counts[i] is the number of
// observations <= bounds[i] and > bounds[i-1]; counts.back() is +Inf.
struct Histogram {
  std::vector<double> bounds;
  std::vector<uint64_t> counts;
  double sum = 0;
  uint64_t count = 0;
  void observe(double v);
  // Observations above `bound` (which should be one of bounds).
  uint64_t count_above(double bound) const;
};

struct Metrics {
  std::map<int, uint64_t> requests_by_code;  // every answered HTTP request, by status
  Histogram latency_seconds;                 // request latency, all endpoints
  Histogram batch_size;                      // rows per forward pass
  uint64_t batches = 0;
  uint64_t rows = 0;
  uint64_t oom_halvings = 0;
  int64_t queue_depth = 0;  // rows waiting now
  int64_t max_batch = 0;    // now (smaller than configured after OOM)
  int64_t in_flight = 0;    // prediction requests being handled now
  int64_t device_memory_bytes = -1;  // CUDA: memory in use on the device; -1: not reported
  std::string model, device, precision;
  uint64_t errors() const;  // requests answered with status >= 400
  std::string to_prometheus() const;
};

// The service. Owns its threads; the destructor stops it.
class Server {
 public:
  Server(Predictor predictor, ServeOptions options);
  // Several predictors (instances, or devices), each with its own inference thread, all fed from one queue.
  Server(std::vector<Predictor> predictors, ServeOptions options);
  // make_predictor(model).
  Server(const models::Model& model, ServeOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds and starts serving; returns the bound port. Throws tandem::Error
  // naming host:port when it cannot bind, or when an option is out of range.
  // Sets SIGPIPE to SIG_IGN if the process still has the default action
  // (httplib writes without MSG_NOSIGNAL; a client hanging up must not kill us).
  int start();
  // Blocks until the server has stopped.
  void wait();
  // Refuses new predictions (503), answers the ones in flight (at most
  // drain_timeout), then closes the listener and joins every thread.
  void stop();
  Metrics snapshot() const;
  int port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---- Load generator (`tandem bench serve`) ----

struct LoadOptions {
  std::string url = "http://127.0.0.1:8080";  // scheme://host:port
  std::string path = "/v1/predict";
  int clients = 64;         // concurrent connections, one thread each
  int64_t requests = 10000; // in all, over every client
  int64_t warmup = 0;       // requests sent first and not counted
  std::chrono::milliseconds timeout{30000};  // per request (connect, read, write)
};

struct LoadReport {
  int64_t requests = 0;  // counted (after warmup)
  int64_t ok = 0;        // 2xx
  int64_t errors = 0;    // everything else, transport failures included
  std::map<int, int64_t> errors_by_code;  // status; 0 = transport failure
  double seconds = 0;
  double throughput = 0;  // requests/s
  double mean_ms = 0, p50_ms = 0, p90_ms = 0, p99_ms = 0, max_ms = 0;
  std::string first_error;  // the first failure seen, for the log
};

// Sends `requests` POSTs of bodies[i % bodies.size()] with `content_type`
// from `clients` keep-alive connections. Never throws for a failed request
// (it is counted); throws tandem::Error for an empty body list or bad options.
LoadReport run_load(const LoadOptions& options, const std::vector<std::vector<uint8_t>>& bodies,
                    const std::string& content_type);
std::string to_json(const LoadReport& report);  // one JSON object

}  // namespace tandem::serve
