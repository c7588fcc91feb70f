#pragma once
// RingSync: the DDP buckets and hooks, each bucket summed by tandem's own ring
// all-reduce (collectives/ring_allreduce.h) instead of the c10d collective.
// A dedicated communication thread runs the rings in bucket order, so they
// overlap backward exactly like the c10d path. The thread owns all
// point-to-point traffic of this communicator while the sync object lives.
#include <condition_variable>
#include <deque>
#include <future>
#include <thread>

#include "tandem/collectives/ring_allreduce.h"
#include "tandem/sync/ddp.h"

namespace tandem::sync {

class RingSync : public BucketedSync {
 public:
  RingSync(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, DdpOptions opts = {},
           collectives::RingOptions ring = {});
  ~RingSync() override;
  std::string name() const override { return "all_reduce"; }

 protected:
  comm::RequestPtr launch(at::Tensor& flat) override;

 private:
  struct Job {
    at::Tensor flat;
    std::promise<void> done;
  };
  void run();
  collectives::RingOptions ring_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace tandem::sync
