#pragma once
// The training steps and what they need: the data sets, the ranks' roles,
// evaluation. Internal to train/ (the Trainer in trainer.cpp drives a Step).
//
// A Step owns one rank's model, optimiser and whatever moves gradients:
//   DataParallelStep  a gradient synchroniser (ddp, ring, parameter-server
//                     worker) or a parameter-server role;
//   PipelineStep      one stage of a pipeline (pp/) and the data-parallel
//                     group of that stage (pipeline_step.cpp).
// run() is called by the training thread only, once per batch, in step order.
#include <memory>
#include <vector>

#include <torch/optim/sgd.h>

#include "tandem/comm/communicator.h"
#include "tandem/data/dataset.h"
#include "tandem/data/image_folder.h"
#include "tandem/data/loader.h"
#include "tandem/models/models.h"
#include "tandem/pp/pipeline.h"
#include "tandem/sync/ddp.h"
#include "tandem/sync/gradient_sync.h"
#include "tandem/sync/ps.h"
#include "tandem/train/mixed_precision.h"
#include "tandem/train/trainer.h"
#include "tandem/util/clock.h"

namespace tandem::train {

struct Datasets {
  data::DatasetPtr train, val;
  std::shared_ptr<data::ImageFolderDataset> train_folder, val_folder;  // imagefolder only
  std::vector<int64_t> sample_shape;
  int64_t num_classes = 10;
};
// Throws tandem::Error naming the flag or file that is wrong.
Datasets load_datasets(const TrainOptions& o, bool log);

// Who does what: every rank trains, except the parameter servers. With
// --pp K the "training ranks" are the D = world / K replicas of the
// pipeline: the K stages of a replica read the same batches.
struct Roles {
  bool ps = false, server = false;
  int trainers = 1;       // ranks that compute gradients (pp: replicas)
  int trainer_index = 0;  // this rank's index among them (-1 for a server; pp: its replica)
  int log_rank = 0;       // the first training rank: progress, results JSON, weights (pp: the last stage)
  sync::ps::PsOptions pso;
};
Roles make_roles(const TrainOptions& o, int rank, int world);
// The synchroniser's options from the flags (buckets, compression, seed):
// the data-parallel step's and a pipeline stage's group's.
sync::DdpOptions ddp_options(const TrainOptions& o);

// What one step did, for the observers.
struct StepOutput {
  double loss = 0, correct = 0, count = 0;
  bool synced = false;  // the gradients were synchronised (last micro-step of --grad-accum)
  int64_t bytes = 0;     // this rank sent (gradients, or --sync-every's parameter average)
  double average_seconds = 0;  // --sync-every: the parameter average of this step (0 without)
  Clock::time_point begin, xfer, fwd, bwd, sync, opt, end;
};

class Step {
 public:
  virtual ~Step() = default;
  // Forward, backward, synchronisation and update on one batch; `step` of
  // `steps` in this epoch.
  virtual StepOutput run(data::Batch& batch, int64_t step, int64_t steps) = 0;
  // Makes every rank hold the same, whole model and optimiser state (a
  // collective). Called at the end of an epoch and before a checkpoint.
  virtual void consolidate() = 0;
  virtual const models::Model& model() const = 0;
  virtual torch::optim::SGD& optimizer() = 0;
  virtual sync::GradientSync* gsync() { return nullptr; }
  virtual sync::ps::Server* server() { return nullptr; }
  // --balance: the loss is scaled by w = b_r x ranks / global batch, so that
  // the ranks' gradient average is the gradient of the global batch.
  virtual void set_loss_weight(double) {}
  // TANDEM_TEST_FAULT=slow: sleeps this long per sample after backward.
  virtual void set_test_slowdown(double) {}
  // TANDEM_TEST_FAULT=inf: the next run() puts +inf into one gradient of
  // this rank after the synchronisation (before the loss scaler looks).
  virtual void inject_test_inf() {}
  // --loss-scale: the scaler (nullptr without one).
  virtual LossScaler* scaler() { return nullptr; }
  // What the results JSON says of this way of training (pp: its section).
  virtual nlohmann::json describe() { return nullptr; }
};

class DataParallelStep : public Step {
 public:
  // Collective (the synchroniser's constructor broadcasts rank 0's
  // parameters): `model` must already hold any restored weights.
  DataParallelStep(const TrainOptions& o, const Roles& roles, models::Model model, comm::CommunicatorPtr comm,
                   c10::Device model_device);
  // Forward, backward, synchronisation and update on one batch; `step` of
  // `steps` in this epoch decides the --grad-accum boundaries.
  StepOutput run(data::Batch& batch, int64_t step, int64_t steps) override;
  // ps: the servers' parameters; ddp and ring: rank 0's buffers.
  void consolidate() override;
  void set_loss_weight(double w) override { loss_weight_ = w; }
  void set_test_slowdown(double seconds_per_sample) override { slow_per_sample_ = seconds_per_sample; }
  void inject_test_inf() override { inject_inf_ = true; }
  LossScaler* scaler() override { return scaler_.get(); }

