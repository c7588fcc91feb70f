#include "train_options.h"

#include <cstdlib>
#include <iostream>

#include "tandem/comm/env.h"
#include "tandem/comm/rendezvous.h"
#include "tandem/device/device.h"
#include "tandem/launch/launcher.h"
#include "tandem/util/check.h"
#include "tandem/util/parse.h"

namespace tandem::cli {

std::vector<std::string>& original_args() {
  static std::vector<std::string> args;
  return args;
}

void add_train_flags(CLI::App* sub, TrainFlags& f, bool with_strategy) {
  auto& o = f.opts;
  sub->add_option("--nproc", f.nproc, "Local ranks to start (processes on this machine)")->capture_default_str();
  sub->add_option("--model", o.model, "Model: mlp, cnn, resnet18, resnet50")->capture_default_str();
  sub->add_option("--dataset", o.dataset, "fashion-mnist or imagefolder (D/train/<class>/*.jpg, D/val/...)")
      ->capture_default_str();
  sub->add_option("--data-dir,--data_dir", o.data_dir,
                  "Data folder (default for fashion-mnist: /usr/share/datasets/fashion-mnist)");
  sub->add_option("--limit", o.limit, "Use only the first N training samples (0: all)")->capture_default_str();
  sub->add_option("--val-limit", o.val_limit, "Use only the first N test samples (0: all)")->capture_default_str();
  sub->add_option("--image-size", o.image_size, "imagefolder: crop size in pixels (default 224)");
  sub->add_option("--channels", o.channels, "imagefolder: 1 (grey) or 3 (RGB) input channels (default 3)");
  sub->add_option("--num-classes", o.num_classes, "Output classes (default: from the data set)");
  sub->add_option("--weights", o.weights, "Initial weights: a PyTorch state_dict file (e.g. a model.pt of an earlier run) or a checkpoint directory "
                  "(its model.pt; to continue training with its optimiser state and position, use --resume)");
  sub->add_option("--epochs", o.epochs, "Training epochs")->capture_default_str();
  sub->add_option("--batch-size,--batch_size", o.batch_size, "Samples per step on each rank")->capture_default_str();
  sub->add_option("--lr", o.lr, "SGD learning rate")->capture_default_str();
  sub->add_option("--momentum", o.momentum, "SGD momentum")->capture_default_str();
  if (with_strategy)
    sub->add_option("--strategy", o.strategy,
                    "Gradient sync: ddp (bucketed c10d all-reduce), ring (tandem's ring all-reduce), ps "
                    "(parameter server), none (compute only, for benchmarks)")
        ->capture_default_str();
  sub->add_option("--comm", o.comm,
                  "How ranks talk: auto (shm when all ranks share a host, hybrid when several hosts have several "
                  "ranks, else gloo), gloo (c10d over TCP), shm (shared memory, one host), hybrid (shared memory in "
                  "each host, Gloo between hosts)")
      ->capture_default_str();
  sub->add_option("--bucket-mb", o.bucket_mb, "DDP/ring bucket size in MiB")->capture_default_str();
  sub->add_option("--compress", o.compress,
                  "Gradient compression (ddp, ring, ps push): none; fp16 or bf16 (2x fewer bytes); int8 (per-bucket "
                  "scale, stochastic rounding, ~4x fewer on 2 ranks); topk:F (the largest fraction F of each bucket "
                  "as index/value pairs, the rest fed back into the next step); powersgd:R (rank-R factors of each "
                  "matrix, error feedback; ddp and ring)")
      ->capture_default_str();
  sub->add_option("--compress-warmup", o.compress_warmup, "Steps sent uncompressed before --compress starts")
      ->capture_default_str();
  sub->add_option("--sync-every", o.sync_every,
                  "Local SGD (ddp, ring): H optimiser steps on each rank, then the ranks average their parameters "
                  "(momentum stays local); 1 averages gradients every step")
      ->capture_default_str();
  sub->add_option("--balance", o.balance,
                  "off, or auto: per-rank batch sizes proportional to each rank's measured speed, global batch "
                  "unchanged, gradients weighted by samples (ddp, ring)")
      ->capture_default_str();
  sub->add_option("--grad-accum", o.grad_accum, "Micro-steps per optimiser step (communicate on the last)")
      ->capture_default_str();
  sub->add_option("--precision", o.precision,
                  "Forward pass under autocast: fp32 (off); bf16 (matrix products in bfloat16, CPU or CUDA; no "
                  "scaler needed); fp16 (float16, CUDA only, with a dynamic loss scaler). Parameters, gradients, "
                  "loss and optimiser stay fp32; not with --pp")
      ->capture_default_str();
  sub->add_option("--loss-scale", o.loss_scale,
                  "auto (dynamic for fp16, none otherwise), dynamic (start at 65536, halve and skip the step when "
                  "any rank's gradients hold inf or nan, double after 2000 good steps), none, or a fixed scale N "
                  "(steps with inf or nan still skipped); not with --strategy ps or --pp")
      ->capture_default_str();
  sub->add_option("--pp", o.pp,
                  "Model parallelism: cut the model into K pipeline stages on K ranks; --nproc D x K runs D "
                  "data-parallel replicas (each stage's replicas synchronised by --strategy ddp or ring); 1: off")
      ->capture_default_str();
  sub->add_option("--micro-batches", o.micro_batches,
                  "--pp: micro-batches per step (the per-replica --batch-size split into M; sizes differ by at most one)")
      ->capture_default_str();
  sub->add_option("--schedule", o.schedule,
                  "--pp: gpipe (all forwards, then all backwards) or 1f1b (one forward, one backward: activations of "
                  "at most K micro-batches held)")
      ->capture_default_str();
  sub->add_option("--pp-balance", o.pp_balance,
                  "--pp: where to cut: time (profile each block's forward + backward, make the slowest stage as fast "
                  "as possible) or params (equal parameter counts)")
      ->capture_default_str();
  sub->add_option("--seed", o.seed, "Seed for model init and shuffling")->capture_default_str();
  sub->add_option("--threads", o.threads, "Intra-op threads per rank (0: cores / local ranks)")->capture_default_str();
  sub->add_option("--timeout", o.timeout_s, "Seconds before a silent peer is declared failed")->capture_default_str();
  sub->add_option("--ps-servers", o.ps_servers, "ps: server ranks (they shard the parameters, they do not train)")
      ->capture_default_str();
  sub->add_option("--ps-mode", o.ps_mode, "ps: sync (BSP), async (ASP) or ssp (bounded staleness)")
      ->capture_default_str();
  sub->add_option("--staleness", o.staleness, "ps ssp: how many steps a worker may run ahead of the slowest")
      ->capture_default_str();
  sub->add_option("--ps-transport", o.ps_transport, "ps: auto (collective for sync, p2p for async/ssp), collective (broadcast/reduce, sync only) or p2p")
      ->capture_default_str();
  sub->add_option("--num-workers", o.num_workers, "Loader workers (0: load in the training thread, serially)")
      ->capture_default_str();
  sub->add_option("--buffer-size", f.buffer_size, "Prefetch buffer in batches, or auto")->capture_default_str();
  sub->add_option("--warmup-batches", o.warmup_batches, "Batches buffered before the model starts (-1: min(buffer, 2 x workers))")
      ->capture_default_str();
  sub->add_option("--model-start-delay", o.model_start_delay, "Longest wait in seconds for the warm-up")
      ->capture_default_str();
  sub->add_flag("--static-shapes", o.static_shapes, "Pad the last batch (masked) so every batch has one shape");
  sub->add_option("--data-device", o.data_device, "Where preprocessing runs: cpu, cuda, cuda:N");
  sub->add_option("--model-device", o.model_device, "Where the model lives and trains: cpu, cuda, cuda:N, or auto (the first CUDA device LibTorch sees, else the "
                  "CPU; the log says why)");
  sub->add_option("--data-gpu", f.data_gpu, "Alias: --data-device cuda:N");
  sub->add_option("--model-gpu", f.model_gpu, "Alias: --model-device cuda:N");
  sub->add_flag("--skip-bad-samples", o.skip_bad_samples, "imagefolder: replace undecodable images and count them");
  sub->add_flag("--cache", o.cache,
                "imagefolder: keep decoded images in memory after the first epoch (augmentation stays random)");
  sub->add_option("--cache-max-gb", o.cache_max_gb, "Refuse --cache when the decoded data set is larger than this")
      ->capture_default_str();
  sub->add_option("--output,-o", o.output, "Results: a directory (gets results_<method>.json) or a .json file")
      ->capture_default_str();
  sub->add_option("--trace", o.trace_path, "Write a Chrome trace (open in https://ui.perfetto.dev)");
  sub->add_option("--save", o.save,
                  "Where the trained weights go, a PyTorch state_dict (torch.load reads it; --weights loads it "
                  "back). Default: model.pt beside the results JSON, or model_<method>.pt in the results "
                  "directory; none: not saved");
  sub->add_option("--checkpoint-dir", o.checkpoint_dir,
                  "Write checkpoints here (atomic, checksummed, in the background); every rank must see it");
  sub->add_option("--checkpoint-every", o.checkpoint_every, "Steps between checkpoints (0: at the end of each epoch)")
      ->capture_default_str();
  sub->add_option("--keep-checkpoints", o.keep_checkpoints, "Newest checkpoints kept")->capture_default_str();
  f.resume_opt = sub->add_option("--resume", o.resume,
                                 "Continue from the newest good checkpoint in --checkpoint-dir, or from PATH (a "
                                 "checkpoint, or a directory of them); --epochs may be raised")
                     ->expected(0, 1);
  sub->add_option("--max-restarts", f.max_restarts,
                  "When a rank dies, restart the whole group up to N times; with --checkpoint-dir the ranks resume "
                  "from the newest checkpoint")
      ->capture_default_str();
  sub->add_option("--stall-warn", f.stall_warn_s,
                  "Seconds a collective may wait before rank 0 names the ranks that have not reached it (0: off)")
      ->capture_default_str();
  sub->add_flag("--check-collectives", f.check_collectives,
                "Before each collective the ranks compare what they call (operation, type, size, root); a "
                "mismatch is an error naming both ranks (also TANDEM_DEBUG=detail)");
  sub->add_flag("--quiet", o.quiet, "No progress bar or per-epoch lines");
  sub->add_option("--master-addr", f.master_addr, "Multi-host: address of rank 0's store (else MASTER_ADDR)");
  sub->add_option("--master-port", f.master_port, "Multi-host: port of rank 0's store (else MASTER_PORT)");
}

void finalize_train_flags(TrainFlags& f) {
  TANDEM_CHECK(f.nproc >= 1, "--nproc must be >= 1, got ", f.nproc);
  if (f.buffer_size == "auto") {
    f.opts.buffer_size = 0;
  } else {
    const auto v = parse_whole(f.buffer_size);
    TANDEM_CHECK(v && *v >= 1 && *v <= 1 << 20, "--buffer-size must be a number >= 1 or auto, got '", f.buffer_size,
                 "'");
    f.opts.buffer_size = static_cast<int>(*v);
  }
  if (f.resume_opt && f.resume_opt->count() > 0 && f.opts.resume.empty()) f.opts.resume = "latest";
  TANDEM_CHECK(f.max_restarts >= 0, "--max-restarts must be >= 0, got ", f.max_restarts);
  TANDEM_CHECK(f.stall_warn_s >= 0, "--stall-warn must be >= 0 seconds, got ", f.stall_warn_s);
  if (f.data_gpu >= 0) f.opts.data_device = "cuda:" + std::to_string(f.data_gpu);
  if (f.model_gpu >= 0) f.opts.model_device = "cuda:" + std::to_string(f.model_gpu);
  if (f.data_gpu >= 0 && f.model_gpu >= 0) {
    TANDEM_CHECK(f.data_gpu != f.model_gpu, "--data-gpu and --model-gpu are both ", f.data_gpu,
                 ": dual-GPU mode needs two different GPUs (requires at least 2 GPUs)");
  }
  train::validate(f.opts);
}

train::RunResult run_as_rank(const TrainFlags& f) {
  train::TrainOptions opts = f.opts;
  comm::RendezvousOptions ro;
  ro.master_addr = f.master_addr;
  ro.master_port = f.master_port;
  ro.stall_warn_s = f.stall_warn_s;
  const char* debug = std::getenv("TANDEM_DEBUG");
  ro.check_collectives = f.check_collectives || (debug && std::string(debug) == "detail");
  ro.timeout = std::chrono::milliseconds(static_cast<int64_t>(opts.timeout_s * 1000));
  ro.comm = opts.comm;
  ro.verbose = !opts.quiet;
  if (opts.pp > 1) ro.shm_spin_ns = 0;  // stages compute with receives posted (docs/benchmarks.md)
  auto world = comm::resolve_world(ro);
  const auto model = device::plan(opts.data_device, opts.model_device, world.local_rank).model;
  // --comm auto/nccl: NCCL for a GPU per rank, for the methods that use
  // collectives only (validate() refuses --comm nccl for the others).
  if (model.is_cuda() && train::collectives_only(opts)) ro.cuda_device = model.index();
  opts.local_world_size = world.local_world_size;
  opts.local_rank = world.local_rank;
  auto c = comm::init_from_env(ro);
  return train::run_training(opts, c);
}

bool in_job() {
  return std::getenv(env::kWorldSize) || std::getenv(env::kOmpiSize) ||
         std::getenv(env::kSlurmNTasks);
}

int relaunch_local(int nproc, const std::vector<std::string>& args, int max_restarts) {
  launch::LaunchOptions lo;
  lo.nproc_per_node = nproc;
  lo.max_restarts = max_restarts;
  lo.command.push_back(launch::self_executable());
  lo.command.insert(lo.command.end(), args.begin(), args.end());
  return launch::launch(lo, std::cerr);
}

}  // namespace tandem::cli
