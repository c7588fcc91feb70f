#pragma once
// DistributedDataParallel for LibTorch C++ modules.
//
// On construction: checks that every rank holds the same parameter shapes
// (error names the first mismatch), broadcasts parameters and buffers from
// rank 0, cuts the parameters into buckets and registers a gradient hook on
// each parameter.
//
// Note [Bucket order]: parameters are bucketed in reverse registration order,
// because backward produces the gradients of the last layers first; a bucket
// is all-reduced asynchronously as soon as all its gradients have arrived, so
// communication of late layers overlaps the backward of early ones. Buckets
// are launched strictly in index order on every rank (collectives must match
// across ranks), so a bucket that is ready early waits for its predecessors.
// Parameters that get no gradient in a step are filled with zeros in finish().
//
// Gradient accumulation: begin_step(false) turns the hooks off, gradients
// accumulate in .grad() locally; on the synchronising micro-step the hook adds
// the accumulated .grad() to the incoming gradient, so one all-reduce carries
// the sum of all micro-steps.
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "tandem/comm/communicator.h"
#include "tandem/sync/compress.h"
#include "tandem/sync/gradient_sync.h"
#include "tandem/sync/ps.h"

namespace tandem::sync {

struct DdpOptions {
  double bucket_mb = 25.0;
  // The first bucket (the last layers, whose gradients are ready first) closes
  // after min(first_bucket_mb, bucket_mb), as PyTorch DDP does, so that its
  // all-reduce starts while the rest of backward still runs.
  double first_bucket_mb = 1.0;
  bool broadcast_parameters = true;
  // What travels on the wire (sync/compress.h). A compressed bucket is
  // averaged on the synchroniser's communication thread by its own
  // BucketCompressor, in bucket order, while backward goes on.
  CompressSpec compress;
  uint64_t seed = 0;  // the same on every rank: PowerSGD's first Q, int8's rounding
};

class CommThread;  // ddp.cpp: runs closures in order on one thread

// The buckets and hooks shared by DDP and the ring. `ring`: compressors'
// collectives (and the ring's buckets) use tandem's ring, else c10d's.
class BucketedSync : public GradientSync {
 public:
  BucketedSync(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, DdpOptions opts, bool ring,
               collectives::RingOptions ring_opts = {});
  ~BucketedSync() override;
  void begin_step(bool sync) override;
  void finish() override;
  size_t num_buckets() const { return buckets_.size(); }
  // Parameter indices (registration order) of each bucket, for tests and logs.
  std::vector<std::vector<size_t>> bucket_layout() const;
  // The compressor of bucket i (nullptr when uncompressed), for tests.
  const BucketCompressor* compressor(size_t i) const { return buckets_.at(i).compressor.get(); }

 protected:
  // Starts reducing (summing) an uncompressed `flat` across ranks.
  virtual comm::RequestPtr launch(at::Tensor& flat) = 0;
  // Runs fn on the communication thread (started on first use), in order.
  comm::RequestPtr on_comm_thread(std::function<void()> fn);
  comm::CommunicatorPtr comm_;
  std::unique_ptr<Wire> wire_;  // the collectives of compressors (and of the ring)

 private:
  struct Slot {
    size_t param;
    int64_t offset, numel;
  };
  struct Bucket {
    at::Tensor flat;
    std::unique_ptr<BucketCompressor> compressor;  // compressed: averages `flat` in place
    std::vector<Slot> slots;
    size_t pending = 0;
    bool launched = false;
    comm::RequestPtr request;
    std::chrono::steady_clock::time_point launched_at;
    std::string name;  // "bucket <index>", for trace spans
    std::shared_ptr<const std::string> label;  // "bucket <index> all-reduce", for stall reports and checks
  };
  void on_grad(size_t param, const at::Tensor& grad);
  void launch_ready_locked();
  void launch_bucket_locked(Bucket& b);

  std::shared_ptr<torch::nn::Module> module_;
  std::vector<at::Tensor> params_;
  std::vector<std::pair<size_t, size_t>> where_;  // param -> (bucket, slot)
  std::vector<Bucket> buckets_;
  std::vector<bool> got_;
  size_t next_launch_ = 0;
  std::mutex mu_;
  std::chrono::steady_clock::time_point first_launch_;
  bool any_launched_ = false;
  bool ring_ = false;
  bool solo_ = false;  // world of one: nothing to do
  double inv_world_ = 1.0;
  int64_t launched_bytes_ = 0;   // uncompressed c10d buckets this step, as a ring would send them
  int64_t wire_bytes_at_step_ = 0;
  std::unique_ptr<CommThread> thread_;
};

// Buckets summed with c10d's all-reduce (Gloo ring-chunked on CPU, NCCL on GPU).
class DistributedDataParallel : public BucketedSync {
 public:
  DistributedDataParallel(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm,
                          DdpOptions opts = {});
  std::string name() const override { return "baseline_ddp"; }

 protected:
  comm::RequestPtr launch(at::Tensor& flat) override;
};

// Local SGD (--sync-every H): every rank steps its own optimiser; every H
// steps the trainer calls average(), which replaces each parameter by its
// mean over ranks (one all-reduce of the flattened parameters, c10d's or the
// ring's). Momentum buffers stay each rank's own, as in PyTorch's
// PostLocalSGDOptimizer: averaging them too would cost as many bytes again.
// With H = 1 the trajectory equals DDP's: SGD with momentum is linear in the
// gradient, so the mean of the ranks' updates is the update of the mean
// gradient. Buffers (batch-norm statistics) are left to the epoch's end.
class ParameterAverager {
 public:
  ParameterAverager(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, bool ring);
  void average();
  int64_t bytes_sent() const { return wire_.bytes_sent; }

 private:
  ps::FlatParams params_;
  at::Tensor flat_;
  Wire wire_;
};

// Checks shapes across ranks and broadcasts parameters and buffers from rank 0.
void broadcast_module(torch::nn::Module& module, comm::Communicator& comm);

}  // namespace tandem::sync
