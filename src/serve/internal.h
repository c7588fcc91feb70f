#pragma once
// Internals of tandem serve shared by its translation units: the metrics
// registry and the batcher. Not installed.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <ATen/core/Tensor.h>

#include "tandem/serve/server.h"

namespace tandem::serve::detail {

using Clock = std::chrono::steady_clock;

// Counters behind /metrics. One mutex: a few increments per request are far
// below the cost of the request itself.
class MetricsRegistry {
 public:
  MetricsRegistry(std::string model, std::string device, std::string precision);
  void record_request(int status, double seconds);
  void record_batch(int64_t rows);
  void record_oom();
  // The counters; the caller fills in the gauges (queue depth, max batch, in flight).
  Metrics snapshot() const;

 private:
  mutable std::mutex mu_;
  Metrics m_;
};

// One HTTP request's rows and, once the inference thread is done, their
// answers. Shared by the HTTP thread that waits and the rows in the queue, so
// a request that timed out leaves nothing dangling.
struct Pending {
  explicit Pending(size_t rows) : probs(rows), remaining(static_cast<int64_t>(rows)) {}
  std::mutex mu;
  std::condition_variable cv;
  // Probabilities per row, copied out of the batch's tensor by the inference
  // thread: the HTTP thread then shares no tensor storage with other requests.
  std::vector<std::vector<float>> probs;
  int64_t remaining;
  int64_t batch_size = 0;  // largest batch any of its rows rode in
  int status = 200;        // first failure wins
  std::string error;
};

struct Row {
  at::Tensor input;  // float [C, H, W], normalised
  std::shared_ptr<Pending> owner;
  size_t index = 0;  // into owner->probs
  Clock::time_point enqueued;
};

enum class Admit { kQueued, kFull, kStopping };

// The queue and its inference threads. See Note [Dynamic batching] in batcher.cpp.
class Batcher {
 public:
  Batcher(std::vector<Predictor> predictors, int64_t max_batch, double max_wait_ms, int64_t max_queue,
          MetricsRegistry& metrics, std::function<void(const std::string&)> event_log);
  ~Batcher();
  // All of the request's rows are queued, or none (kFull: they would take the
  // queue past max_queue; kStopping: stop() has begun).
  Admit submit(std::vector<at::Tensor> rows, const std::shared_ptr<Pending>& owner);
  // Runs what is queued, then joins the inference threads. Idempotent.
  void stop();
  int64_t queue_depth() const;
  int64_t max_batch() const { return max_batch_.load(); }

 private:
  void loop(size_t worker);
  void run(Predictor& predict, std::vector<Row>& rows);
  void lower_max_batch(int64_t to);

  std::vector<Predictor> predictors_;
  std::atomic<int64_t> max_batch_;
  const Clock::duration max_wait_;
  const int64_t max_queue_;
  MetricsRegistry& metrics_;
  std::function<void(const std::string&)> event_log_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Row> queue_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace tandem::serve::detail
