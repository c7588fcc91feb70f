// Parameter server: the server side (owns one shard and its SGD state).
#include <algorithm>
#include <limits>

#include <torch/torch.h>

#include "tandem/sync/ps.h"
#include "tandem/util/check.h"

namespace tandem::sync::ps {

Server::Server(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, PsOptions opts)
    : module_(std::move(module)),
      comm_(std::move(comm)),
      opts_(opts),
      flat_params_(detail::prepare_role(*module_, *comm_, opts_, /*server=*/true)) {
  detail::check_total(flat_params_, opts_);
  layout_ = ShardLayout(flat_params_.total(), opts_.num_servers);
  mine_ = layout_.shard(comm_->rank());
  flat_ = at::empty({flat_params_.total()}, at::TensorOptions().dtype(flat_params_.dtype()));
  shard_ = flat_.slice(0, mine_.begin, mine_.end);
  codec_ = make_codec(opts_.compress, opts_.seed);
  if (codec_) payload_ = codec_->payload_like(mine_.size());
}

void Server::recv_push(at::Tensor& grad, int src, detail::OpBatch& ops) {
  if (!codec_) {
    ops.recv(grad, src, detail::kTagPush);
    ops.wait();
    return;
  }
  ops.recv(payload_, src, detail::kTagPush);
  ops.wait();
  grad.zero_();
  codec_->decode_add(payload_, grad, 1.0);
}

void Server::serve_epoch(int64_t steps_per_worker) {
  TANDEM_CHECK(steps_per_worker >= 0, "ps::Server::serve_epoch: steps per worker must be >= 0, got ",
               steps_per_worker);
  // The module is the source of truth between epochs (finalize_epoch, or a
  // restored checkpoint, may have written it).
  flat_params_.gather_params(flat_, mine_);
  if (opts_.mode == Mode::kSync) {
    if (opts_.transport == Transport::kCollective)
      serve_sync_collective(steps_per_worker);
    else
      serve_sync_p2p(steps_per_worker);
  } else {
    serve_async(steps_per_worker);
  }
  flat_params_.scatter_params(flat_, mine_);
}

void Server::restore(const at::Tensor& momentum, int64_t updates) {
  TANDEM_CHECK(!momentum.defined() || momentum.numel() == mine_.size(), "parameter server rank ", comm_->rank(),
               ": the checkpoint's momentum has ", momentum.numel(), " elements for a shard of ", mine_.size());
  has_momentum_ = momentum.defined();
  if (has_momentum_) momentum_buf_ = momentum.to(flat_.scalar_type()).contiguous().clone();
  updates_ = updates;
}

void Server::apply(const at::Tensor& grad) {
  torch::NoGradGuard g;
  if (opts_.momentum == 0) {
    shard_.add_(grad, -opts_.lr);
  } else {
    if (!has_momentum_) {
      momentum_buf_ = grad.clone();
      has_momentum_ = true;
    } else {
      momentum_buf_.mul_(opts_.momentum).add_(grad);
    }
    shard_.add_(momentum_buf_, -opts_.lr);
  }
  ++updates_;
}

void Server::serve_sync_collective(int64_t steps) {
  const int K = opts_.num_servers, W = num_workers(comm_->size(), opts_);
  auto grads = at::empty_like(flat_);
  std::vector<at::Tensor> params, sums;
  for (int k = 0; k < K; ++k) {
    auto r = layout_.shard(k);
    params.push_back(flat_.slice(0, r.begin, r.end));  // other servers' shards: scratch
    sums.push_back(grads.slice(0, r.begin, r.end));
  }
  detail::OpBatch ops(*comm_);
  for (int64_t s = 0; s < steps; ++s) {
    for (int k = 0; k < K; ++k) ops.broadcast(params[k], k);
    ops.wait();
    grads.zero_();  // servers contribute zeros
    for (int k = 0; k < K; ++k) ops.reduce(sums[k], k);
    ops.wait();
    auto& mine = sums[comm_->rank()];
    mine.mul_(1.0 / W);
    apply(mine);
  }
}

void Server::serve_sync_p2p(int64_t steps) {
  const int K = opts_.num_servers, W = num_workers(comm_->size(), opts_);
  auto grads = at::empty({W, mine_.size()}, flat_.options());
  std::vector<at::Tensor> rows;
  for (int w = 0; w < W; ++w) rows.push_back(grads[w]);
  detail::OpBatch ops(*comm_);
  for (int64_t s = 0; s < steps; ++s) {
    for (int w = 0; w < W; ++w) ops.send(shard_, K + w, detail::kTagPull);
    if (codec_) {
      // One payload buffer: each push is decoded before the next is received.
      for (int w = 0; w < W; ++w) recv_push(rows[w], K + w, ops);
    } else {
      for (int w = 0; w < W; ++w) ops.recv(rows[w], K + w, detail::kTagPush);
    }
    ops.wait();  // every send is done before the shard changes
    auto avg = grads.sum(0);
    avg.mul_(1.0 / W);
    apply(avg);
  }
}

void Server::serve_async(int64_t steps) {
  const int K = opts_.num_servers, W = num_workers(comm_->size(), opts_);
  const int64_t bound =
      opts_.mode == Mode::kSsp ? static_cast<int64_t>(opts_.staleness) : std::numeric_limits<int64_t>::max();
  std::vector<int64_t> clock(W, 0);
  std::vector<int> deferred;  // workers whose pull waits for the slowest
  auto header = at::zeros({2}, at::kLong);
  auto grad = at::empty({mine_.size()}, flat_.options());
  auto min_clock = [&] { return *std::min_element(clock.begin(), clock.end()); };
  auto allowed = [&](int w) { return clock[w] - min_clock() <= bound; };
  detail::OpBatch ops(*comm_);
  auto answer = [&](int w) {
    clock_log_.push_back({w, clock[w], min_clock()});
    ops.send(shard_, K + w, detail::kTagPull);
    ops.wait();  // the shard may change right after
  };
  int64_t pushes = 0;
  const int64_t expected = steps * W;
  while (pushes < expected) {
    int src = comm_->recv_any(header, detail::kTagHeader);
    TANDEM_ASSERT(src >= K && src < comm_->size(), "ps header from rank ", src);
    const int w = src - K;
    const int64_t kind = header.data_ptr<int64_t>()[0];
    if (kind == detail::kHeaderPull) {
      TANDEM_CHECK(clock[w] < steps, "parameter server rank ", comm_->rank(), ": worker rank ", src,
                   " pulls for step ", clock[w] + 1, " of an epoch of ", steps,
                   " steps (every worker must do the same number of steps per epoch)");
      if (allowed(w))
        answer(w);
      else
        deferred.push_back(w);
    } else {
      TANDEM_ASSERT(kind == detail::kHeaderPush, "unknown ps header kind ", kind);
      recv_push(grad, src, ops);
      apply(grad);
      ++clock[w];
      ++pushes;
      // The slowest may have caught up: answer the deferred pulls now allowed.
      for (size_t i = 0; i < deferred.size();) {
        if (allowed(deferred[i])) {
          answer(deferred[i]);
          deferred.erase(deferred.begin() + static_cast<std::ptrdiff_t>(i));
        } else {
          ++i;
        }
      }
    }
  }
  TANDEM_ASSERT(deferred.empty(), "pulls left unanswered at the end of the epoch");
}

}  // namespace tandem::sync::ps
