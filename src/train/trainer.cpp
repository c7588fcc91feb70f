// The training loop. See include/tandem/train/trainer.h for the contract.
#include "tandem/train/trainer.h"

#include <filesystem>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <thread>

#include <torch/torch.h>

#include "tandem/comm/rendezvous.h"
#include "tandem/data/idx.h"
#include "tandem/data/image_folder.h"
#include "tandem/data/loader.h"
#include "tandem/data/sampler.h"
#include "tandem/device/device.h"
#include "tandem/models/models.h"
#include "tandem/models/weights.h"
#include "tandem/obs/progress.h"
#include "tandem/sync/ddp.h"
#include "tandem/sync/ps.h"
#include "tandem/sync/ring_sync.h"
#include "tandem/train/pipeline_plan.h"
#include "tandem/util/check.h"
#include "tandem/util/clock.h"

namespace tandem::train {
namespace {

struct Datasets {
  data::DatasetPtr train, val;
  std::shared_ptr<data::ImageFolderDataset> train_folder, val_folder;  // imagefolder only
  std::vector<int64_t> sample_shape;
  int64_t num_classes = 10;
};

Datasets load_datasets(const TrainOptions& o, bool log) {
  Datasets d;
  if (o.dataset == "fashion-mnist") {
    if (o.cache && log)
      std::fprintf(stderr, "[tandem] --cache: Fashion-MNIST is held in memory already; nothing more to cache\n");
    const std::string dir = o.data_dir.empty() ? data::kFashionMnistDir : o.data_dir;
    d.train = data::load_fashion_mnist(dir, true, o.limit);
    d.val = data::load_fashion_mnist(dir, false, o.val_limit);
  } else {
    data::ImageFolderOptions io;
    io.channels = o.channels > 0 ? o.channels : 3;
    io.image_size = o.image_size > 0 ? o.image_size : 224;
    io.skip_bad_samples = o.skip_bad_samples;
    io.cache = o.cache;
    io.cache_max_gb = o.cache_max_gb;
    io.train = true;
    auto train = std::make_shared<data::ImageFolderDataset>(o.data_dir, "train", io);
    io.train = false;
    auto val = std::make_shared<data::ImageFolderDataset>(o.data_dir, "val", io);
    if (o.cache) {
      // Every local rank reshuffles the whole data set each epoch, so each ends
      // up holding all of it: the host needs local ranks x (train + val).
      const double per_rank = train->cache_estimate_bytes() + val->cache_estimate_bytes();
      const double host_gb = per_rank * std::max(1, o.local_world_size) / 1e9;
      TANDEM_CHECK(host_gb <= o.cache_max_gb, "--cache: ", std::max(1, o.local_world_size),
                   " local ranks x (train + val) need about ", host_gb, " GB of decoded images, more than "
                   "--cache-max-gb ", o.cache_max_gb, "; raise --cache-max-gb (this machine must have the memory), "
                   "use fewer local ranks, or drop --cache");
      if (log)
        std::fprintf(stderr,
                     "[tandem] --cache: decoded images kept in memory, about %.1f MB train + %.1f MB val per rank\n",
                     train->cache_estimate_bytes() / 1e6, val->cache_estimate_bytes() / 1e6);
    }
    d.train = d.train_folder = train;
    d.val = d.val_folder = val;
  }
  d.sample_shape = d.train->sample_shape();
  d.num_classes = o.num_classes > 0 ? o.num_classes : d.train->num_classes();
  return d;
}

// Sums of one epoch's training or evaluation on this rank.
struct Tally {
  double loss_sum = 0, correct = 0, count = 0;
};

// Masked mean cross-entropy and correct count of one batch.
std::pair<at::Tensor, double> loss_and_correct(const at::Tensor& logits, const data::Batch& b,
                                               const at::Tensor& target) {
  namespace F = torch::nn::functional;
  if (!b.mask.defined()) {
    auto loss = F::cross_entropy(logits, target);
    double correct = logits.argmax(1).eq(target).sum().item<double>();
    return {loss, correct};
  }
  auto mask = b.mask.to(logits.device());
  auto per = F::cross_entropy(logits, target, F::CrossEntropyFuncOptions().reduction(torch::kNone));
  auto n = mask.sum().clamp_min(1);
  auto loss = (per * mask).sum() / n;
  double correct = (logits.argmax(1).eq(target) & mask).sum().item<double>();
  return {loss, correct};
}

// The batch's input and target on the model device, once the loader's upload
// (if any) is visible to the current stream. Non-blocking only towards CUDA:
// a device-to-host copy must have landed before the CPU reads it.
std::pair<at::Tensor, at::Tensor> on_model_device(data::Batch& b, const c10::Device& model) {
  data::make_ready(b, model);
  const bool async_copy = model.is_cuda();
  return {b.input.to(model, async_copy), b.target.to(model, async_copy)};
}

// Exact distributed evaluation: each rank takes a disjoint slice of the
// validation set (no padding, no duplicates), loaded by `loader`'s workers
// like the training data; the sums are all-reduced.
Tally evaluate(const models::Model& m, data::Loader& loader, const std::vector<int64_t>& indices,
               comm::Communicator& comm, const c10::Device& dev) {
  torch::NoGradGuard guard;
  m.module->eval();
  Tally t;
  loader.start_epoch(indices, 0);
  while (auto b = loader.next()) {
    auto [x, y] = on_model_device(*b, dev);
    auto logits = m.forward(x);
    t.loss_sum += torch::nn::functional::cross_entropy(
                      logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                      .item<double>();
    t.correct += logits.argmax(1).eq(y).sum().item<double>();
    t.count += static_cast<double>(b->valid());
  }
  auto v = torch::tensor({t.loss_sum, t.correct, t.count}, torch::kFloat64);
  comm.all_reduce(v);
  m.module->train();
  return {v[0].item<double>(), v[1].item<double>(), v[2].item<double>()};
}

std::string fmt(const char* f, double a, double b, double c, double d) {
  char buf[160];
  std::snprintf(buf, sizeof buf, f, a, b, c, d);
  return buf;
}

void write_results(const RunResult& r, const std::string& output) {
  std::string path = output;
  if (path.size() < 5 || path.substr(path.size() - 5) != ".json") {
    std::error_code ec;
    std::filesystem::create_directories(output, ec);
    TANDEM_CHECK(!ec, "--output: cannot create directory ", output, ": ", ec.message());
    path = output + "/" + results_file_name(r.method);
  }
  std::ofstream f(path);
  TANDEM_CHECK(f, "--output: cannot write ", path, " (does its directory exist and is it writable?)");
  f << to_json(r).dump(2) << "\n";
  TANDEM_CHECK(f.good(), "--output: write to ", path, " failed (disk full?)");
  std::fprintf(stderr, "[tandem] results written to %s\n", path.c_str());
}

}  // namespace

std::string method_name(const std::string& strategy) {
  if (strategy == "ddp") return "baseline_ddp";
  if (strategy == "ring") return "all_reduce";
  if (strategy == "ps") return "ps";
  if (strategy == "none") return "compute_only";
  return strategy;
}

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
  sync::parse_compression(o.compress);
  comm::validate_comm(o.comm);
  TANDEM_CHECK(o.compress == "none" || o.strategy == "ddp" || o.strategy == "ring", "--compress ", o.compress,
               " applies to --strategy ddp or ring, not ", o.strategy);
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
  bool known = false;
  for (auto& n : models::model_names()) known |= n == o.model;
  if (!known) models::make_model({o.model});  // throws the message listing the names
}

int default_threads(int local_ranks) {
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / std::max(1, local_ranks));
}

