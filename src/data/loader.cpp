#include "tandem/data/loader.h"

#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/torch.h>

#include "tandem/util/check.h"
#include "tandem/util/clock.h"

namespace tandem::data {

Loader::Loader(DatasetPtr dataset, LoaderOptions opts) : dataset_(std::move(dataset)), opts_(std::move(opts)) {
  TANDEM_CHECK(opts_.batch_size >= 1, "--batch-size must be >= 1, got ", opts_.batch_size);
  TANDEM_CHECK(opts_.num_workers >= 0, "--num-workers must be >= 0, got ", opts_.num_workers);
  TANDEM_CHECK(opts_.buffer_size >= 1, "--buffer-size must be >= 1, got ", opts_.buffer_size);
}

Loader::~Loader() { stop_workers(); }

void Loader::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void Loader::start_epoch(std::vector<int64_t> indices, int64_t epoch, int64_t batch_size) {
  stop_workers();
  std::lock_guard<std::mutex> lock(mu_);
  TANDEM_CHECK(batch_size >= 0, "loader: negative batch size ", batch_size);
  if (batch_size > 0) opts_.batch_size = batch_size;
  indices_ = std::move(indices);
  epoch_ = epoch;
  batches_ = (static_cast<int64_t>(indices_.size()) + opts_.batch_size - 1) / opts_.batch_size;
  ready_.clear();
  next_claim_ = next_deliver_ = 0;
  stop_ = false;
  error_ = nullptr;
  for (int w = 0; w < opts_.num_workers; ++w) workers_.emplace_back([this, w] { worker(w); });
}

int64_t Loader::num_batches() const {
  std::lock_guard<std::mutex> lock(mu_);
  return batches_;
}

int Loader::buffer_fill() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(ready_.size());
}

LoaderStats Loader::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

Batch Loader::load(int64_t k) const {
  const int64_t begin = k * opts_.batch_size;
  const int64_t end = std::min<int64_t>(begin + opts_.batch_size, indices_.size());
  std::vector<int64_t> idx(indices_.begin() + begin, indices_.begin() + end);
  LoadContext ctx{epoch_, opts_.train, opts_.seed};
  Batch b;
  try {
    b = dataset_->get_batch(idx, ctx);
    if (b.indices.empty()) b.indices = idx;
    if (opts_.transform) opts_.transform(b);
  } catch (const std::exception& e) {
    TANDEM_FAIL("loading batch ", k, " (", idx.size(), " samples, first: ", dataset_->describe(idx.front()),
                ") failed: ", e.what());
  }
  const int64_t n = static_cast<int64_t>(idx.size());
  if (opts_.static_shapes && n < opts_.batch_size) {
    // Pad, do not drop: masked rows carry no loss and no accuracy.
    auto shape = b.input.sizes().vec();
    shape[0] = opts_.batch_size - n;
    b.input = torch::cat({b.input, torch::zeros(shape, b.input.options())});
    b.target = torch::cat({b.target, torch::zeros({opts_.batch_size - n}, b.target.options())});
    b.mask = torch::arange(opts_.batch_size) < n;
  }
  if (opts_.pin_memory || opts_.device.is_cuda()) {
    b.input = b.input.pin_memory();
    b.target = b.target.pin_memory();
    if (b.mask.defined()) b.mask = b.mask.pin_memory();
  }
  if (opts_.device.is_cuda()) {
    // Note [Data-device stream]: upload on a pool stream, never the training
    // stream, so the copy overlaps the step running on the default stream.
    c10::impl::VirtualGuardImpl impl(opts_.device.type());
    c10::Stream stream = impl.getStreamFromGlobalPool(opts_.device);
    c10::StreamGuard guard(stream);
    b.input = b.input.to(opts_.device, /*non_blocking=*/true);
    b.target = b.target.to(opts_.device, /*non_blocking=*/true);
    if (b.mask.defined()) b.mask = b.mask.to(opts_.device, /*non_blocking=*/true);
    b.ready = std::make_shared<c10::Event>(opts_.device.type());
    b.ready->record(stream);
  }
  return b;
}

void make_ready(Batch& b, c10::Device consumer) {
  if (!b.ready) return;
  const c10::Device dev = b.input.device();
  c10::impl::VirtualGuardImpl impl(dev.type());
  std::vector<c10::Stream> users{impl.getStream(dev)};
  if (consumer.is_cuda() && consumer != dev) users.push_back(impl.getStream(consumer));
  for (const auto& s : users) {
    b.ready->block(s);
    for (const at::Tensor* t : {&b.input, &b.target, &b.mask})
      if (t->defined() && t->device() == dev) impl.recordDataPtrOnStream(t->storage().data_ptr(), s);
  }
  b.ready.reset();
}

void Loader::worker(int id) {
  const std::string track = "loader " + std::to_string(id);
  for (;;) {
    int64_t k;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] {
        return stop_ || next_claim_ >= batches_ || next_claim_ < next_deliver_ + opts_.buffer_size;
      });
      if (stop_ || next_claim_ >= batches_) return;
      k = next_claim_++;
    }
    auto t0 = Clock::now();
    try {
      Batch b = load(k);
      auto t1 = Clock::now();
      if (opts_.trace) opts_.trace->span("load batch " + std::to_string(k), track, t0, t1);
      std::lock_guard<std::mutex> lock(mu_);
      stats_.worker_busy_seconds += seconds(t1 - t0);
      ready_.emplace(k, std::move(b));
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
      stop_ = true;
    }
    cv_.notify_all();
  }
}

bool Loader::wait_ready(int batches, double max_seconds) {
  std::unique_lock<std::mutex> lock(mu_);
  const int64_t want = std::min<int64_t>(std::min(batches, opts_.buffer_size), batches_);
  if (opts_.num_workers == 0) return true;
  return cv_.wait_for(lock, std::chrono::duration<double>(max_seconds),
                      [&] { return error_ || static_cast<int64_t>(ready_.size()) >= want; });
}

std::optional<Batch> Loader::next() {
  if (opts_.num_workers == 0) {
    if (next_deliver_ >= batches_) return std::nullopt;
    auto t0 = Clock::now();
    Batch b = load(next_deliver_++);
    auto t1 = Clock::now();
    if (opts_.trace) opts_.trace->span("load (serial)", "train", t0, t1);
    std::lock_guard<std::mutex> lock(mu_);
    stats_.wait_seconds += seconds(t1 - t0);
    stats_.worker_busy_seconds += seconds(t1 - t0);
    stats_.fill_samples++;
    stats_.batches++;
    return b;
  }
  std::unique_lock<std::mutex> lock(mu_);
  if (next_deliver_ >= batches_) return std::nullopt;
  stats_.fill_sum += static_cast<double>(ready_.size());
  stats_.fill_samples++;
  auto t0 = Clock::now();
  cv_.wait(lock, [&] { return error_ || ready_.count(next_deliver_) > 0; });
  auto t1 = Clock::now();
  if (error_) std::rethrow_exception(error_);
  stats_.wait_seconds += seconds(t1 - t0);
  if (opts_.trace && t1 - t0 > std::chrono::microseconds(50)) opts_.trace->span("wait for data", "train", t0, t1);
  auto it = ready_.find(next_deliver_);
  Batch b = std::move(it->second);
  ready_.erase(it);
  ++next_deliver_;
  stats_.batches++;
  lock.unlock();
  cv_.notify_all();
  return b;
}

}  // namespace tandem::data
