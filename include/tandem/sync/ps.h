#pragma once
// Parameter server: K server ranks hold the parameters and the optimiser
// state, N-K worker ranks compute gradients.
//
// Topology: ranks 0..K-1 are servers, K..N-1 workers. The parameters
// (module->parameters() order, all of them) are flattened into one buffer;
// server k owns the contiguous range ShardLayout::shard(k), the K ranges
// having equal element counts (+-1). A server keeps SGD-with-momentum state
// for its shard only (buf = momentum*buf + g, first step buf = g;
// p -= lr*buf: torch::optim::SGD with dampening 0, no nesterov, no weight
// decay).
//
// Each worker step: begin_step(true) pulls every shard into the module's
// parameters; forward/backward; finish() pushes the flattened gradient
// (zeros for parameters without one), one message per shard.
//
// Modes:
//  - sync: each server step averages one gradient from every worker, applies
//    it once, and every worker pulls the result (equivalent to synchronous
//    data-parallel SGD on the union of the workers' batches).
//  - async: the server applies each worker's gradient as it arrives and
//    answers a pull with the newest shard.
//  - ssp (stale synchronous parallel, staleness S): as async, but a worker
//    that has pushed c gradients this epoch gets its pull answered only when
//    c - min_clock <= S (min over workers); otherwise the answer is deferred
//    until the slowest worker catches up, so the fast worker blocks.
//
// Transports:
//  - collective (sync only): each shard is broadcast from its server to the
//    whole world, and gradient shards are reduced (summed) to their server,
//    servers contributing zeros.
//  - p2p: sync mode: the server sends its shard to every worker, then
//    receives every worker's gradient (one packed message per worker per
//    shard). async/ssp: the worker sends a 2-int64 header (pull or push)
//    first; the server takes headers with recv_any, receives a pushed
//    gradient from that worker, and answers pulls when allowed.
//  async and ssp need p2p: validate() rejects them with the collective
//  transport (the default), naming the flag to add.
//  Stale gradients act like extra momentum: with async/ssp and several
//  workers, a lower --momentum than sync mode's 0.9 may be needed (in the
//  tests, 3 async workers at lr 0.05 diverge with 0.9 and train with 0.5).
//
// Epochs: every worker does the same number of steps per epoch; each server
// runs serve_epoch(steps_per_worker), which returns once every worker pushed
// that many gradients (so no message is left pending). Then every rank calls
// finalize_epoch(), after which every rank holds the servers' parameters and
// may run collectives (evaluation) and another epoch.
//
// Gradient accumulation is not supported (begin_step(false) throws).
// Failures: a dead peer surfaces as tandem::CommError from the communicator,
// within its timeout. No threads are started.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include "tandem/comm/communicator.h"
#include "tandem/sync/compress.h"
#include "tandem/sync/gradient_sync.h"

namespace tandem::sync::ps {

enum class Mode { kSync, kAsync, kSsp };
enum class Transport { kP2P, kCollective };

struct PsOptions {
  int num_servers = 1;
  Mode mode = Mode::kSync;
  int staleness = 0;  // ssp only
  Transport transport = Transport::kCollective;
  double lr = 0.05;
  double momentum = 0.9;
  // The push's compression (sync/compress.h Codec): fp16, bf16, int8, topk:F
  // (error feedback on the worker). Needs the p2p transport: the server
  // decodes each worker's message, which a reduce cannot do.
  CompressSpec compress;
  uint64_t seed = 0;
};

// "sync", "async", "ssp"; tandem::Error listing the accepted values otherwise.
Mode parse_mode(const std::string& s);
// "p2p", "collective"; tandem::Error listing the accepted values otherwise.
Transport parse_transport(const std::string& s);
std::string to_string(Mode m);
std::string to_string(Transport t);

// tandem::Error (naming the flag) for a world of < 2 ranks, num_servers
// outside [1, world_size), negative staleness, async/ssp with the collective
// transport, lr <= 0 or momentum outside [0, 1).
void validate(const PsOptions& opts, int world_size);

bool is_server(int rank, const PsOptions& opts);
int num_workers(int world_size, const PsOptions& opts);
// 0..num_workers-1 for a worker rank; tandem::InternalError for a server.
int worker_index(int rank, const PsOptions& opts);

struct Range {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};

// [0, total) cut into `num_shards` contiguous ranges of equal size (+-1).
class ShardLayout {
 public:
  ShardLayout() = default;
  ShardLayout(int64_t total, int num_shards);
  int num_shards() const { return static_cast<int>(shards_.size()); }
  int64_t total() const { return total_; }
  Range shard(int k) const { return shards_.at(static_cast<size_t>(k)); }

 private:
  int64_t total_ = 0;
  std::vector<Range> shards_;
};

// The flat view of a module's parameters (module->parameters() order). All
// parameters must share one floating dtype (tandem::Error otherwise).
class FlatParams {
 public:
  explicit FlatParams(torch::nn::Module& module);
  int64_t total() const { return total_; }
  at::ScalarType dtype() const { return dtype_; }
  const std::vector<at::Tensor>& params() const { return params_; }
  // flat[r] <- parameters (r clipped to each parameter's extent).
  void gather_params(at::Tensor& flat, Range r) const;
  // parameters <- flat[r].
  void scatter_params(const at::Tensor& flat, Range r) const;
  // flat[r] <- gradients (zeros where a parameter has none).
  void gather_grads(at::Tensor& flat, Range r) const;
  Range all() const { return {0, total_}; }

