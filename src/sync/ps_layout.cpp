// Parameter server: options, topology, shard layout, flat parameter views.
#include <algorithm>

#include <torch/torch.h>

#include "tandem/sync/ddp.h"
#include "tandem/sync/ps.h"
#include "tandem/util/check.h"

namespace tandem::sync::ps {

Mode parse_mode(const std::string& s) {
  if (s == "sync") return Mode::kSync;
  if (s == "async") return Mode::kAsync;
  if (s == "ssp") return Mode::kSsp;
  TANDEM_FAIL("unknown parameter-server mode '", s, "' (--ps-mode): accepted values are sync, async, ssp");
}

Transport parse_transport(const std::string& s) {
  if (s == "p2p") return Transport::kP2P;
  if (s == "collective") return Transport::kCollective;
  TANDEM_FAIL("unknown parameter-server transport '", s, "' (--ps-transport): accepted values are auto, p2p, collective");
}

std::string to_string(Mode m) {
  switch (m) {
    case Mode::kSync: return "sync";
    case Mode::kAsync: return "async";
    case Mode::kSsp: return "ssp";
  }
  return "?";
}

std::string to_string(Transport t) { return t == Transport::kP2P ? "p2p" : "collective"; }

void validate(const PsOptions& o, int world_size) {
  TANDEM_CHECK(world_size >= 2, "the parameter server needs at least 2 ranks (1 server + 1 worker); use --nproc 2 or more",
               " (world size is ", world_size, ")");
  TANDEM_CHECK(o.num_servers >= 1, "--ps-servers must be >= 1, got ", o.num_servers);
  TANDEM_CHECK(o.num_servers < world_size, "--ps-servers K must be < world size N: servers do not train (got K=",
               o.num_servers, ", N=", world_size, "; ranks 0..K-1 serve, K..N-1 train)");
  TANDEM_CHECK(o.staleness >= 0, "--ps-staleness must be >= 0, got ", o.staleness);
  TANDEM_CHECK(o.transport == Transport::kP2P || o.mode == Mode::kSync,
               "--ps-transport collective is for --ps-mode sync only; --ps-mode ", to_string(o.mode),
               " needs point-to-point messages: add --ps-transport p2p");
  TANDEM_CHECK(o.compress.none() || o.transport == Transport::kP2P, "--compress ", o.compress.str(),
               " with the parameter server needs --ps-transport p2p (the server decodes each worker's push, which a "
               "reduce cannot do)");
  TANDEM_CHECK(o.lr > 0, "--lr must be > 0 for the parameter server, got ", o.lr);
  TANDEM_CHECK(o.momentum >= 0 && o.momentum < 1, "--momentum must be in [0, 1), got ", o.momentum);
}

bool is_server(int rank, const PsOptions& o) { return rank < o.num_servers; }

int num_workers(int world_size, const PsOptions& o) { return world_size - o.num_servers; }

int worker_index(int rank, const PsOptions& o) {
  TANDEM_ASSERT(rank >= o.num_servers, "rank ", rank, " is a server");
  return rank - o.num_servers;
}

namespace detail {
torch::nn::Module& prepare_role(torch::nn::Module& module, comm::Communicator& comm, const PsOptions& opts,
                                bool server) {
  validate(opts, comm.size());
  const int r = comm.rank();
  if (server)
    TANDEM_CHECK(is_server(r, opts), "rank ", r, " is a parameter-server worker (ranks ", opts.num_servers,
                 ".. train); construct ps::Worker there");
  else
    TANDEM_CHECK(!is_server(r, opts), "rank ", r, " is a parameter server (ranks 0..", opts.num_servers - 1,
                 " serve); construct ps::Server there");
  broadcast_module(module, comm);
  return module;
}

void check_total(const FlatParams& fp, const PsOptions& opts) {
  TANDEM_CHECK(fp.total() >= opts.num_servers, "the model has ", fp.total(),
               " parameter elements, fewer than --ps-servers ", opts.num_servers);
}
// Failures at post time are already CommErrors (the communicator wraps them).
void OpBatch::broadcast(at::Tensor& t, int root) { pending_.push_back(comm_.broadcast_async(t, root)); }

void OpBatch::reduce(at::Tensor& t, int root) { pending_.push_back(comm_.reduce_async(t, root)); }

void OpBatch::send(at::Tensor& t, int dst, int tag) { pending_.push_back(comm_.send_async(t, dst, tag)); }

void OpBatch::recv(at::Tensor& t, int src, int tag) { pending_.push_back(comm_.recv_async(t, src, tag)); }

void OpBatch::wait() {
  for (auto& r : pending_) r->wait(comm_.timeout());
  pending_.clear();
}
}  // namespace detail

ShardLayout::ShardLayout(int64_t total, int num_shards) : total_(total) {
  TANDEM_ASSERT(num_shards >= 1 && total >= 0);
  for (int k = 0; k < num_shards; ++k) shards_.push_back({total * k / num_shards, total * (k + 1) / num_shards});
}

FlatParams::FlatParams(torch::nn::Module& module) {
  params_ = module.parameters(/*recurse=*/true);
  offsets_.push_back(0);
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& p = params_[i];
    if (i == 0) dtype_ = p.scalar_type();
    TANDEM_CHECK(p.scalar_type() == dtype_ && at::isFloatingType(dtype_),
                 "the parameter server and --sync-every flatten the parameters, which needs one floating dtype; parameter #", i, " is ",
                 p.scalar_type(), ", #0 is ", dtype_);
    TANDEM_CHECK(p.device().is_cpu(), "the parameter server and --sync-every keep the flattened parameters on the CPU; parameter #", i, " is on ",
                 p.device());
    offsets_.push_back(offsets_.back() + p.numel());
  }
  total_ = offsets_.back();
}

