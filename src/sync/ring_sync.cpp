#include "tandem/sync/ring_sync.h"

#include "tandem/util/check.h"

namespace tandem::sync {
namespace {

class FutureRequest : public comm::Request {
 public:
  explicit FutureRequest(std::future<void> f) : f_(std::move(f)) {}
  void wait(comm::Milliseconds timeout) override {
    if (f_.wait_for(timeout) != std::future_status::ready)
      throw CommError("ring all-reduce did not finish within the timeout (a peer rank stopped responding)");
    f_.get();  // rethrows the ring's CommError
  }

 private:
  std::future<void> f_;
};

}  // namespace

RingSync::RingSync(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, DdpOptions opts,
                   collectives::RingOptions ring)
    : BucketedSync(std::move(module), std::move(comm), opts), ring_(ring) {
  thread_ = std::thread([this] { run(); });
}

RingSync::~RingSync() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

comm::RequestPtr RingSync::launch(at::Tensor& flat) {
  auto job = std::make_shared<Job>();
  job->flat = flat;
  auto req = std::make_shared<FutureRequest>(job->done.get_future());
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(job);
  }
  cv_.notify_one();
  return req;
}

void RingSync::run() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      job = queue_.front();
      queue_.pop_front();
    }
    try {
      collectives::ring_all_reduce(*comm_, job->flat, ring_);
      job->done.set_value();
    } catch (...) {
      job->done.set_exception(std::current_exception());
    }
  }
}

}  // namespace tandem::sync