RunResult run_training(const TrainOptions& o, comm::CommunicatorPtr comm) {
  validate(o);
  const int rank = comm->rank(), world = comm->size();
  const bool ps = o.strategy == "ps";
  sync::ps::PsOptions pso;
  if (ps) {
    pso.num_servers = o.ps_servers;
    pso.mode = sync::ps::parse_mode(o.ps_mode);
    pso.staleness = o.staleness;
    // auto: collectives where they apply (sync), messages otherwise (async, ssp).
    const std::string transport =
        o.ps_transport == "auto" ? (pso.mode == sync::ps::Mode::kSync ? "collective" : "p2p") : o.ps_transport;
    pso.transport = sync::ps::parse_transport(transport);
    pso.lr = o.lr;
    pso.momentum = o.momentum;
    sync::ps::validate(pso, world);
  }
  const bool server = ps && sync::ps::is_server(rank, pso);
  const int trainers = ps ? sync::ps::num_workers(world, pso) : world;
  const int trainer_index = ps ? (server ? -1 : sync::ps::worker_index(rank, pso)) : rank;
  const int log_rank = ps ? pso.num_servers : 0;  // the first training rank shows progress
  const bool logger = rank == log_rank && !o.quiet;

  const int threads = o.threads > 0 ? o.threads : default_threads(o.local_world_size);
  torch::set_num_threads(threads);

  auto plan = device::plan(o.data_device, o.model_device, o.local_rank);
  TANDEM_CHECK(!plan.model.is_cuda() || world == 1 || o.strategy == "ddp" || o.strategy == "none",
               "--strategy ", o.strategy, " moves gradients with Gloo point-to-point messages, which take CPU "
               "tensors only; with --model-device ", plan.model.str(), " use --strategy ddp (or a CPU model)");
  Datasets ds = load_datasets(o, logger);
  PipelinePlan pp = plan_pipeline(o, ds.sample_shape, buffer_memory(plan.data, o.local_world_size));

  torch::manual_seed(o.seed);
  models::Model model = models::make_model({o.model, ds.num_classes, ds.sample_shape});
  if (!o.weights.empty()) models::load_weights(*model.module, o.weights);
  model.module->to(plan.model);
  model.module->train();

  if (logger) {
    std::fprintf(stderr,
                 "[tandem] strategy %s (%s), world %d, %d training rank%s, batch %lld per rank, %d thread%s per rank\n"
                 "[tandem] mode: %s; %s\n",
                 o.strategy.c_str(), method_name(o.strategy).c_str(), world, trainers, trainers == 1 ? "" : "s",
                 static_cast<long long>(o.batch_size), threads, threads == 1 ? "" : "s", plan.describe().c_str(),
                 pp.describe.c_str());
    if (!plan.model.is_cuda()) {
      const auto blas = device::blas_info();
      if (blas.reference)
        std::fprintf(stderr, "[tandem] warning: %s; linear layers run over 10x slower than they could: %s\n",
                     blas.describe().c_str(), device::blas_fix());
    }
  }

  // The gradient synchroniser (or the server role).
  sync::GradientSyncPtr gsync;
  std::unique_ptr<sync::ps::Server> ps_server;
  sync::DdpOptions ddpo;
  ddpo.bucket_mb = o.bucket_mb;
  ddpo.compression = sync::parse_compression(o.compress);
  if (o.strategy == "ddp") gsync = std::make_unique<sync::DistributedDataParallel>(model.module, comm, ddpo);
  else if (o.strategy == "ring") gsync = std::make_unique<sync::RingSync>(model.module, comm, ddpo);
  else if (server) ps_server = std::make_unique<sync::ps::Server>(model.module, comm, pso);
  else if (ps) gsync = std::make_unique<sync::ps::Worker>(model.module, comm, pso);
  else sync::broadcast_module(*model.module, *comm);  // "none": same start, no gradient traffic

  torch::optim::SGD optimizer(model.module->parameters(), torch::optim::SGDOptions(o.lr).momentum(o.momentum));

  obs::Trace trace(!o.trace_path.empty(), rank);
  data::LoaderOptions lo;
  lo.batch_size = o.batch_size;
  lo.num_workers = pp.num_workers;
  lo.buffer_size = pp.buffer_size;
  lo.static_shapes = o.static_shapes;
  lo.train = true;
  lo.seed = o.seed;
  lo.pin_memory = plan.model.is_cuda();
  lo.device = plan.data;
  lo.trace = trace.enabled() ? &trace : nullptr;
  std::unique_ptr<data::Loader> loader;
  std::unique_ptr<data::DistributedSampler> sampler;
  // Evaluation (every rank, servers too): the same workers and devices, no
  // augmentation, no padding, no trace spans.
  data::LoaderOptions vlo = lo;
  vlo.train = false;
  vlo.static_shapes = false;
  vlo.trace = nullptr;
  data::Loader val_loader(ds.val, vlo);
  const auto val_indices =
      data::DistributedSampler(ds.val->size(), rank, world, false, 0, data::Remainder::kNone).indices();
  if (!server) {
    loader = std::make_unique<data::Loader>(ds.train, lo);
    sampler = std::make_unique<data::DistributedSampler>(ds.train->size(), trainer_index, trainers, true, o.seed);
  }
  // Every rank (servers too) knows how many steps an epoch has.
  const int64_t shard = data::DistributedSampler(ds.train->size(), 0, trainers, true, o.seed).shard_size();
  const int64_t steps = (shard + o.batch_size - 1) / o.batch_size;
  TANDEM_CHECK(steps > 0, "the training set (", ds.train->size(), " samples) gives no step per rank with ",
               trainers, " training ranks");

  RunResult result;
  result.method = method_name(o.strategy);
  result.world_size = world;
  result.num_workers = trainers;
  result.batch_size = static_cast<int>(o.batch_size);
  result.start_time = iso_time_now();
  const auto run_start = Clock::now();
  double last_sample_t = -1, last_worker_busy = 0, last_model_busy = 0, model_busy_total = 0;

  for (int epoch = 1; epoch <= o.epochs; ++epoch) {
    EpochResult er;
    er.epoch = epoch;
    std::vector<double> step_losses(steps, 0.0);
    Tally tally;
    double comm_sum = 0, pull_sum = 0, push_sum = 0, wait_sum = 0;
    data::LoaderStats before;
    const auto t_epoch = Clock::now();
    if (server) {
      ps_server->serve_epoch(steps);
    } else {
      sampler->set_epoch(epoch);
      loader->start_epoch(sampler->indices(), epoch);
      before = loader->stats();
      // Controlled start: wait for a warm buffer, or the delay, whichever first.
      if (pp.num_workers > 0) {
        auto w0 = Clock::now();
        bool warm = loader->wait_ready(pp.warmup_batches, o.model_start_delay);
        if (logger && epoch == 1)
          std::fprintf(stderr, "[tandem] model start after %.2f s: %s\n", seconds(Clock::now() - w0),
                       warm ? (std::to_string(pp.warmup_batches) + " batches buffered").c_str()
                            : "--model-start-delay reached");
      }
      obs::ProgressBar bar("epoch " + std::to_string(epoch) + "/" + std::to_string(o.epochs), steps, logger);
      const auto t_train = Clock::now();
      int64_t step = 0;
      while (auto batch = loader->next()) {
        auto s0 = Clock::now();
        const bool sync_now = (step + 1) % o.grad_accum == 0 || step + 1 == steps;
        // Gradients set to none rather than zeroed (PyTorch 2.x's default,
        // zero_grad(set_to_none=True)): backward hands each gradient over
        // instead of adding it to zeros, and DDP's hook has nothing to add.
        if (step % o.grad_accum == 0)
          for (auto& group : optimizer.param_groups())
            for (auto& p : group.params()) p.mutable_grad() = at::Tensor();
        if (gsync) gsync->begin_step(sync_now);
        auto s_xfer = Clock::now();
        auto [x, y] = on_model_device(*batch, plan.model);
        auto s_fwd = Clock::now();
        auto logits = model.forward(x);
        auto [loss, correct] = loss_and_correct(logits, *batch, y);
        const int accum = std::min<int64_t>(o.grad_accum, steps - (step / o.grad_accum) * o.grad_accum);
        auto s_bwd = Clock::now();
        (accum > 1 ? loss / accum : loss).backward();
        auto s_sync = Clock::now();
        if (gsync) gsync->finish();
        auto s_opt = Clock::now();
        if (sync_now && !(gsync && gsync->applies_update())) optimizer.step();
        auto s1 = Clock::now();
        if (trace.enabled()) {
          // CPU-side spans: on CUDA they show launch time, not kernel time.
          trace.span("step " + std::to_string(step), "train", s0, s1);
          if (gsync && gsync->applies_update()) trace.span("pull", "step phases", s0, s_xfer);
          trace.span("transfer", "step phases", s_xfer, s_fwd);
          trace.span("forward", "step phases", s_fwd, s_bwd);
          trace.span("backward", "step phases", s_bwd, s_sync);
          if (gsync) trace.span("sync wait", "step phases", s_sync, s_opt);
          trace.span("optimizer", "step phases", s_opt, s1);
          if (gsync && sync_now)
            for (const auto& c : gsync->last_times().spans) trace.span(c.name, "comm", c.begin, c.end);
        }
        const double l = loss.item<double>();
        const double n = static_cast<double>(batch->valid());
        step_losses[step] = l;
        tally.loss_sum += l * n;
        tally.correct += correct;
        tally.count += n;
        if (gsync && sync_now) {
          const auto& t = gsync->last_times();
          comm_sum += t.comm;
          pull_sum += t.pull;
          push_sum += t.push;
          wait_sum += t.wait;
        }
        model_busy_total += seconds(s1 - s0);
        ++step;
        // Utilisation timeline, sampled at most 4 times a second.
        const double now = seconds(s1 - run_start);
        if (now - last_sample_t >= 0.25) {
          auto st = loader->stats();
          double dt = last_sample_t < 0 ? now : now - last_sample_t;
          double wb = st.worker_busy_seconds;
          TimelinePoint p;
          p.t = now;
          p.buffer_fill = loader->buffer_fill();
          p.data_busy = std::min(1.0, (wb - last_worker_busy) / (dt * std::max(1, pp.num_workers)));
          p.model_busy = std::min(1.0, (model_busy_total - last_model_busy) / dt);
          result.timeline.push_back(p);
          trace.counter("buffer fill", p.buffer_fill, s1);
          last_sample_t = now;
          last_worker_busy = wb;
          last_model_busy = model_busy_total;
        }
        if (logger && bar.due(step)) {
          const double el = seconds(s1 - t_train);
          auto st = loader->stats();
          bar.update(step, fmt("loss %.4f acc %.3f %.0f img/s stall %.1f%%", tally.loss_sum / tally.count,
                               tally.correct / tally.count, tally.count * trainers / el,
                               100.0 * (st.wait_seconds - before.wait_seconds) / el));
        }
      }
      TANDEM_ASSERT(step == steps, "rank ", rank, " ran ", step, " steps, expected ", steps);
      bar.finish(fmt("loss %.4f acc %.3f %.0f img/s (%.0f steps)", tally.loss_sum / std::max(1.0, tally.count),
                     tally.correct / std::max(1.0, tally.count),
                     tally.count * trainers / seconds(Clock::now() - t_train), static_cast<double>(steps)));
    }
    if (ps) sync::ps::finalize_epoch(*model.module, *comm, pso);
    const double train_time_local = seconds(Clock::now() - t_epoch);
    // Combine the epoch across ranks: sums, and the slowest rank's time.
    const int64_t syncs = (steps + o.grad_accum - 1) / o.grad_accum;
    auto st = server ? data::LoaderStats{} : loader->stats();
    auto sums = torch::tensor({tally.loss_sum, tally.correct, tally.count, comm_sum / syncs, pull_sum / syncs,
                               push_sum / syncs, st.wait_seconds - before.wait_seconds,
                               st.worker_busy_seconds - before.worker_busy_seconds,
                               (st.fill_sum - before.fill_sum) / std::max<int64_t>(1, st.fill_samples - before.fill_samples),
                               wait_sum / syncs,
                               static_cast<double>(ds.train_folder ? ds.train_folder->bad_samples() : 0)},
                              torch::kFloat64);
    comm->all_reduce(sums);
    auto tmax = torch::tensor({train_time_local}, torch::kFloat64);
    comm->all_reduce(tmax, comm::ReduceOp::kMax);
    auto losses = torch::tensor(step_losses, torch::kFloat64);
    comm->all_reduce(losses);
    const double tt = tmax.item<double>();
    er.train_time = tt;
    er.train_loss = sums[0].item<double>() / std::max(1.0, sums[2].item<double>());
    er.train_accuracy = sums[1].item<double>() / std::max(1.0, sums[2].item<double>());
    er.train_throughput = sums[2].item<double>() / tt;
    er.avg_batch_time = tt / steps;
    if (ps) {
      er.avg_comm_time_pull = sums[4].item<double>() / trainers;
      er.avg_comm_time_push = sums[5].item<double>() / trainers;
    } else {
      er.avg_comm_time = sums[3].item<double>() / trainers;
      er.avg_comm_wait = sums[9].item<double>() / trainers;
    }
    er.pipeline.stall_fraction = sums[6].item<double>() / trainers / tt;
    er.pipeline.data_busy_pct = 100.0 * sums[7].item<double>() / trainers / (tt * std::max(1, pp.num_workers));
    er.pipeline.model_busy_pct = 100.0 * (1.0 - er.pipeline.stall_fraction);
    er.pipeline.mean_buffer_fill = sums[8].item<double>() / trainers;
    er.pipeline.bad_samples = static_cast<int64_t>(sums[10].item<double>());
    for (int64_t i = 0; i < steps; ++i) result.all_losses.push_back(losses[i].item<double>() / trainers);

    Tally val = evaluate(model, val_loader, val_indices, *comm, plan.model);
    er.val_loss = val.loss_sum / std::max(1.0, val.count);
    er.val_accuracy = val.correct / std::max(1.0, val.count);
    result.epochs.push_back(er);
    if (logger) {
      std::fprintf(stderr,
                   "[tandem] epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s, %.0f img/s, "
                   "comm %.2f ms/step, stall %.1f%%\n",
                   epoch, er.train_loss, er.train_accuracy, er.val_loss, er.val_accuracy, er.train_time,
                   er.train_throughput, 1e3 * (ps ? er.avg_comm_time_pull + er.avg_comm_time_push : er.avg_comm_time),
                   100 * er.pipeline.stall_fraction);
      if (o.skip_bad_samples && ds.train_folder)
        std::fprintf(stderr,
                     "[tandem] --skip-bad-samples: %lld undecodable training image loads replaced so far (all ranks), "
                     "%lld validation loads on this rank\n",
                     static_cast<long long>(er.pipeline.bad_samples),
                     static_cast<long long>(ds.val_folder ? ds.val_folder->bad_samples() : 0));
    }
  }
  result.end_time = iso_time_now();
  result.config = {{"model", o.model},         {"dataset", o.dataset},       {"strategy", o.strategy},
                   {"epochs", o.epochs},       {"lr", o.lr},                 {"momentum", o.momentum},
                   {"seed", o.seed},           {"grad_accum", o.grad_accum}, {"bucket_mb", o.bucket_mb},
                   {"compress", o.compress},   {"threads", threads},         {"num_workers", pp.num_workers},
                   {"buffer_size", pp.buffer_size}, {"limit", o.limit},      {"data_device", plan.data.str()},
                   {"model_device", plan.model.str()}, {"comm", comm->backend()}};
  if (ps)
    result.config.update({{"ps_servers", o.ps_servers}, {"ps_mode", o.ps_mode}, {"staleness", o.staleness},
                          {"ps_transport", pso.transport == sync::ps::Transport::kP2P ? "p2p" : "collective"}});
  if (rank == log_rank && !o.output.empty()) write_results(result, o.output);
  if (!o.trace_path.empty()) {
    std::string path = o.trace_path;
    if (world > 1) {
      auto dot = path.rfind(".json");
      path = (dot == std::string::npos ? path : path.substr(0, dot)) + ".rank" + std::to_string(rank) + ".json";
    }
    trace.write(path);
  }
  return result;
}

}  // namespace tandem::train
