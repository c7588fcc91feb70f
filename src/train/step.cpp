// The data-parallel step, data sets, roles and evaluation. See step.h.
#include "step.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <thread>

#include <torch/torch.h>

#include "tandem/data/idx.h"
#include "tandem/sync/ddp.h"
#include "tandem/sync/ring_sync.h"
#include "tandem/util/check.h"

namespace tandem::train {
namespace {

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

}  // namespace

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

Roles make_roles(const TrainOptions& o, int rank, int world) {
  Roles r;
  r.ps = o.strategy == "ps";
  if (r.ps) {
    auto& pso = r.pso;
    pso.num_servers = o.ps_servers;
    pso.mode = sync::ps::parse_mode(o.ps_mode);
    pso.staleness = o.staleness;
    pso.compress = sync::parse_compress(o.compress);
    pso.seed = o.seed;
    // auto: collectives where they apply (sync, uncompressed), messages
    // otherwise (async, ssp, a compressed push).
    const bool collective = pso.mode == sync::ps::Mode::kSync && pso.compress.none();
    const std::string transport = o.ps_transport == "auto" ? (collective ? "collective" : "p2p") : o.ps_transport;
    pso.transport = sync::ps::parse_transport(transport);
    pso.lr = o.lr;
    pso.momentum = o.momentum;
    sync::ps::validate(pso, world);
  }
  r.server = r.ps && sync::ps::is_server(rank, r.pso);
  r.trainers = r.ps ? sync::ps::num_workers(world, r.pso) : world;
  r.trainer_index = r.ps ? (r.server ? -1 : sync::ps::worker_index(rank, r.pso)) : rank;
  r.log_rank = r.ps ? r.pso.num_servers : 0;
  if (o.pp > 1) {
    // Checked here, before any collective, so that every rank fails alike.
    TANDEM_CHECK(world % o.pp == 0, "--pp ", o.pp, ": the world size ", world, " is not a multiple of the stage "
                 "count; start D x ", o.pp, " ranks (--nproc), D data-parallel replicas of a ", o.pp, "-stage pipeline");
    r.trainers = world / o.pp;
    r.trainer_index = rank / o.pp;
    r.log_rank = o.pp - 1;  // the last stage of replica 0 sees the loss
  }
  return r;
}

sync::DdpOptions ddp_options(const TrainOptions& o) {
  sync::DdpOptions d;
  d.bucket_mb = o.bucket_mb;
  d.compress = sync::parse_compress(o.compress);
  d.compress.warmup = o.compress_warmup;
  d.seed = o.seed;
  return d;
}

DataParallelStep::DataParallelStep(const TrainOptions& o, const Roles& roles, models::Model model,
                                   comm::CommunicatorPtr comm, c10::Device model_device)
    : o_(o), roles_(roles), model_(std::move(model)), comm_(std::move(comm)), device_(model_device) {
  const sync::DdpOptions ddpo = ddp_options(o);
  if (o.sync_every > 1) {
    // Local SGD: the same start, then parameter averages every --sync-every steps.
    sync::broadcast_module(*model_.module, *comm_);
    averager_ = std::make_unique<sync::ParameterAverager>(model_.module, comm_, o.strategy == "ring");
  } else if (o.strategy == "ddp") gsync_ = std::make_unique<sync::DistributedDataParallel>(model_.module, comm_, ddpo);
  else if (o.strategy == "ring") gsync_ = std::make_unique<sync::RingSync>(model_.module, comm_, ddpo);
  else if (roles_.server) server_ = std::make_unique<sync::ps::Server>(model_.module, comm_, roles_.pso);
  else if (roles_.ps) gsync_ = std::make_unique<sync::ps::Worker>(model_.module, comm_, roles_.pso);
  else sync::broadcast_module(*model_.module, *comm_);  // "none": same start, no gradient traffic
  optimizer_ = std::make_unique<torch::optim::SGD>(model_.module->parameters(),
                                                   torch::optim::SGDOptions(o.lr).momentum(o.momentum));
  precision_ = parse_precision(o.precision);
  if (auto so = parse_loss_scale(o.loss_scale, precision_); so && !roles_.server) {
    scaler_ = std::make_unique<LossScaler>(*so);
    params_ = model_.module->parameters();
  }
}

StepOutput DataParallelStep::run(data::Batch& batch, int64_t step, int64_t steps) {
  StepOutput out;
  out.begin = Clock::now();
  const int ga = o_.grad_accum;
  out.synced = (step + 1) % ga == 0 || step + 1 == steps;
  // Gradients set to none rather than zeroed (PyTorch 2.x's default,
  // zero_grad(set_to_none=True)): backward hands each gradient over instead
  // of adding it to zeros, and DDP's hook has nothing to add.
  if (step % ga == 0)
    for (auto& group : optimizer_->param_groups())
      for (auto& p : group.params()) p.mutable_grad() = at::Tensor();
  if (gsync_) gsync_->begin_step(out.synced);
  out.xfer = Clock::now();
  auto [x, y] = on_model_device(batch, device_);
  out.fwd = Clock::now();
  at::Tensor logits;
  {
    AutocastGuard autocast(device_.type(), precision_);
    logits = model_.forward(x);
  }
  // The loss in fp32 whatever the forward computed in (a no-op for fp32).
  auto [loss, correct] = loss_and_correct(logits.to(at::kFloat), batch, y);
  const int64_t accum = std::min<int64_t>(ga, steps - (step / ga) * ga);
  out.bwd = Clock::now();
  const double scale = loss_weight_ / static_cast<double>(accum);
  at::Tensor objective = scale != 1.0 ? loss * scale : loss;
  if (scaler_) objective = scaler_->scale(objective);
  objective.backward();
  if (slow_per_sample_ > 0)
    std::this_thread::sleep_for(std::chrono::duration<double>(slow_per_sample_ * static_cast<double>(batch.valid())));
  out.sync = Clock::now();
  if (gsync_) {
    gsync_->finish();
    if (out.synced) out.bytes = gsync_->last_times().bytes;
  }
  if (inject_inf_) {
    inject_inf_ = false;
    torch::NoGradGuard no_grad;
    for (auto& p : model_.module->parameters())
      if (p.grad().defined()) {
        p.grad().view(-1)[0].fill_(std::numeric_limits<float>::infinity());
        break;
      }
  }
  out.opt = Clock::now();
  bool step_ok = true;
  if (out.synced && scaler_) {
    // Collective: every rank is here at every synchronised step.
    step_ok = scaler_->unscale_and_check(params_, comm_.get());
    scaler_->update(!step_ok);
  }
  if (out.synced && step_ok && !(gsync_ && gsync_->applies_update())) optimizer_->step();
  if (averager_ && ++local_steps_ >= o_.sync_every) {
    const auto t0 = Clock::now();
    const int64_t before = averager_->bytes_sent();
    averager_->average();
    local_steps_ = 0;
    out.bytes = averager_->bytes_sent() - before;
    out.average_seconds = seconds_since(t0);
  }
  out.end = Clock::now();
  out.loss = loss.item<double>();
  out.correct = correct;
  out.count = static_cast<double>(batch.valid());
  return out;
}

void DataParallelStep::consolidate() {
  if (averager_ && local_steps_ > 0) {
    // Local SGD: the ranks' models meet before evaluation and checkpoints.
    averager_->average();
    local_steps_ = 0;
  }
  if (roles_.ps) {
    sync::ps::finalize_epoch(*model_.module, *comm_, roles_.pso);
  } else if (gsync_ || averager_) {
    // Buffers (batch-norm statistics) are each rank's own during the epoch;
    // rank 0's go to all, as PyTorch DDP's broadcast_buffers does, so that
    // evaluation and checkpoints see one model.
    torch::NoGradGuard guard;
    for (auto& b : model_.module->buffers(/*recurse=*/true)) comm_->broadcast(b, 0);
  }
}

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

}  // namespace tandem::train
