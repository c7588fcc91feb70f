#pragma once
// Completion of one shared-memory operation, shared by the engine thread that
// runs it and the Request its caller waits on (internal to comm/shm).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <string>

#include "tandem/comm/communicator.h"

namespace tandem::comm::shm {

class OpState : public Request {
 public:
  OpState(std::string what, std::int64_t spin_ns) : what_(std::move(what)), spin_ns_(spin_ns) {}
  void complete(std::exception_ptr error = nullptr, int source = -1) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      error_ = std::move(error);
      source_ = source;
      done_.store(true, std::memory_order_release);
    }
    cv_.notify_all();
  }
  bool done() const { return done_.load(std::memory_order_acquire); }
  void wait(Milliseconds timeout) override {
    if (!done() && spin_ns_ > 0) {
      auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(std::min<std::int64_t>(spin_ns_, 20000));
      while (!done() && std::chrono::steady_clock::now() < until) {
      }
    }
    std::unique_lock<std::mutex> lock(mu_);
    // A second of margin: the engine's own deadline (same timeout, started
    // when the operation ran) fires first, with the message naming the rank.
    if (!cv_.wait_for(lock, timeout + std::chrono::seconds(1), [&] { return done(); }))
      throw CommError(what_ + " did not complete within " + std::to_string(timeout.count()) +
                      " ms (a peer rank stopped responding; raise --timeout if it is only slow)");
    if (error_) std::rethrow_exception(error_);
  }
  int source_rank() const override { return source_; }
  const std::string& what() const { return what_; }

 private:
  std::string what_;
  std::int64_t spin_ns_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> done_{false};
  std::exception_ptr error_;
  int source_ = -1;
};
using OpStatePtr = std::shared_ptr<OpState>;

}  // namespace tandem::comm::shm
