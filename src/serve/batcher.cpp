// The request queue and its inference threads.
//
// Note [Dynamic batching]
// Rows (one per image; a request with "instances" brings several) wait in one
// FIFO queue. An inference thread takes up to max_batch rows as soon as the
// queue holds max_batch, or when the oldest row has waited max_wait, whichever
// comes first; under load batches fill at once and nobody waits, when idle a
// lone request pays at most max_wait. While stopping, nothing waits for
// company: the queue is run out as fast as it goes. A request's rows are
// admitted together or not at all, so a 503 never leaves half a request queued.
//
// Out of memory (std::bad_alloc, or a c10::Error saying "out of memory", as
// CUDA's caching allocator throws) in a batch of n rows lowers max_batch to
// n/2 for good and runs the same rows again in batches of that size. Only a
// single row that runs out of memory on its own is answered with an error
// (507). The cause is usually a bigger model or precision than the memory
// plan assumed, and shrinking once is cheaper than failing every big batch.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <new>
#include <sstream>

#include "internal.h"
#include "tandem/util/check.h"

namespace tandem::serve::detail {
namespace {

bool is_out_of_memory(const c10::Error& e) {
  return std::string(e.what_without_backtrace()).find("out of memory") != std::string::npos;
}

// Answers rows [begin, end) with an error; the first error of a request wins.
void fail_rows(std::vector<Row>& rows, size_t begin, size_t end, int status, const std::string& error) {
  for (size_t i = begin; i < end; ++i) {
    auto& p = *rows[i].owner;
    std::lock_guard<std::mutex> lock(p.mu);
    if (p.status == 200) {
      p.status = status;
      p.error = error;
    }
    if (--p.remaining == 0) p.cv.notify_all();
  }
}

}  // namespace

Batcher::Batcher(std::vector<Predictor> predictors, int64_t max_batch, double max_wait_ms, int64_t max_queue,
                 MetricsRegistry& metrics, std::function<void(const std::string&)> event_log)
    : predictors_(std::move(predictors)),
      max_batch_(max_batch),
      max_wait_(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(max_wait_ms))),
      max_queue_(max_queue),
      metrics_(metrics),
      event_log_(std::move(event_log)) {
  TANDEM_ASSERT(!predictors_.empty());
  for (size_t i = 0; i < predictors_.size(); ++i) threads_.emplace_back([this, i] { loop(i); });
}

Batcher::~Batcher() { stop(); }

Admit Batcher::submit(std::vector<at::Tensor> rows, const std::shared_ptr<Pending>& owner) {
  const auto now = Clock::now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return Admit::kStopping;
    if (static_cast<int64_t>(queue_.size() + rows.size()) > max_queue_) return Admit::kFull;
    for (size_t i = 0; i < rows.size(); ++i) queue_.push_back(Row{std::move(rows[i]), owner, i, now});
  }
  // Every waiter re-checks: one may be waiting for rows, another for a full batch.
  cv_.notify_all();
  return Admit::kQueued;
}

void Batcher::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

int64_t Batcher::queue_depth() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(queue_.size());
}

void Batcher::lower_max_batch(int64_t to) {
  int64_t cur = max_batch_.load();
  // Only ever lower: another inference thread may have halved it already.
  while (to < cur && !max_batch_.compare_exchange_weak(cur, to)) {
  }
}

void Batcher::loop(size_t worker) {
  // No autograd state for anything this thread runs, whatever the predictor does.
  c10::InferenceMode inference_mode;
  auto& predict = predictors_[worker];
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, and drained
    // Wait for a full batch or the oldest row's deadline (Note [Dynamic batching]).
    while (!stopping_ && !queue_.empty() && static_cast<int64_t>(queue_.size()) < max_batch_.load()) {
      const auto deadline = queue_.front().enqueued + max_wait_;
      if (Clock::now() >= deadline) break;
      cv_.wait_until(lock, deadline);
    }
    if (queue_.empty()) continue;  // another inference thread took them
    const size_t n = std::min<size_t>(queue_.size(), static_cast<size_t>(max_batch_.load()));
    std::vector<Row> rows;
    rows.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      rows.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    lock.unlock();
    run(predict, rows);
    rows.clear();  // drop the inputs before waiting again
    lock.lock();
  }
}

void Batcher::run(Predictor& predict, std::vector<Row>& rows) {
  size_t begin = 0;
  while (begin < rows.size()) {
    const size_t n = std::min<size_t>(rows.size() - begin, static_cast<size_t>(max_batch_.load()));
    const size_t end = begin + n;
    bool oom = false;
    std::string oom_what;
    try {
      std::vector<at::Tensor> inputs;
      inputs.reserve(n);
      for (size_t i = begin; i < end; ++i) inputs.push_back(rows[i].input);
      at::Tensor logits = predict(at::stack(inputs));
      TANDEM_CHECK(logits.defined() && logits.dim() == 2 && logits.size(0) == static_cast<int64_t>(n),
                   "the predictor returned ", logits.defined() ? logits.sizes() : at::IntArrayRef{},
                   " for a batch of ", n, " rows; it must return logits [", n, ", classes]");
      at::Tensor probs = at::softmax(logits.to(at::kCPU, at::kFloat), 1).contiguous();
      metrics_.record_batch(static_cast<int64_t>(n));
      const int64_t k = probs.size(1);
      const float* data = probs.data_ptr<float>();
      for (size_t i = begin; i < end; ++i) {
        auto& p = *rows[i].owner;
        const float* row = data + static_cast<int64_t>(i - begin) * k;
        std::lock_guard<std::mutex> lock(p.mu);
        p.probs[rows[i].index].assign(row, row + k);
        p.batch_size = std::max<int64_t>(p.batch_size, static_cast<int64_t>(n));
        if (--p.remaining == 0) p.cv.notify_all();
      }
    } catch (const std::bad_alloc&) {
      oom = true;
      oom_what = "std::bad_alloc";
    } catch (const c10::Error& e) {
      if (!is_out_of_memory(e)) {
        fail_rows(rows, begin, end, 500, std::string("inference failed: ") + e.what_without_backtrace());
      } else {
        oom = true;
        oom_what = e.what_without_backtrace();
      }
    } catch (const std::exception& e) {
      fail_rows(rows, begin, end, 500, std::string("inference failed: ") + e.what());
    }
    if (!oom) {
      begin = end;
      continue;
    }
    if (n == 1) {
      fail_rows(rows, begin, end, 507,
                "out of memory running a single input; the model does not fit this device: serve it on one "
                "with more free memory or at a lower precision");
      if (event_log_) event_log_("out of memory at batch size 1 (" + oom_what + "): one request failed with 507");
      begin = end;
      continue;
    }
    const int64_t halved = std::max<int64_t>(1, static_cast<int64_t>(n) / 2);
    lower_max_batch(halved);
    metrics_.record_oom();
    if (event_log_) {
      std::ostringstream os;
      os << "out of memory in a batch of " << n << " rows (" << oom_what << "); max batch is now "
         << max_batch_.load() << ", running the same rows again";
      event_log_(os.str());
    }
    // begin stays: the same rows run again in smaller batches.
  }
}

}  // namespace tandem::serve::detail