 private:
  std::vector<at::Tensor> params_;
  std::vector<int64_t> offsets_;  // size params_+1
  int64_t total_ = 0;
  at::ScalarType dtype_ = at::kFloat;
};

// One answered pull in async/ssp mode: `worker` (worker index) had pushed
// `clock` gradients this epoch; the slowest worker had pushed `min_clock`.
struct ClockRecord {
  int worker = 0;
  int64_t clock = 0;
  int64_t min_clock = 0;
};

namespace detail {
class OpBatch;
}  // namespace detail

class Worker : public GradientSync {
 public:
  // Collective with the other ranks' Worker/Server constructors
  // (broadcasts rank 0's parameters and buffers).
  Worker(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, PsOptions opts);
  std::string name() const override { return "ps"; }
  // sync=true: pulls the newest parameters into the module (times pull).
  // sync=false: tandem::Error (no gradient accumulation with ps).
  void begin_step(bool sync) override;
  // Pushes the gradients to the servers (times push).
  void finish() override;
  bool applies_update() const override { return true; }
  const ShardLayout& layout() const { return layout_; }

 private:
  void pull();
  void push();

  std::shared_ptr<torch::nn::Module> module_;
  comm::CommunicatorPtr comm_;
  PsOptions opts_;
  FlatParams flat_params_;
  ShardLayout layout_;
  at::Tensor params_, grads_;  // flat buffers, total() elements
  at::Tensor header_;          // int64[2], async/ssp
  int64_t clock_ = 0;          // pushes done (for headers)
  bool pulled_ = false;
  std::unique_ptr<Codec> codec_;   // compressed push, else null
  std::vector<at::Tensor> payloads_;  // one per shard
};

class Server {
 public:
  // Collective with the other ranks' Worker/Server constructors.
  Server(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, PsOptions opts);
  // Serves until every worker pushed steps_per_worker gradients; then writes
  // this server's shard into its module's parameters.
  void serve_epoch(int64_t steps_per_worker);
  int shard_index() const { return comm_->rank(); }
  const ShardLayout& layout() const { return layout_; }
  // Every pull answered in async/ssp mode, in order, over all epochs.
  const std::vector<ClockRecord>& clock_log() const { return clock_log_; }
  // Gradients applied so far (sync: one per step; async/ssp: one per push).
  int64_t updates() const { return updates_; }
  // For checkpoints: this server's momentum buffer (its shard's elements;
  // undefined before the first update), and putting it back with the update
  // count. The shard's parameters live in the module between serve_epoch calls.
  at::Tensor momentum() const { return has_momentum_ ? momentum_buf_ : at::Tensor(); }
  void restore(const at::Tensor& momentum, int64_t updates);

 private:
  void serve_sync_collective(int64_t steps);
  void serve_sync_p2p(int64_t steps);
  void serve_async(int64_t steps);
  void apply(const at::Tensor& grad);  // SGD with momentum on shard_
  // Receives worker rank src's push into `grad` (decoded when compressed).
  void recv_push(at::Tensor& grad, int src, detail::OpBatch& ops);
  std::unique_ptr<Codec> codec_;
  at::Tensor payload_;

  std::shared_ptr<torch::nn::Module> module_;
  comm::CommunicatorPtr comm_;
  PsOptions opts_;
  FlatParams flat_params_;
  ShardLayout layout_;
  Range mine_;
  at::Tensor flat_;   // all parameters; other servers' ranges are scratch
  at::Tensor shard_;  // flat_[mine_]
  at::Tensor momentum_buf_;
  bool has_momentum_ = false;
  std::vector<ClockRecord> clock_log_;
  int64_t updates_ = 0;
};

// Called by every rank at the end of an epoch (servers after serve_epoch,
// workers after their last step): each server broadcasts its shard, so every
// rank's module holds the servers' parameters; module buffers (e.g. batch
// norm statistics, which servers never update) are broadcast from the first
// worker.
void finalize_epoch(torch::nn::Module& module, comm::Communicator& comm, const PsOptions& opts);

namespace detail {
// Tags of the ps point-to-point traffic (distinct from the ring's).
constexpr int kTagHeader = 0x5053'0001;  // worker -> server: {kind, clock}
constexpr int kTagPull = 0x5053'0002;    // server -> worker: shard
constexpr int kTagPush = 0x5053'0003;    // worker -> server: gradient shard
constexpr int64_t kHeaderPull = 1;
constexpr int64_t kHeaderPush = 2;
// Shared by the Worker and Server constructors: validates the options and the
// role of this rank, then broadcasts rank 0's parameters (collective).
torch::nn::Module& prepare_role(torch::nn::Module& module, comm::Communicator& comm, const PsOptions& opts,
                                bool server);
// tandem::Error when the model has fewer elements than servers.
void check_total(const FlatParams& fp, const PsOptions& opts);
// Communicator operations posted together, then waited for together. Gloo
// throws its own exception type when an operation is posted on a connection
// that already broke (a peer died): that becomes tandem::CommError, like
// every other peer failure (tandem and c10 errors pass through unchanged).
class OpBatch {
 public:
  explicit OpBatch(comm::Communicator& comm) : comm_(comm) {}
  void broadcast(at::Tensor& t, int root);
  void reduce(at::Tensor& t, int root);  // sum
  void send(at::Tensor& t, int dst, int tag);
  void recv(at::Tensor& t, int src, int tag);
  // Waits (with the communicator's timeout) for everything posted so far.
  void wait();

 private:
  comm::Communicator& comm_;
  std::vector<comm::RequestPtr> pending_;
};
}  // namespace detail

}  // namespace tandem::sync::ps