namespace {

// Calls fn(param index, [lo, hi) within the parameter, [lo, hi) within flat)
// for every parameter overlapping r.
template <typename Fn>
void for_overlaps(const std::vector<int64_t>& offsets, Range r, Fn fn) {
  if (r.size() <= 0) return;
  auto it = std::upper_bound(offsets.begin(), offsets.end(), r.begin);
  size_t i = static_cast<size_t>(it - offsets.begin()) - 1;
  for (; i + 1 < offsets.size() && offsets[i] < r.end; ++i) {
    int64_t lo = std::max(r.begin, offsets[i]), hi = std::min(r.end, offsets[i + 1]);
    if (hi > lo) fn(i, lo - offsets[i], hi - offsets[i], lo, hi);
  }
}

}  // namespace

void FlatParams::gather_params(at::Tensor& flat, Range r) const {
  torch::NoGradGuard g;
  for_overlaps(offsets_, r, [&](size_t i, int64_t plo, int64_t phi, int64_t lo, int64_t hi) {
    flat.slice(0, lo, hi).copy_(params_[i].detach().reshape({-1}).slice(0, plo, phi));
  });
}

void FlatParams::scatter_params(const at::Tensor& flat, Range r) const {
  torch::NoGradGuard g;
  for_overlaps(offsets_, r, [&](size_t i, int64_t plo, int64_t phi, int64_t lo, int64_t hi) {
    auto p = params_[i].detach();
    auto src = flat.slice(0, lo, hi);
    if (p.is_contiguous()) {
      p.view({-1}).slice(0, plo, phi).copy_(src);
    } else {
      auto c = p.contiguous();
      c.view({-1}).slice(0, plo, phi).copy_(src);
      p.copy_(c);
    }
  });
}

void FlatParams::gather_grads(at::Tensor& flat, Range r) const {
  torch::NoGradGuard g;
  for_overlaps(offsets_, r, [&](size_t i, int64_t plo, int64_t phi, int64_t lo, int64_t hi) {
    const auto& grad = params_[i].grad();
    auto dst = flat.slice(0, lo, hi);
    if (grad.defined())
      dst.copy_(grad.reshape({-1}).slice(0, plo, phi));
    else
      dst.zero_();
  });
}

}  // namespace tandem::sync::ps
