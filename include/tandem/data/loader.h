#pragma once
// Loader: sampler indices -> loader workers -> bounded prefetch buffer.
//
// Ownership: the Loader owns its worker threads; they run from start_epoch()
// until the epoch's batches are all produced, the Loader is destroyed, or a
// worker fails. Batches are delivered in sampler order whatever the number of
// workers. At most `buffer_size` batches exist at once (ready or being built),
// so memory stays under buffer_size x batch bytes. next() blocks only when the
// buffer is empty; that wait is the trainer's data stall, and it is measured.
// A worker's exception stops the epoch and is rethrown by next() with the
// batch's samples named.
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "tandem/data/dataset.h"
#include "tandem/obs/trace.h"

namespace tandem::data {

struct LoaderOptions {
  int64_t batch_size = 64;
  int num_workers = 2;   // 0: batches are loaded in the caller's thread (serial)
  int buffer_size = 50;  // ready batches held at most (>= 1)
  bool static_shapes = false;  // pad the last batch to batch_size, with a mask
  bool train = true;
  uint64_t seed = 0;
  bool pin_memory = false;     // page-locked host batches, for non-blocking copies to CUDA
  // The data device. CUDA: each worker uploads its batch with a non-blocking
  // copy on a stream of its own (not the training stream) and records an event;
  // make_ready() makes the consumer's stream wait for it.
  c10::Device device{c10::kCPU};
  obs::Trace* trace = nullptr;
  // Extra per-batch work run by the worker after loading (augmentation,
  // or a synthetic load cost in benchmarks).
  std::function<void(Batch&)> transform;
};

// Cumulative counters since the Loader was built (or reset_stats()).
struct LoaderStats {
  double wait_seconds = 0;         // caller blocked in next() on an empty buffer
  double worker_busy_seconds = 0;  // summed over workers
  double fill_sum = 0;             // buffer fill sampled at each next()
  int64_t fill_samples = 0;
  int64_t batches = 0;
};

// Before using a batch on `consumer` (the model device): makes the current
// streams of the batch's device and of `consumer` wait for the worker's upload,
// and tells the CUDA caching allocator that those streams use the batch's
// memory. A no-op for CPU batches.
void make_ready(Batch& batch, c10::Device consumer);

class Loader {
 public:
  Loader(DatasetPtr dataset, LoaderOptions opts);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  // Starts producing this epoch's batches from `indices` (one rank's shard);
  // batch_size > 0 replaces the options' from now on (--balance changes it).
  // Batches of an earlier start not yet taken are dropped.
  void start_epoch(std::vector<int64_t> indices, int64_t epoch, int64_t batch_size = 0);
  int64_t num_batches() const;
  // Controlled start: blocks until `batches` are ready or `max_seconds` pass.
  // Returns true when the buffer filled, false on the time limit.
  bool wait_ready(int batches, double max_seconds);
  // Next batch in order; nullopt after the epoch's last one.
  std::optional<Batch> next();
  int buffer_fill() const;
  LoaderStats stats() const;

 private:
  Batch load(int64_t k) const;
  void worker(int id);
  void stop_workers();

  DatasetPtr dataset_;
  LoaderOptions opts_;
  std::vector<int64_t> indices_;
  int64_t epoch_ = 0;
  int64_t batches_ = 0;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<int64_t, Batch> ready_;
  int64_t next_claim_ = 0, next_deliver_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
  std::vector<std::thread> workers_;
  LoaderStats stats_;
};

}  // namespace tandem::data
