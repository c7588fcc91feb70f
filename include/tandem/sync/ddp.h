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
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "tandem/comm/communicator.h"
#include "tandem/sync/gradient_sync.h"

namespace tandem::sync {

// What travels on the wire. kFp16 is PyTorch DDP's fp16 compress hook: each
// fp32 bucket is divided by the world size (so the sum cannot overflow) and
// sent as float16, halving the bytes; the result is cast back into .grad().
// Gradients then carry float16's 11 significant bits (relative error about
// 5e-4) and values below 6e-8 flush to zero.
enum class Compression { kNone, kFp16 };
// "none" or "fp16"; anything else throws naming `flag` and the choices.
Compression parse_compression(const std::string& name, const std::string& flag = "--compress");

struct DdpOptions {
  double bucket_mb = 25.0;
  // The first bucket (the last layers, whose gradients are ready first) closes
  // after min(first_bucket_mb, bucket_mb), as PyTorch DDP does, so that its
  // all-reduce starts while the rest of backward still runs.
  double first_bucket_mb = 1.0;
  bool broadcast_parameters = true;
  Compression compression = Compression::kNone;
};

class BucketedSync : public GradientSync {
 public:
  BucketedSync(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, DdpOptions opts);
  ~BucketedSync() override;
  void begin_step(bool sync) override;
  void finish() override;
  size_t num_buckets() const { return buckets_.size(); }
  // Parameter indices (registration order) of each bucket, for tests and logs.
  std::vector<std::vector<size_t>> bucket_layout() const;

 protected:
  // Starts reducing (summing) `flat` across ranks.
  virtual comm::RequestPtr launch(at::Tensor& flat) = 0;
  comm::CommunicatorPtr comm_;

 private:
  struct Slot {
    size_t param;
    int64_t offset, numel;
  };
  struct Bucket {
    at::Tensor flat;
    at::Tensor wire;  // the float16 copy sent instead of `flat` (Compression::kFp16), else undefined
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
  bool solo_ = false;  // world of one: nothing to do
  double inv_world_ = 1.0;
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

// Checks shapes across ranks and broadcasts parameters and buffers from rank 0.
void broadcast_module(torch::nn::Module& module, comm::Communicator& comm);

}  // namespace tandem::sync
