// Parameter server: the worker side (pull parameters, push gradients).
#include <chrono>

#include <torch/torch.h>

#include "tandem/sync/ps.h"
#include "tandem/util/check.h"
#include "tandem/util/clock.h"

namespace tandem::sync::ps {

Worker::Worker(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, PsOptions opts)
    : module_(std::move(module)),
      comm_(std::move(comm)),
      opts_(opts),
      flat_params_(detail::prepare_role(*module_, *comm_, opts_, /*server=*/false)) {
  detail::check_total(flat_params_, opts_);
  layout_ = ShardLayout(flat_params_.total(), opts_.num_servers);
  auto o = at::TensorOptions().dtype(flat_params_.dtype());
  params_ = at::empty({flat_params_.total()}, o);
  grads_ = at::empty({flat_params_.total()}, o);
  header_ = at::zeros({2}, at::kLong);
  codec_ = make_codec(opts_.compress, opts_.seed * 1000003u + static_cast<uint64_t>(comm_->rank()));
  if (codec_)
    for (int k = 0; k < opts_.num_servers; ++k) payloads_.push_back(codec_->payload_like(layout_.shard(k).size()));
}

void Worker::begin_step(bool sync) {
  TANDEM_CHECK(sync, "the parameter server does not support gradient accumulation (--grad-accum > 1): every "
                     "micro-step pushes a gradient; use --grad-accum 1 with --sync ps");
  sync_ = true;
  times_ = {};
  auto t0 = Clock::now();
  pull();
  times_.pull = seconds_since(t0);
  pulled_ = true;
}

void Worker::finish() {
  TANDEM_CHECK(pulled_, "ps::Worker::finish() without begin_step(true): every step pulls before it pushes");
  auto t0 = Clock::now();
  push();
  times_.push = seconds_since(t0);
  times_.comm = times_.pull + times_.push;
  times_.wait = times_.comm;
  pulled_ = false;
}

void Worker::pull() {
  const int K = opts_.num_servers;
  std::vector<at::Tensor> slices;
  for (int k = 0; k < K; ++k) {
    auto r = layout_.shard(k);
    slices.push_back(params_.slice(0, r.begin, r.end));
  }
  detail::OpBatch ops(*comm_);
  if (opts_.transport == Transport::kCollective) {
    for (int k = 0; k < K; ++k) ops.broadcast(slices[k], k);
  } else {
    // Receives first, so the server's answer finds them posted.
    for (int k = 0; k < K; ++k) ops.recv(slices[k], k, detail::kTagPull);
    if (opts_.mode != Mode::kSync) {
      header_.data_ptr<int64_t>()[0] = detail::kHeaderPull;
      header_.data_ptr<int64_t>()[1] = clock_;
      for (int k = 0; k < K; ++k) ops.send(header_, k, detail::kTagHeader);
    }
  }
  ops.wait();
  flat_params_.scatter_params(params_, flat_params_.all());
}

void Worker::push() {
  const int K = opts_.num_servers;
  flat_params_.gather_grads(grads_, flat_params_.all());
  std::vector<at::Tensor> slices;
  for (int k = 0; k < K; ++k) {
    auto r = layout_.shard(k);
    slices.push_back(grads_.slice(0, r.begin, r.end));
  }
  detail::OpBatch ops(*comm_);
  if (opts_.transport == Transport::kCollective) {
    for (int k = 0; k < K; ++k) ops.reduce(slices[k], k);
    // A reduce to each server: the tree or ring behind it sends about the shard's bytes per rank.
    times_.bytes += grads_.numel() * static_cast<int64_t>(grads_.element_size());
  } else {
    if (opts_.mode != Mode::kSync) {
      header_.data_ptr<int64_t>()[0] = detail::kHeaderPush;
      header_.data_ptr<int64_t>()[1] = clock_;
    }
    for (int k = 0; k < K; ++k) {
      if (opts_.mode != Mode::kSync) ops.send(header_, k, detail::kTagHeader);
      if (codec_) {
        torch::NoGradGuard guard;
        codec_->encode(slices[k], payloads_[k], k);
      }
      auto& msg = codec_ ? payloads_[k] : slices[k];
      ops.send(msg, k, detail::kTagPush);
      times_.bytes += msg.numel() * static_cast<int64_t>(msg.element_size());
    }
  }
  ops.wait();
  ++clock_;
}

}  // namespace tandem::sync::ps
