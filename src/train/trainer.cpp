// The training loop. See include/tandem/train/trainer.h for the contract.
#include "tandem/train/trainer.h"

#include <filesystem>
#include <signal.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <optional>
#include <thread>

#include <torch/torch.h>

#include "checkpointing.h"
#include "observers.h"
#include "step.h"
#include "tandem/comm/rendezvous.h"
#include "tandem/data/sampler.h"
#include "tandem/device/device.h"
#include "tandem/models/weights.h"
#include "tandem/pp/pipeline.h"
#include "tandem/sync/ddp.h"
#include "tandem/train/mixed_precision.h"
#include "tandem/train/pipeline_plan.h"
#include "tandem/util/check.h"
#include "tandem/util/clock.h"

namespace tandem::train {
namespace {

void write_results(const RunResult& r, const std::string& output) {
  std::string path = output;
  if (path.size() < 5 || path.substr(path.size() - 5) != ".json") {
    std::error_code ec;
    std::filesystem::create_directories(output, ec);
    TANDEM_CHECK(!ec, "--output: cannot create directory ", output, ": ", ec.message());
    path = output + "/" + results_file_name(r.method);
  } else if (auto parent = std::filesystem::path(path).parent_path(); !parent.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(parent, ec);
    TANDEM_CHECK(!ec, "--output: cannot create directory ", parent.string(), ": ", ec.message());
  }
  std::ofstream f(path);
  TANDEM_CHECK(f, "--output: cannot write ", path, " (does its directory exist and is it writable?)");
  f << to_json(r).dump(2) << "\n";
  TANDEM_CHECK(f.good(), "--output: write to ", path, " failed (disk full?)");
  std::fprintf(stderr, "[tandem] results written to %s\n", path.c_str());
}

// Where the trained weights go (Note: "" follows the results JSON).
std::string weights_path(const TrainOptions& o, const std::string& method) {
  if (o.save == "none") return "";
  if (!o.save.empty()) return o.save;
  if (o.output.empty()) return "";
  const std::string& out = o.output;
  if (out.size() >= 5 && out.substr(out.size() - 5) == ".json") {
    auto dir = std::filesystem::path(out).parent_path();
    return (dir / "model.pt").string();
  }
  return (std::filesystem::path(out) / ("model_" + method + ".pt")).string();
}

}  // namespace

std::string method_name(const std::string& strategy) {
  if (strategy == "ddp") return "baseline_ddp";
  if (strategy == "ring") return "all_reduce";
  if (strategy == "ps") return "ps";
  if (strategy == "none") return "compute_only";
  return strategy;
}

std::string method_name(const TrainOptions& o) { return o.pp > 1 ? "pp" : method_name(o.strategy); }

bool collectives_only(const TrainOptions& o) { return (o.strategy == "ddp" || o.strategy == "none") && o.pp == 1; }

void validate(const TrainOptions& o) {
  TANDEM_CHECK(o.epochs >= 1, "--epochs must be >= 1, got ", o.epochs);
  TANDEM_CHECK(o.batch_size >= 1, "--batch-size must be >= 1, got ", o.batch_size);
  TANDEM_CHECK(std::isfinite(o.lr) && o.lr > 0, "--lr must be a positive number, got ", o.lr);
  TANDEM_CHECK(o.momentum >= 0 && o.momentum < 1, "--momentum must be in [0, 1), got ", o.momentum);
  TANDEM_CHECK(o.strategy == "ddp" || o.strategy == "ring" || o.strategy == "ps" || o.strategy == "none",
               "--strategy '", o.strategy, "' is unknown: choose ddp, ring, ps or none (compute only)");
  TANDEM_CHECK(o.grad_accum >= 1, "--grad-accum must be >= 1, got ", o.grad_accum);
  TANDEM_CHECK(o.grad_accum == 1 || o.strategy != "ps", "--grad-accum is not supported with --strategy ps");
  TANDEM_CHECK(o.bucket_mb > 0, "--bucket-mb must be > 0, got ", o.bucket_mb);
  const auto spec = sync::parse_compress(o.compress);
  comm::validate_comm(o.comm);
  TANDEM_CHECK(spec.none() || o.strategy != "none", "--compress ", o.compress,
               " applies to --strategy ddp, ring or ps; --strategy none sends nothing");
  if (o.strategy == "ps" && !spec.none()) sync::make_codec(spec, 0);  // names what the server cannot take
  TANDEM_CHECK(o.compress_warmup >= 0, "--compress-warmup must be >= 0 steps, got ", o.compress_warmup);
  TANDEM_CHECK(o.sync_every >= 1, "--sync-every must be >= 1 (1: average gradients every step), got ", o.sync_every);
  TANDEM_CHECK(o.sync_every == 1 || o.strategy == "ddp" || o.strategy == "ring", "--sync-every ", o.sync_every,
               " (local SGD) applies to --strategy ddp or ring, not ", o.strategy);
  TANDEM_CHECK(o.sync_every == 1 || spec.none(), "--sync-every ", o.sync_every, " averages parameters, which "
               "--compress ", o.compress, " does not apply to; use one or the other");
  TANDEM_CHECK(o.sync_every == 1 || o.grad_accum == 1, "--sync-every with --grad-accum: choose one way to "
               "communicate less often");
  TANDEM_CHECK(o.balance == "off" || o.balance == "auto", "--balance '", o.balance, "' is unknown: choose off or auto");
  TANDEM_CHECK(o.balance == "off" || o.strategy == "ddp" || o.strategy == "ring", "--balance auto applies to "
               "--strategy ddp or ring (the parameter server's workers already run at their own pace: use "
               "--ps-mode ssp), not ", o.strategy);
  TANDEM_CHECK(o.balance == "off" || o.sync_every == 1, "--balance auto with --sync-every > 1 is not supported: "
               "local SGD averages parameters with equal weights");
  TANDEM_CHECK(o.balance == "off" || o.grad_accum == 1, "--balance auto with --grad-accum > 1 is not supported");
  TANDEM_CHECK(o.pp >= 1, "--pp must be >= 1 stage (1: no pipeline), got ", o.pp);
  TANDEM_CHECK(o.micro_batches >= 1, "--micro-batches must be >= 1, got ", o.micro_batches);
  pp::parse_schedule(o.schedule);  // names the flag
  TANDEM_CHECK(o.pp_balance == "time" || o.pp_balance == "params", "--pp-balance '", o.pp_balance,
               "' is unknown: choose time (profile each block, cut the slowest stage down) or params");
  if (o.pp > 1) {
    if (const int n = models::block_count(o.model); n > 0)
      TANDEM_CHECK(o.pp <= n, "--pp ", o.pp, ": the model has only ", n, " blocks to cut into stages; use --pp <= ", n);
    TANDEM_CHECK(o.strategy == "ddp" || o.strategy == "ring", "--pp ", o.pp, " with --strategy ", o.strategy,
                 ": pipeline stages synchronise their replicas with ddp or ring",
                 o.strategy == "ps" ? " (the parameter server holds whole models' gradients, which no stage has)" : "");
    TANDEM_CHECK(o.grad_accum == 1, "--pp with --grad-accum: raise --micro-batches instead (the micro-batches "
                 "of a step already accumulate)");
    TANDEM_CHECK(o.sync_every == 1, "--pp with --sync-every (local SGD) is not supported");
    TANDEM_CHECK(o.balance == "off", "--pp with --balance auto is not supported: the stages of a replica share "
                 "one batch; --pp-balance time balances the stages");
    TANDEM_CHECK(o.batch_size >= o.micro_batches, "--batch-size ", o.batch_size, " cannot be split into --micro-batches ",
                 o.micro_batches, "; use --micro-batches <= --batch-size");
  }
  TANDEM_CHECK(o.threads >= 0, "--threads must be >= 0, got ", o.threads);
  TANDEM_CHECK(o.timeout_s > 0, "--timeout must be > 0 seconds, got ", o.timeout_s);
  TANDEM_CHECK(o.limit >= 0 && o.val_limit >= 0, "--limit/--val-limit must be >= 0");
  TANDEM_CHECK(o.dataset == "fashion-mnist" || o.dataset == "imagefolder", "--dataset '", o.dataset,
               "' is unknown: choose fashion-mnist or imagefolder");
  TANDEM_CHECK(o.dataset != "imagefolder" || !o.data_dir.empty(),
               "--dataset imagefolder needs --data-dir D with D/train/<class>/*.jpg and D/val/<class>/*.jpg "
               "(make one with `tandem data export`)");
  TANDEM_CHECK(o.num_workers >= 0, "--num-workers must be >= 0, got ", o.num_workers);
  TANDEM_CHECK(o.buffer_size >= 0, "--buffer-size must be >= 1 or auto, got ", o.buffer_size);
  TANDEM_CHECK(o.model_start_delay >= 0, "--model-start-delay must be >= 0, got ", o.model_start_delay);
  TANDEM_CHECK(o.staleness >= 0, "--staleness must be >= 0, got ", o.staleness);
  TANDEM_CHECK(o.checkpoint_every >= 0, "--checkpoint-every must be >= 0 steps (0: once per epoch), got ",
               o.checkpoint_every);
  TANDEM_CHECK(o.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1, got ", o.keep_checkpoints);
  TANDEM_CHECK(o.checkpoint_dir.empty() || o.strategy != "none", "--checkpoint-dir: --strategy none trains ",
               "unrelated models on each rank, which one checkpoint cannot hold; use ddp, ring or ps");
  TANDEM_CHECK(o.resume != "latest" || !o.checkpoint_dir.empty(),
               "--resume (latest) needs --checkpoint-dir D, the directory the checkpoints were written to");
  const Precision precision = parse_precision(o.precision);
  const bool scaled = parse_loss_scale(o.loss_scale, precision).has_value();
  TANDEM_CHECK(o.pp == 1 || precision == Precision::kFp32, "--precision ", o.precision, " with --pp ", o.pp,
               ": pipeline stages train in fp32 only; drop --precision or --pp");
  TANDEM_CHECK(o.pp == 1 || !scaled, "--loss-scale ", o.loss_scale, " with --pp ", o.pp,
               ": pipeline stages have no loss scaler; use --loss-scale none");
  TANDEM_CHECK(o.strategy != "ps" || precision != Precision::kFp16, "--precision fp16 with --strategy ps: the "
               "parameter server applies the update, which a loss scaler must be able to skip; use --precision "
               "bf16 (no scaler needed) or --strategy ddp or ring");
  TANDEM_CHECK(o.strategy != "ps" || !scaled, "--loss-scale ", o.loss_scale, " with --strategy ps: the parameter "
               "server applies the update, which a loss scaler must be able to skip; use --loss-scale none, or "
               "--strategy ddp or ring");
  {
    // The model device as device::plan will choose it: --model-device, else
    // --data-device, else the CPU (a number N means cuda:N).
    const std::string& spec = o.model_device.empty() ? o.data_device : o.model_device;
    const bool cuda = !spec.empty() && device::parse(spec, o.model_device.empty() ? "--data-device" : "--model-device")
                                           .is_cuda();
    std::string why;
    TANDEM_CHECK(autocast_supported(cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU, precision, &why),
                 "--precision ", o.precision, " on the ", cuda ? "CUDA" : "CPU", " model device: ", why);
  }
  {
    // Error feedback keeps the compression error in the gradients' units:
    // scaled ones, so a skipped step leaves inf in the residual for good and a
    // new scale leaves it in the old units.
    const auto kind = sync::parse_compress(o.compress).kind;
    TANDEM_CHECK(!scaled || (kind != sync::CompressSpec::Kind::kTopK && kind != sync::CompressSpec::Kind::kPowerSgd),
                 "--loss-scale with --compress ", o.compress, ": the compressor's error feedback would carry scaled "
                 "(and, after a skipped step, infinite) residuals; use --precision bf16 (no scaler), or --compress "
                 "none, fp16, bf16 or int8");
  }
  TANDEM_CHECK(o.comm != "nccl" || collectives_only(o),
               "--comm nccl with ", o.pp > 1 ? "--pp" : "--strategy " + o.strategy,
               ": NCCL matches point-to-point messages in posting order, not by tag, and this method relies on "
               "tags; use --strategy ddp, or --comm gloo / shm / auto");
  bool known = false;
  for (auto& n : models::model_names()) known |= n == o.model;
  if (!known) models::make_model({o.model});  // throws the message listing the names
}

std::vector<int64_t> balanced_batches(const std::vector<double>& rates, int64_t global_batch) {
  const size_t n = rates.size();
  TANDEM_CHECK(n >= 1 && global_batch >= static_cast<int64_t>(n), "--balance: a global batch of ", global_batch,
               " cannot give each of ", n, " ranks a sample; raise --batch-size");
  double total = 0;
  bool usable = true;
  for (double r : rates) {
    usable &= std::isfinite(r) && r > 0;
    total += r;
  }
  // One sample each first, so no rank idles; the rest by largest remainder.
  std::vector<int64_t> out(n, 1);
  const int64_t spare = global_batch - static_cast<int64_t>(n);
  std::vector<std::pair<double, size_t>> frac;
  int64_t given = 0;
  for (size_t i = 0; i < n; ++i) {
    const double want = spare * (usable ? rates[i] / total : 1.0 / static_cast<double>(n));
    const auto whole = static_cast<int64_t>(std::floor(want));
    out[i] += whole;
    given += whole;
    frac.push_back({want - static_cast<double>(whole), i});
  }
  // Ties go to the lower rank, so every rank computes the same plan.
  std::stable_sort(frac.begin(), frac.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t k = 0; given < spare; ++k, ++given) ++out[frac[k % n].second];
  return out;
}

int default_threads(int local_ranks) {
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / std::max(1, local_ranks));
}

namespace {

// Test-only fault injection, from TANDEM_TEST_FAULT (docs/errors.md):
//   kill:R:S   rank R kills itself with SIGKILL right after global step S,
//              on the launcher's first attempt only (restarts run clean);
//   mismatch   rank 1 issues a collective of another size than the others
//              once, before training (what --check-collectives must catch).
//   slow:R:U   rank R sleeps U microseconds per sample of each step, inside
//              its computing time (a straggler whose slowness takes no CPU
//              from the others; bench/unequal_ranks.sh).
//   inf:R:S    rank R puts +inf into one of its gradients at global step S
//              (1 = the first), after the synchronisation and before the loss
//              scaler looks: every rank must skip that step.
struct TestFault {
  int kill_rank = -1;
  int64_t kill_step = -1;
  bool mismatch = false;
  int slow_rank = -1;
  double slow_us = 0;
  int inf_rank = -1;
  int64_t inf_step = -1;
};

TestFault test_fault() {
  TestFault f;
  const char* v = std::getenv("TANDEM_TEST_FAULT");
  if (!v) return f;
  const std::string s = v;
  if (s == "mismatch") {
    f.mismatch = true;
  } else if (s.rfind("slow:", 0) == 0) {
    long long r = -1;
    double us = 0;
    TANDEM_CHECK(std::sscanf(s.c_str(), "slow:%lld:%lf", &r, &us) == 2 && us >= 0,
                 "TANDEM_TEST_FAULT='", s, "' is not slow:RANK:MICROSECONDS_PER_SAMPLE");
    f.slow_rank = static_cast<int>(r);
    f.slow_us = us;
  } else if (s.rfind("inf:", 0) == 0) {
    long long r = -1, st = -1;
    TANDEM_CHECK(std::sscanf(s.c_str(), "inf:%lld:%lld", &r, &st) == 2 && st >= 1,
                 "TANDEM_TEST_FAULT='", s, "' is not inf:RANK:STEP (STEP >= 1)");
    f.inf_rank = static_cast<int>(r);
    f.inf_step = st;
  } else {
    long long r = -1, st = -1;
    TANDEM_CHECK(std::sscanf(s.c_str(), "kill:%lld:%lld", &r, &st) == 2,
                 "TANDEM_TEST_FAULT='", s, "' is not kill:RANK:STEP, slow:RANK:US, inf:RANK:STEP or mismatch");
    f.kill_rank = static_cast<int>(r);
    f.kill_step = st;
  }
  return f;
}

// The step loop of one rank: feeds batches to the Step, tells the observers,
// takes checkpoints between segments, combines each epoch across ranks.
class Trainer {
 public:
  Trainer(const TrainOptions& o, comm::CommunicatorPtr comm);
  RunResult run();

