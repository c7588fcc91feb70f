#pragma once
// Training: the loop every strategy shares.
//
// run_training() is the one call the command line makes, once per rank. It
// builds a Trainer (src/train/trainer.cpp): the step loop, which feeds
// batches from the Loader to a Step (forward, backward, gradient sync,
// optimiser; src/train/step.h) and tells its observers (progress bar, trace,
// utilisation timeline, checkpointer; src/train/observers.h) after each step
// and epoch. It trains `epochs` epochs, evaluates on the test split after each
// (distributed, exact counts), and returns the same RunResult on every rank;
// the logging rank shows the progress bar and writes the results JSON, the
// trained weights (a PyTorch state_dict) and the trace.
//
// Durable training (src/train/checkpointing.h): with checkpoint_dir, rank 0
// writes an atomic checkpoint every checkpoint_every steps (in the
// background, from an in-memory snapshot); `resume` continues from one with
// the parameters, optimiser state, sampler position, RNG and results so far
// restored, so that a resumed run ends bit-identical to an uninterrupted one
// (same seed and world size; ddp, ring and ps in sync mode).
#include <string>
#include <vector>

#include "tandem/comm/communicator.h"
#include "tandem/train/results.h"

namespace tandem::train {

struct TrainOptions {
  // What to train.
  std::string model = "cnn";
  std::string dataset = "fashion-mnist";  // fashion-mnist | imagefolder
  std::string data_dir;                   // default: the Debian package's folder
  int64_t limit = 0;                      // > 0: first N training samples only
  int64_t val_limit = 0;                  // > 0: first N test samples only
  int64_t image_size = 0;                 // imagefolder: crop size (default 224, 28 for 1-channel)
  int64_t channels = 0;                   // imagefolder: 1 or 3 (default 3)
  int64_t num_classes = 0;                // default: from the data set
  std::string weights;                    // initial weights file
  // How.
  int epochs = 1;
  int64_t batch_size = 64;  // per rank
  double lr = 0.05;
  double momentum = 0.9;
  std::string strategy = "ddp";  // ddp | ring | ps | none (compute only, no communication)
  double bucket_mb = 25.0;
  std::string comm = "auto";  // auto | gloo | shm | hybrid: how ranks talk (see comm/rendezvous.h)
  // Gradient compression (sync/compress.h): none | fp16 | bf16 | int8 |
  // topk:F | powersgd:R; ddp, ring and the parameter server's push.
  std::string compress = "none";
  int64_t compress_warmup = 0;  // steps sent uncompressed before compressing
  // Local SGD (ddp, ring): each rank takes sync_every optimiser steps on its
  // own, then the ranks average their parameters. 1 = average gradients every step.
  int sync_every = 1;
  // off | auto: per-rank batch sizes proportional to measured speed, global
  // batch (batch_size x training ranks) unchanged (ddp, ring).
  std::string balance = "off";
  int grad_accum = 1;
  // Pipeline stages (model parallelism, pp/): pp > 1 cuts the model into pp
  // stages on as many ranks; a world of D x pp ranks runs D replicas, each
  // stage's replicas synchronised by `strategy` (ddp or ring).
  int pp = 1;
  int micro_batches = 4;          // the per-replica batch is split into these
  std::string schedule = "1f1b";  // gpipe | 1f1b
  std::string pp_balance = "time";  // time | params: how the stages are cut
  // Mixed precision (train/mixed_precision.h): fp32 | bf16 | fp16, the
  // forward under autocast; ddp, ring, none and ps workers (bf16), not --pp.
  std::string precision = "fp32";
  // auto (dynamic for fp16, none otherwise) | dynamic | none | a fixed scale
  // N: the loss is multiplied before backward, a step whose gradients hold
  // inf or nan on any rank is skipped (dynamic: and the scale halved).
  std::string loss_scale = "auto";
  uint64_t seed = 42;
  int threads = 0;  // intra-op threads per rank; 0: cores / local ranks
  double timeout_s = 300;
  // Parameter server.
  int ps_servers = 1;
  std::string ps_mode = "sync";  // sync | async | ssp
  int staleness = 0;
  std::string ps_transport = "auto";  // auto (collective for sync, p2p otherwise) | collective | p2p
  // Data pipeline.
  int num_workers = 2;
  int buffer_size = 50;   // 0: auto (from workers, batch bytes and a RAM budget)
  int warmup_batches = -1;  // -1: min(buffer, 2 x workers)
  double model_start_delay = 2.0;
  bool static_shapes = false;
  bool skip_bad_samples = false;
  bool cache = false;         // imagefolder: keep decoded images in memory after the first epoch
  double cache_max_gb = 8.0;  // refuse --cache above this estimated size
  std::string data_device;   // "" | cpu | cuda | cuda:N
  std::string model_device;
  // Output.
  std::string output = "results";  // a directory, or a .json file; "" writes nothing
  std::string trace_path;
  // The trained weights: "" = model.pt beside the results JSON, or
  // model_<method>.pt in the results directory (nothing when output is "");
  // "none" = not saved.
  std::string save;
  bool quiet = false;
  // Durable training.
  std::string checkpoint_dir;   // "" = no checkpoints
  int64_t checkpoint_every = 0; // steps between checkpoints; 0 = at the end of every epoch
  int keep_checkpoints = 2;
  // "" = start fresh (or, after a launcher restart with checkpoint_dir, the
  // latest checkpoint); "latest" = the newest good checkpoint in
  // checkpoint_dir; otherwise a checkpoint directory or a directory of them.
  std::string resume;
  int local_world_size = 1;  // set from the rendezvous, for the default thread count
  int local_rank = 0;        // set from the rendezvous: a bare "cuda" means cuda:local_rank
};

// Seed 002's method name of a strategy: ddp -> baseline_ddp, ring -> all_reduce, ps -> ps.
std::string method_name(const std::string& strategy);
// The method of a run: method_name(strategy), or "pp" with pipeline stages.
std::string method_name(const TrainOptions& o);
// Whether the method synchronises by collectives alone (ddp or none, without
// --pp): the only ones c10d's NCCL can carry, since it matches point-to-point
// messages in posting order and ignores tags, which the ring, the parameter
// server and pipeline stages rely on.
bool collectives_only(const TrainOptions& o);

// Checks every option; throws tandem::Error naming the flag and accepted values.
void validate(const TrainOptions& opts);
// --balance auto: batch sizes proportional to the ranks' measured `rates`
// (samples per second), each >= 1, summing to global_batch (largest
// remainder; equal shares when a rate is not a positive number).
std::vector<int64_t> balanced_batches(const std::vector<double>& rates, int64_t global_batch);
// --threads 0: the host's cores shared by its local ranks (at least 1 each).
int default_threads(int local_ranks);

RunResult run_training(const TrainOptions& opts, comm::CommunicatorPtr comm);

}  // namespace tandem::train