  const models::Model& model() const override { return model_; }
  torch::optim::SGD& optimizer() override { return *optimizer_; }
  sync::GradientSync* gsync() override { return gsync_.get(); }
  sync::ps::Server* server() override { return server_.get(); }

 private:
  const TrainOptions& o_;
  Roles roles_;
  models::Model model_;
  comm::CommunicatorPtr comm_;
  c10::Device device_;
  sync::GradientSyncPtr gsync_;
  std::unique_ptr<sync::ps::Server> server_;
  std::unique_ptr<torch::optim::SGD> optimizer_;
  std::unique_ptr<sync::ParameterAverager> averager_;  // --sync-every > 1
  int64_t local_steps_ = 0;  // optimiser steps since the last parameter average
  double loss_weight_ = 1.0;
  double slow_per_sample_ = 0;
  // --precision: the forward under autocast; --loss-scale: the scaler decides
  // whether the optimiser steps (Note in mixed_precision.h).
  Precision precision_ = Precision::kFp32;
  std::unique_ptr<LossScaler> scaler_;
  std::vector<at::Tensor> params_;  // the scaler's: every parameter of the model
  bool inject_inf_ = false;
};

// One stage of a pipeline-parallel replica (--pp K; pp/pipeline.h). Every
// rank builds the whole model from the same seed and trains its stage's
// blocks; the optimiser covers the whole model (parameters without a
// gradient are skipped), so that after consolidate() -- every stage's
// parameters, buffers and momentum broadcast from replica 0 -- any rank
// holds the whole run for evaluation, checkpoints and the saved weights.
class PipelineStep : public Step {
 public:
  // Collective (rank 0 profiles the blocks for --pp-balance time; the
  // stages' data-parallel groups are built).
  PipelineStep(const TrainOptions& o, const Roles& roles, models::Model model, comm::CommunicatorPtr comm,
               c10::Device model_device, const std::vector<int64_t>& sample_shape, obs::Trace* trace);
  StepOutput run(data::Batch& batch, int64_t step, int64_t steps) override;
  void consolidate() override;
  const models::Model& model() const override { return model_; }
  torch::optim::SGD& optimizer() override { return *optimizer_; }
  sync::GradientSync* gsync() override { return pipe_->gsync(); }
  // The `pp` section of the results: the cut, predicted and measured stage
  // times, the bubble against theory, peak activation bytes (a collective).
  nlohmann::json describe() override;

 private:
  const TrainOptions& o_;
  models::Model model_;
  comm::CommunicatorPtr comm_;
  c10::Device device_;
  std::unique_ptr<pp::Pipeline> pipe_;
  std::unique_ptr<torch::optim::SGD> optimizer_;
  // This rank's sums over the run's steps, for describe().
  double busy_ = 0, wait_ = 0, span_ = 0, steps_ = 0;
  int64_t peak_ = 0;
};

// The SGD momentum of parameter `p` (undefined when it has none yet), and
// setting it (checkpointing.cpp: the state's key differs between LibTorch
// versions).
at::Tensor momentum_of(torch::optim::SGD& opt, const at::Tensor& p);
void set_momentum(torch::optim::SGD& opt, const at::Tensor& p, const at::Tensor& m);

// Sums of one evaluation on this rank.
struct Tally {
  double loss_sum = 0, correct = 0, count = 0;
};
// Exact distributed evaluation: each rank takes a disjoint slice of the
// validation set (no padding, no duplicates), loaded by `loader`'s workers;
// the sums are all-reduced.
Tally evaluate(const models::Model& m, data::Loader& loader, const std::vector<int64_t>& indices,
               comm::Communicator& comm, const c10::Device& dev);

}  // namespace tandem::train
