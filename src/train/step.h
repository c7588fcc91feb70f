#pragma once
// The data-parallel training step and what it needs: the data sets, the
// ranks' roles, evaluation. Internal to train/ (the Trainer in trainer.cpp
// drives it; the pipeline-parallel step of pp/ will sit beside it).
//
// DataParallelStep owns one rank's model, gradient synchroniser (ddp, ring,
// parameter-server worker) or parameter-server role, and optimiser. run() is
// called by the training thread only, once per batch, in step order.
#include <memory>
#include <vector>

#include <torch/optim/sgd.h>

#include "tandem/comm/communicator.h"
#include "tandem/data/dataset.h"
#include "tandem/data/image_folder.h"
#include "tandem/data/loader.h"
#include "tandem/models/models.h"
#include "tandem/sync/ddp.h"
#include "tandem/sync/gradient_sync.h"
#include "tandem/sync/ps.h"
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

// Who does what: every rank trains, except the parameter servers.
struct Roles {
  bool ps = false, server = false;
  int trainers = 1;       // ranks that compute gradients
  int trainer_index = 0;  // this rank's index among them (-1 for a server)
  int log_rank = 0;       // the first training rank: progress, results JSON, weights
  sync::ps::PsOptions pso;
};
Roles make_roles(const TrainOptions& o, int rank, int world);

// What one step did, for the observers.
struct StepOutput {
  double loss = 0, correct = 0, count = 0;
  bool synced = false;  // the gradients were synchronised (last micro-step of --grad-accum)
  int64_t bytes = 0;     // this rank sent (gradients, or --sync-every's parameter average)
  double average_seconds = 0;  // --sync-every: the parameter average of this step (0 without)
  Clock::time_point begin, xfer, fwd, bwd, sync, opt, end;
};

class DataParallelStep {
 public:
  // Collective (the synchroniser's constructor broadcasts rank 0's
  // parameters): `model` must already hold any restored weights.
  DataParallelStep(const TrainOptions& o, const Roles& roles, models::Model model, comm::CommunicatorPtr comm,
                   c10::Device model_device);
  // Forward, backward, synchronisation and update on one batch; `step` of
  // `steps` in this epoch decides the --grad-accum boundaries.
  StepOutput run(data::Batch& batch, int64_t step, int64_t steps);
  // Makes every rank hold the same model (ps: the servers' parameters; ddp
  // and ring: rank 0's buffers; a collective). Called at the end of an epoch
  // and before a checkpoint.
  void consolidate();
  // --balance: the loss is scaled by w = b_r x ranks / global batch, so that
  // the ranks' gradient average is the gradient of the global batch.
  void set_loss_weight(double w) { loss_weight_ = w; }
  // TANDEM_TEST_FAULT=slow: sleeps this long per sample after backward.
  void set_test_slowdown(double seconds_per_sample) { slow_per_sample_ = seconds_per_sample; }

  const models::Model& model() const { return model_; }
  torch::optim::SGD& optimizer() { return *optimizer_; }
  sync::GradientSync* gsync() { return gsync_.get(); }
  sync::ps::Server* server() { return server_.get(); }

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
};

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