 private:
  void train_epoch();
  // Servers serve, workers step, until `end` steps of the epoch are done.
  void run_segment(int64_t end, int64_t steps, EpochSums& sums);
  EpochResult combine(EpochSums& sums, int64_t steps, double local_seconds);
  // Starts the loader at permutation position `start` of this epoch.
  void start_loader(int64_t start);
  // --balance auto: folds the step's speed into this rank's average; every
  // kReplanEvery steps the ranks share their speeds and take new batch sizes
  // when they moved by more than kReplanDrift (a collective, at the same
  // step on every rank).
  void balance_after_step(const StepOutput& out, int64_t steps);
  bool replan();
  // The loss scaler's state into the results (which checkpoints keep).
  void note_loss_scale() {
    if (auto* s = step_->scaler()) st_.result.loss_scale = s->state();
  }

  struct Balance {
    bool on = false;
    std::vector<int64_t> batch;  // per training rank; sums to batch_size x trainers
    double rate = 0;             // this rank's samples per second of computing (moving average)
    int64_t measured = 0;
  };
  static constexpr int64_t kReplanEvery = 20;
  static constexpr double kReplanDrift = 0.10;
  static constexpr double kRateSmoothing = 0.2;  // weight of the newest step in the average

  const TrainOptions& o_;
  comm::CommunicatorPtr comm_;
  int rank_, world_;
  Roles roles_;
  bool logger_;
  int threads_;
  device::Plan plan_;
  Datasets ds_;
  PipelinePlan pp_;
  std::optional<std::string> resume_;
  std::unique_ptr<Step> step_;
  TrainState st_;
  obs::Trace trace_;
  std::unique_ptr<data::Loader> loader_, val_loader_;
  std::unique_ptr<data::DistributedSampler> sampler_;
  std::vector<int64_t> val_indices_;
  std::unique_ptr<Checkpointer> ckpt_;
  std::vector<std::unique_ptr<Observer>> observers_;
  Clock::time_point run_start_;
  TestFault fault_ = test_fault();
  Balance bal_;
};

Trainer::Trainer(const TrainOptions& o, comm::CommunicatorPtr comm)
    : o_(o), comm_(std::move(comm)), rank_(comm_->rank()), world_(comm_->size()), trace_(!o.trace_path.empty(), rank_) {
  validate(o);
  roles_ = make_roles(o, rank_, world_);
  logger_ = rank_ == roles_.log_rank && !o.quiet;
  threads_ = o.threads > 0 ? o.threads : default_threads(o.local_world_size);
  torch::set_num_threads(threads_);

  plan_ = device::plan(o.data_device, o.model_device, o.local_rank);
  TANDEM_CHECK(!plan_.model.is_cuda() || world_ == 1 || o.strategy == "ddp" || o.strategy == "none",
               "--strategy ", o.strategy, " moves gradients with Gloo point-to-point messages, which take CPU "
               "tensors only; with --model-device ", plan_.model.str(), " use --strategy ddp (or a CPU model)");
  ds_ = load_datasets(o, logger_);
  pp_ = plan_pipeline(o, ds_.sample_shape, buffer_memory(plan_.data, o.local_world_size));
  // Resuming is said even with --quiet: it changes what the run does.
  const bool says = rank_ == roles_.log_rank;
  // Before the first collective: a rank that cannot make its checkpoint
  // directory fails alone, and the others would wait.
  ckpt_ = std::make_unique<Checkpointer>(o, roles_, comm_, fingerprint(o, roles_, world_, ds_.sample_shape,
                                                                       ds_.num_classes, ds_.train->size()));
  resume_ = find_resume_point(o, *comm_, says);  // collective when resuming
  if (resume_)
    st_ = load_state(*resume_, o, roles_, world_, rank_,
                     fingerprint(o, roles_, world_, ds_.sample_shape, ds_.num_classes, ds_.train->size()), says);

  torch::manual_seed(o.seed);
  models::Model model = models::make_model({o.model, ds_.num_classes, ds_.sample_shape});
  if (resume_) load_model(*resume_, *model.module);
  else if (!o.weights.empty()) {
    // A checkpoint directory gives its model.pt.
    const auto in_ckpt = std::filesystem::path(o.weights) / "model.pt";
    models::load_weights(*model.module, std::filesystem::is_directory(o.weights) && std::filesystem::exists(in_ckpt)
                                            ? in_ckpt.string() : o.weights);
  }
  model.module->to(plan_.model);
  model.module->train();

  if (logger_) {
    std::fprintf(stderr,
                 "[tandem] strategy %s (%s), world %d, %d training rank%s, batch %lld per rank, %d thread%s per rank\n"
                 "[tandem] mode: %s; %s\n",
                 o.strategy.c_str(), method_name(o).c_str(), world_, roles_.trainers,
                 roles_.trainers == 1 ? "" : "s", static_cast<long long>(o.batch_size), threads_,
                 threads_ == 1 ? "" : "s", plan_.describe().c_str(), pp_.describe.c_str());
    if (!plan_.model.is_cuda()) {
      const auto blas = device::blas_info();
      if (blas.reference)
        std::fprintf(stderr, "[tandem] warning: %s; linear layers run over 10x slower than they could: %s\n",
                     blas.describe().c_str(), device::blas_fix());
    }
  }
  // Collective.
  if (o.pp > 1)
    step_ = std::make_unique<PipelineStep>(o, roles_, model, comm_, plan_.model, ds_.sample_shape,
                                           trace_.enabled() ? &trace_ : nullptr);
  else
    step_ = std::make_unique<DataParallelStep>(o, roles_, model, comm_, plan_.model);
  if (fault_.slow_rank == rank_) step_->set_test_slowdown(fault_.slow_us * 1e-6);
  if (fault_.mismatch && world_ > 1) {
    auto t = at::zeros({rank_ == 1 ? 3 : 2});
    comm_->all_reduce(t);
  }
  if (resume_) {
    restore_rng(st_.rng);
    load_optimizer(*resume_, st_, *step_, roles_);
    // The loss scale and its counters travel in the results so far.
    if (auto* s = step_->scaler(); s && !st_.result.loss_scale.is_null()) s->load_state(st_.result.loss_scale);
  } else {
    st_.result.start_time = iso_time_now();
    st_.result.restarts = restart_count();
  }
  // Checkpoints keep the results so far in this schema.
  st_.result.method = method_name(o);
  st_.result.world_size = world_;
  st_.result.num_workers = roles_.trainers;
  st_.result.batch_size = static_cast<int>(o.batch_size);
  st_.result.precision = o.precision;

  data::LoaderOptions lo;
  lo.batch_size = o.batch_size;
  lo.num_workers = pp_.num_workers;
  lo.buffer_size = pp_.buffer_size;
  lo.static_shapes = o.static_shapes;
  lo.train = true;
  lo.seed = o.seed;
  lo.pin_memory = plan_.model.is_cuda();
  lo.device = plan_.data;
  lo.trace = trace_.enabled() ? &trace_ : nullptr;
  // Evaluation (every rank, servers too): the same workers and devices, no
  // augmentation, no padding, no trace spans.
  data::LoaderOptions vlo = lo;
  vlo.train = false;
  vlo.static_shapes = false;
  vlo.trace = nullptr;
  val_loader_ = std::make_unique<data::Loader>(ds_.val, vlo);
  val_indices_ = data::DistributedSampler(ds_.val->size(), rank_, world_, false, 0, data::Remainder::kNone).indices();
  run_start_ = Clock::now();
  if (!roles_.server) {
    loader_ = std::make_unique<data::Loader>(ds_.train, lo);
    sampler_ = std::make_unique<data::DistributedSampler>(ds_.train->size(), roles_.trainer_index, roles_.trainers,
                                                          true, o.seed);
    // --balance: equal shares until the first measurement (also after a resume).
    bal_.on = o.balance == "auto" && roles_.trainers > 1;
    bal_.batch.assign(static_cast<size_t>(roles_.trainers), o.batch_size);
    observers_.push_back(std::make_unique<ProgressObserver>(o.epochs, roles_.trainers, *loader_, logger_, roles_.ps,
                                                            o.skip_bad_samples ? &ds_ : nullptr));
    observers_.push_back(std::make_unique<TraceObserver>(trace_));
    const double t0 = st_.result.timeline.empty() ? 0.0 : st_.result.timeline.back().t;
    observers_.push_back(std::make_unique<TimelineObserver>(st_.result.timeline, *loader_, pp_.num_workers,
                                                            run_start_, t0, trace_));
  }
}

void Trainer::run_segment(int64_t end, int64_t steps, EpochSums& sums) {
  if (roles_.server) {
    step_->server()->serve_epoch(end - st_.step);
    st_.global_step += end - st_.step;
    st_.step = end;
    return;
  }
  while (st_.step < end) {
    auto batch = loader_->next();
    TANDEM_ASSERT(batch, "rank ", rank_, " ran out of batches at step ", st_.step, " of ", steps);
    if (rank_ == fault_.inf_rank && st_.global_step + 1 == fault_.inf_step) step_->inject_test_inf();
    const StepOutput out = step_->run(*batch, st_.step, steps);
    sums.step_losses[st_.step] = out.loss;
    sums.loss_sum += out.loss * out.count;
    sums.correct += out.correct;
    sums.count += out.count;
    const auto* gsync = step_->gsync();
    if (gsync && out.synced) {
      const auto& t = gsync->last_times();
      sums.comm += t.comm;
      sums.pull += t.pull;
      sums.push += t.push;
      sums.wait += t.wait;
    }
    sums.comm += out.average_seconds;  // --sync-every: the blocking parameter average
    sums.wait += out.average_seconds;
    sums.bytes += static_cast<double>(out.bytes);
    ++st_.step;
    ++st_.global_step;
    if (bal_.on) balance_after_step(out, steps);
    const StepEvent e{st_.epoch, st_.step, steps, st_.global_step, out, gsync, sums};
    for (auto& ob : observers_) ob->after_step(e);
    ckpt_->note_progress(st_.global_step);
    if (rank_ == fault_.kill_rank && st_.global_step == fault_.kill_step && restart_count() == 0) {
      ckpt_->note_progress(st_.global_step, /*now_or_never=*/true);
      std::fprintf(stderr, "[tandem] TANDEM_TEST_FAULT: rank %d kills itself after step %lld\n", rank_,
                   static_cast<long long>(st_.global_step));
      ::raise(SIGKILL);
    }
  }
}

void Trainer::train_epoch() {
  const int epoch = st_.epoch;
  // Steps this epoch: those done before a resume, plus this world's shards of
  // the rest (Note [Resume position] in data/sampler.h).
  const int64_t rest =
      data::DistributedSampler(ds_.train->size(), 0, roles_.trainers, true, o_.seed).shard_size(st_.start_position);
  const int64_t steps =
      st_.done_before + (o_.balance == "auto" && roles_.trainers > 1
                             ? data::DistributedSampler::balanced_steps(ds_.train->size(), st_.start_position,
                                                                        o_.batch_size * roles_.trainers)
                             : (rest + o_.batch_size - 1) / o_.batch_size);
  TANDEM_CHECK(steps > 0, "the training set (", ds_.train->size(), " samples) gives no step per rank with ",
               roles_.trainers, " training ranks");
  EpochSums sums = st_.carried;
  sums.step_losses.resize(static_cast<size_t>(steps), 0.0);
  data::LoaderStats before;
  const auto t_epoch = Clock::now();
  if (!roles_.server) {
    sampler_->set_epoch(epoch);
    if (bal_.on && st_.global_step > 0) replan();  // collective: every training rank is here
    start_loader(st_.start_position);
    before = loader_->stats();
    // Controlled start: wait for a warm buffer, or the delay, whichever first.
    if (pp_.num_workers > 0) {
      auto w0 = Clock::now();
      bool warm = loader_->wait_ready(pp_.warmup_batches, o_.model_start_delay);
      if (logger_ && epoch == 1 && st_.step == 0)
        std::fprintf(stderr, "[tandem] model start after %.2f s: %s\n", seconds_since(w0),
                     warm ? (std::to_string(pp_.warmup_batches) + " batches buffered").c_str()
                          : "--model-start-delay reached");
    }
  }
  for (auto& ob : observers_) ob->epoch_begin(epoch, steps, st_.step);
  // Loader counters since the epoch began, folded into the sums.
  auto with_loader = [&](EpochSums s) {
    if (roles_.server) return s;
    const auto now = loader_->stats();
    s.data_wait += now.wait_seconds - before.wait_seconds;
    s.worker_busy += now.worker_busy_seconds - before.worker_busy_seconds;
    s.fill_sum += now.fill_sum - before.fill_sum;
    s.fill_samples += static_cast<double>(now.fill_samples - before.fill_samples);
    return s;
  };
  const int64_t ga = o_.grad_accum;
  while (st_.step < steps) {
    const int64_t to_due = ckpt_->next_due(st_.global_step) - st_.global_step;  // huge when none is due
    // A mid-epoch checkpoint waits for the end of the gradient accumulation cycle.
    const int64_t end = to_due >= steps - st_.step ? steps : std::min(steps, (st_.step + to_due + ga - 1) / ga * ga);
    run_segment(end, steps, sums);
    if (st_.step < steps) {
      note_loss_scale();
      ckpt_->take(st_, with_loader(sums), seconds_since(t_epoch), *step_);
    }
  }
  if (!roles_.server) TANDEM_ASSERT(!loader_->next(), "rank ", rank_, " has batches left after ", steps, " steps");
  const double local_seconds = seconds_since(t_epoch);
  for (auto& ob : observers_) ob->epoch_trained(epoch, steps, sums);
  sums = with_loader(sums);
  step_->consolidate();
  EpochResult er = combine(sums, steps, local_seconds);
  Tally val = evaluate(step_->model(), *val_loader_, val_indices_, *comm_, plan_.model);
  er.val_loss = val.loss_sum / std::max(1.0, val.count);
  er.val_accuracy = val.correct / std::max(1.0, val.count);
  st_.result.epochs.push_back(er);
  for (auto& ob : observers_) ob->epoch_end(er);
  // The next epoch starts from the beginning of its permutation.
  st_.epoch = epoch + 1;
  st_.step = st_.start_position = st_.done_before = 0;
  st_.elapsed = 0;
  st_.carried = EpochSums{};
  note_loss_scale();
  if (ckpt_->due_at_epoch_end(st_.global_step, epoch == o_.epochs)) ckpt_->take(st_, EpochSums{}, 0.0, *step_);
}

void Trainer::start_loader(int64_t start) {
  if (!bal_.on) {
    loader_->start_epoch(sampler_->indices(start), st_.epoch);
    return;
  }
  const int i = roles_.trainer_index;
  int64_t offset = 0;
  for (int r = 0; r < i; ++r) offset += bal_.batch[static_cast<size_t>(r)];
  const int64_t mine = bal_.batch[static_cast<size_t>(i)], global = o_.batch_size * roles_.trainers;
  loader_->start_epoch(sampler_->balanced_indices(global, start, offset, mine), st_.epoch, mine);
  step_->set_loss_weight(static_cast<double>(mine) * roles_.trainers / static_cast<double>(global));
}

void Trainer::balance_after_step(const StepOutput& out, int64_t steps) {
  // Computing time: forward, backward and the optimiser; not the data wait,
  // nor the wait for the other ranks in the synchroniser.
  const double busy = seconds(out.sync - out.fwd) + seconds(out.end - out.opt);
  if (busy > 0 && out.count > 0) {
    const double r = out.count / busy;
    bal_.rate = bal_.measured == 0 ? r : (1 - kRateSmoothing) * bal_.rate + kRateSmoothing * r;
    ++bal_.measured;
  }
  if (st_.global_step % kReplanEvery != 0 || st_.step >= steps) return;
  // Mid-epoch: the loader restarts at this step's position with the new sizes.
  if (replan())
    start_loader(st_.start_position + (st_.step - st_.done_before) * o_.batch_size * roles_.trainers);
}

bool Trainer::replan() {
  const int T = roles_.trainers;
  // Training ranks only (servers never balance): their indices are 0..T-1.
  auto rates = torch::zeros({T}, torch::kFloat64);
  rates[roles_.trainer_index] = bal_.rate;
  comm_->all_reduce(rates);
  std::vector<double> r(rates.data_ptr<double>(), rates.data_ptr<double>() + T);
  const auto next = balanced_batches(r, o_.batch_size * T);
  bool moved = false;
  for (int i = 0; i < T; ++i) {
    const double old = static_cast<double>(bal_.batch[static_cast<size_t>(i)]);
    moved |= std::abs(static_cast<double>(next[static_cast<size_t>(i)]) - old) > kReplanDrift * old;
  }
  if (!moved) return false;
  bal_.batch = next;
  if (logger_) {
    std::string sizes, speeds;
    for (int i = 0; i < T; ++i) {
      sizes += (i ? "/" : "") + std::to_string(next[static_cast<size_t>(i)]);
      speeds += (i ? "/" : "") + std::to_string(static_cast<int64_t>(r[static_cast<size_t>(i)]));
    }
    std::fprintf(stderr, "\n[tandem] balance: batch per rank %s (measured %s samples/s of computing)\n", sizes.c_str(),
                 speeds.c_str());
  }
  return true;
}

EpochResult Trainer::combine(EpochSums& s, int64_t steps, double local_seconds) {
  // Sums across ranks, and the slowest rank's time.
  s.bad_samples = ds_.train_folder ? static_cast<double>(ds_.train_folder->bad_samples()) : 0.0;
  const EpochSums g = sum_over_ranks(s, *comm_);
  auto tmax = torch::tensor({local_seconds}, torch::kFloat64);
  comm_->all_reduce(tmax, comm::ReduceOp::kMax);
  const double tt = tmax.item<double>() + st_.elapsed;
  const double T = roles_.trainers;
  // Ranks that add per-rank times and bytes: with --pp every stage of every
  // replica (T counts replicas, for losses and samples).
  const double R = o_.pp > 1 ? static_cast<double>(world_) : T;
  const double syncs = static_cast<double>((steps + o_.grad_accum - 1) / o_.grad_accum);
  EpochResult er;
  er.epoch = st_.epoch;
  er.train_time = tt;
  er.train_loss = g.loss_sum / std::max(1.0, g.count);
  er.train_accuracy = g.correct / std::max(1.0, g.count);
  er.train_throughput = g.count / tt;
  er.avg_batch_time = tt / static_cast<double>(steps);
  er.comm_bytes = g.bytes / R / static_cast<double>(std::max<int64_t>(1, steps));
  if (bal_.on)
    for (auto b : bal_.batch) er.shares.push_back(static_cast<double>(b) / static_cast<double>(o_.batch_size * roles_.trainers));
  if (roles_.ps) {
    er.avg_comm_time_pull = g.pull / syncs / T;
    er.avg_comm_time_push = g.push / syncs / T;
  } else {
    er.avg_comm_time = g.comm / syncs / R;
    er.avg_comm_wait = g.wait / syncs / R;
  }
  er.pipeline.stall_fraction = g.data_wait / R / tt;
  er.pipeline.data_busy_pct = 100.0 * g.worker_busy / R / (tt * std::max(1, pp_.num_workers));
  er.pipeline.model_busy_pct = 100.0 * (1.0 - er.pipeline.stall_fraction);
  er.pipeline.mean_buffer_fill = g.fill_sum / std::max(1.0, g.fill_samples);
  er.pipeline.bad_samples = static_cast<int64_t>(g.bad_samples);
  for (double l : g.step_losses) st_.result.all_losses.push_back(l / T);
  return er;
}

RunResult Trainer::run() {
  while (st_.epoch <= o_.epochs) train_epoch();
  ckpt_->flush();
  RunResult& result = st_.result;
  result.method = method_name(o_);
  result.world_size = world_;
  result.num_workers = roles_.trainers;
  result.batch_size = static_cast<int>(o_.batch_size);
  result.end_time = iso_time_now();
  const std::string weights = weights_path(o_, result.method);
  result.config = {{"model", o_.model},         {"dataset", o_.dataset},       {"strategy", o_.strategy},
                   {"epochs", o_.epochs},       {"lr", o_.lr},                 {"momentum", o_.momentum},
                   {"seed", o_.seed},           {"grad_accum", o_.grad_accum}, {"bucket_mb", o_.bucket_mb},
                   {"compress", o_.compress},   {"compress_warmup", o_.compress_warmup},
                   {"sync_every", o_.sync_every}, {"balance", o_.balance}, {"precision", o_.precision},
                   {"loss_scale", o_.loss_scale}, {"threads", threads_},         {"num_workers", pp_.num_workers},
                   {"buffer_size", pp_.buffer_size}, {"limit", o_.limit},      {"data_device", plan_.data.str()},
                   {"model_device", plan_.model.str()}, {"comm", comm_->backend()}, {"weights", weights},
                   {"checkpoint_dir", o_.checkpoint_dir}, {"resumed_from", resume_ ? *resume_ : ""}};
  if (o_.pp > 1) {
    result.config.update({{"pp", o_.pp}, {"micro_batches", o_.micro_batches}, {"schedule", o_.schedule},
                          {"pp_balance", o_.pp_balance}});
    result.pp = step_->describe();  // collective
  }
  if (roles_.ps)
    result.config.update({{"ps_servers", o_.ps_servers}, {"ps_mode", o_.ps_mode}, {"staleness", o_.staleness},
                          {"ps_transport", roles_.pso.transport == sync::ps::Transport::kP2P ? "p2p" : "collective"}});
  if (rank_ == roles_.log_rank) {
    if (!o_.output.empty()) write_results(result, o_.output);
    if (!weights.empty()) {
      auto parent = std::filesystem::path(weights).parent_path();
      std::error_code ec;
      if (!parent.empty()) std::filesystem::create_directories(parent, ec);
      models::save_weights(*step_->model().module, weights);
      if (!o_.quiet) std::fprintf(stderr, "[tandem] trained weights written to %s\n", weights.c_str());
    }
  }
  if (!o_.trace_path.empty()) {
    std::string path = o_.trace_path;
    if (world_ > 1) {
      auto dot = path.rfind(".json");
      path = (dot == std::string::npos ? path : path.substr(0, dot)) + ".rank" + std::to_string(rank_) + ".json";
    }
    trace_.write(path);
  }
  return result;
}

}  // namespace

RunResult run_training(const TrainOptions& o, comm::CommunicatorPtr comm) { return Trainer(o, std::move(comm)).run(); }


}  // namespace tandem::train
