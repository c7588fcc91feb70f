#include "tandem/sync/ddp.h"

#include <condition_variable>
#include <deque>
#include <future>
#include <sstream>
#include <thread>

#include <torch/torch.h>

#include "tandem/comm/checked.h"
#include "tandem/util/check.h"
#include "tandem/util/clock.h"

namespace tandem::sync {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

}  // namespace

// Runs closures in submission order on one thread: the ring's buckets and
// the compressors' multi-step collectives, so they overlap backward.
class CommThread {
 public:
  CommThread() : thread_([this] { loop(); }) {}
  ~CommThread() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  comm::RequestPtr run(std::function<void()> fn) {
    auto job = std::make_shared<Job>();
    job->fn = std::move(fn);
    auto req = std::make_shared<FutureRequest>(job->done.get_future());
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(job));
    }
    cv_.notify_one();
    return req;
  }

 private:
  struct Job {
    std::function<void()> fn;
    std::promise<void> done;
  };
  class FutureRequest : public comm::Request {
   public:
    explicit FutureRequest(std::future<void> f) : f_(std::move(f)) {}
    void wait(comm::Milliseconds timeout) override {
      if (f_.wait_for(timeout) != std::future_status::ready)
        throw CommError("bucket synchronisation did not finish within the timeout (a peer rank stopped responding)");
      f_.get();  // rethrows the collective's CommError
    }

   private:
    std::future<void> f_;
  };
  void loop() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      try {
        torch::NoGradGuard guard;  // grad mode is thread-local
        job->fn();
        job->done.set_value();
      } catch (...) {
        job->done.set_exception(std::current_exception());
      }
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stop_ = false;
  std::thread thread_;
};

void broadcast_module(torch::nn::Module& module, comm::Communicator& comm) {
  if (comm.size() == 1) return;
  auto named = module.named_parameters(/*recurse=*/true);
  // Encode this rank's shapes: [count, ndim_0, dims_0..., ndim_1, ...].
  std::vector<int64_t> enc{static_cast<int64_t>(named.size())};
  for (auto& p : named) {
    enc.push_back(p.value().dim());
    for (auto d : p.value().sizes()) enc.push_back(d);
  }
  auto len = torch::tensor({static_cast<int64_t>(enc.size())}, torch::kInt64);
  comm.broadcast(len, 0);
  auto root = comm.rank() == 0 ? torch::tensor(enc, torch::kInt64) : torch::empty({len.item<int64_t>()}, torch::kInt64);
  comm.broadcast(root, 0);
  // Find this rank's first parameter whose shape differs from rank 0's.
  std::string local_problem;
  {
    auto* r = root.data_ptr<int64_t>();
    const int64_t root_len = root.numel();
    int64_t pos = 1;
    if (r[0] != static_cast<int64_t>(named.size())) {
      local_problem = "rank 0 has " + std::to_string(r[0]) + " parameters, rank " + std::to_string(comm.rank()) +
                      " has " + std::to_string(named.size());
    }
    for (size_t i = 0; local_problem.empty() && i < named.size() && pos < root_len; ++i) {
      int64_t nd = r[pos++];
      std::vector<int64_t> want(r + pos, r + std::min(root_len, pos + nd));
      pos += nd;
      auto have = named[i].value().sizes();
      if (want != have.vec()) {
        local_problem = "parameter '" + named[i].key() + "' (#" + std::to_string(i) + "): rank 0 has " +
                        shape_str(want) + ", rank " + std::to_string(comm.rank()) + " has " + shape_str(have);
      }
    }
  }
  auto bad = torch::zeros({comm.size()}, torch::kInt64);
  bad[comm.rank()] = local_problem.empty() ? 0 : 1;
  comm.all_reduce(bad);
  if (bad.sum().item<int64_t>() > 0) {
    TANDEM_CHECK(local_problem.empty(), "model differs across ranks: ", local_problem,
                 " (every rank must build the same model)");
    int64_t who = bad.nonzero()[0][0].item<int64_t>();
    TANDEM_FAIL("model differs across ranks: rank ", who, " has a parameter shape that differs from rank 0 ",
                "(see rank ", who, "'s message)");
  }
  torch::NoGradGuard guard;
  for (auto& p : module.parameters()) {
    auto t = p.data();
    if (t.is_contiguous()) {
      comm.broadcast(t, 0);
    } else {
      auto c = t.contiguous();
      comm.broadcast(c, 0);
      t.copy_(c);
    }
  }
  for (auto& b : module.buffers()) {
    auto c = b.contiguous();
    comm.broadcast(c, 0);
    if (!c.is_same(b)) b.copy_(c);
  }
}

BucketedSync::BucketedSync(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, DdpOptions opts,
                           bool ring, collectives::RingOptions ring_opts)
    : comm_(std::move(comm)), module_(std::move(module)), ring_(ring) {
  wire_ = std::make_unique<Wire>(comm_, ring, ring_opts);
  TANDEM_CHECK(opts.bucket_mb > 0, "--bucket-mb must be > 0, got ", opts.bucket_mb);
  if (opts.broadcast_parameters) broadcast_module(*module_, *comm_);
  for (auto& p : module_->parameters())
    if (p.requires_grad()) params_.push_back(p);
  where_.resize(params_.size());
  got_.assign(params_.size(), false);
  // Note [Bucket order]: reverse registration order, cut at bucket_mb (the
  // first bucket at first_bucket_mb), one dtype/device per bucket. A bucket
  // closes once it holds at least the cap, so a large tensor is never split.
  TANDEM_CHECK(opts.first_bucket_mb > 0, "first bucket size must be > 0 MB, got ", opts.first_bucket_mb);
  const int64_t cap = static_cast<int64_t>(opts.bucket_mb * 1024 * 1024);
  const int64_t first_cap = std::min(cap, static_cast<int64_t>(opts.first_bucket_mb * 1024 * 1024));
  int64_t bytes = 0;
  for (size_t k = params_.size(); k-- > 0;) {
    const auto& p = params_[k];
    bool fresh = buckets_.empty() || bytes >= (buckets_.size() == 1 ? first_cap : cap);
    if (!fresh) {
      const auto& first = params_[buckets_.back().slots.front().param];
      fresh = first.scalar_type() != p.scalar_type() || first.device() != p.device();
    }
    if (fresh) {
      buckets_.emplace_back();
      bytes = 0;
    }
    auto& b = buckets_.back();
    int64_t off = b.slots.empty() ? 0 : b.slots.back().offset + b.slots.back().numel;
    where_[k] = {buckets_.size() - 1, b.slots.size()};
    b.slots.push_back({k, off, p.numel()});
    bytes += p.numel() * p.element_size();
  }
  for (auto& b : buckets_) {
    const auto& p = params_[b.slots.front().param];
    int64_t n = b.slots.back().offset + b.slots.back().numel;
    b.flat = torch::zeros({n}, p.options().requires_grad(false));
    b.pending = b.slots.size();
    b.name = "bucket " + std::to_string(&b - buckets_.data());
    b.label = std::make_shared<const std::string>(b.name + " all-reduce");
    if (!opts.compress.none()) {
      // Compressors work on float32; other buckets go uncompressed (averaged alike).
      CompressSpec spec = b.flat.scalar_type() == at::kFloat ? opts.compress : CompressSpec{};
      std::vector<BucketSlot> slots;
      for (auto& sl : b.slots) slots.push_back({sl.offset, params_[sl.param].sizes().vec()});
      const auto index = static_cast<uint64_t>(&b - buckets_.data());
      b.compressor =
          make_bucket_compressor(spec, slots, n, opts.seed * 7919u + index, comm_->rank(), 1.0, b.flat.device());
    }
  }
  inv_world_ = 1.0 / comm_->size();
  // A world of one has nothing to average: .grad() is already the result, so
  // no hooks, no copies, no communication (and no communication time).
  solo_ = comm_->size() == 1;
  if (solo_) return;
  for (size_t k = 0; k < params_.size(); ++k) {
    params_[k].register_hook([this, k](const at::Tensor& grad) { on_grad(k, grad); });
  }
}

BucketedSync::~BucketedSync() = default;

comm::RequestPtr BucketedSync::on_comm_thread(std::function<void()> fn) {
  if (!thread_) thread_ = std::make_unique<CommThread>();
  return thread_->run(std::move(fn));
}

std::vector<std::vector<size_t>> BucketedSync::bucket_layout() const {
  std::vector<std::vector<size_t>> out;
  for (auto& b : buckets_) {
    out.emplace_back();
    for (auto& s : b.slots) out.back().push_back(s.param);
  }
  return out;
}

void BucketedSync::begin_step(bool sync) {
  std::lock_guard<std::mutex> lock(mu_);
  sync_ = sync;
  times_ = {};
  launched_bytes_ = 0;
  wire_bytes_at_step_ = wire_->bytes_sent;
  next_launch_ = 0;
  any_launched_ = false;
  std::fill(got_.begin(), got_.end(), false);
  for (auto& b : buckets_) {
    b.pending = b.slots.size();
    b.launched = false;
    b.request.reset();
  }
}

void BucketedSync::on_grad(size_t k, const at::Tensor& grad) {
  if (!sync_) return;
  std::lock_guard<std::mutex> lock(mu_);
  // A leaf's hook runs once per backward with the summed gradient, even when
  // the parameter is used several times in forward.
  if (got_[k]) return;
  auto [bi, si] = where_[k];
  auto& b = buckets_[bi];
  const auto& s = b.slots[si];
  auto view = b.flat.slice(0, s.offset, s.offset + s.numel);
  torch::NoGradGuard guard;
  view.copy_(grad.reshape({-1}));
  // Gradient accumulation: .grad() holds the earlier micro-steps' sum.
  const auto& acc = params_[k].grad();
  if (acc.defined()) view.add_(acc.reshape({-1}));
  got_[k] = true;
  if (--b.pending == 0) launch_ready_locked();
}

void BucketedSync::launch_bucket_locked(Bucket& b) {
  if (!any_launched_) {
    first_launch_ = Clock::now();
    any_launched_ = true;
  }
  b.launched = true;
  b.launched_at = Clock::now();
  // Names the collective in stall reports and --check-collectives errors.
  comm::OpLabel label(b.label);
  if (b.compressor) {
    auto* c = b.compressor.get();
    at::Tensor flat = b.flat;
    b.request = on_comm_thread([this, c, flat]() mutable { c->reduce(flat, *wire_); });
  } else {
    b.request = launch(b.flat);
    // A ring moves 2(N-1)/N of the buffer per rank (c10d's Gloo ring too);
    // the ring's own buckets are counted by the wire.
    const int n = comm_->size();
    if (!ring_) launched_bytes_ += 2 * (n - 1) * b.flat.numel() * static_cast<int64_t>(b.flat.element_size()) / n;
  }
}

void BucketedSync::launch_ready_locked() {
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    launch_bucket_locked(buckets_[next_launch_]);
    ++next_launch_;
  }
}

void BucketedSync::finish() {
  if (!sync_ || solo_) return;
  auto t0 = Clock::now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    torch::NoGradGuard guard;
    // Parameters that received no gradient this step: contribute what .grad()
    // holds (accumulated micro-steps) or zeros, so every rank launches every bucket.
    for (size_t k = 0; k < params_.size(); ++k) {
      if (got_[k]) continue;
      auto [bi, si] = where_[k];
      auto& b = buckets_[bi];
      const auto& s = b.slots[si];
      auto view = b.flat.slice(0, s.offset, s.offset + s.numel);
      const auto& acc = params_[k].grad();
      if (acc.defined()) view.copy_(acc.reshape({-1})); else view.zero_();
      got_[k] = true;
      --b.pending;
    }
    launch_ready_locked();
  }
  torch::NoGradGuard guard;
  for (size_t bi = 0; bi < buckets_.size(); ++bi) {
    auto& b = buckets_[bi];
    b.request->wait(comm_->timeout());
    times_.spans.push_back({b.name, b.launched_at, Clock::now()});
    // A compressor leaves the average, the plain all-reduce the sum.
    const bool scale = !b.compressor;
    for (auto& s : b.slots) {
      auto& p = params_[s.param];
      auto view = b.flat.slice(0, s.offset, s.offset + s.numel).view(p.sizes());
      if (!p.grad().defined()) p.mutable_grad() = torch::empty_like(p);
      // One pass: the averaged gradient is written straight into .grad().
      if (scale) at::mul_out(p.mutable_grad(), view, inv_world_);
      else p.mutable_grad().copy_(view);
    }
  }
  auto t1 = Clock::now();
  times_.wait = seconds(t1 - t0);
  times_.comm = any_launched_ ? seconds(t1 - first_launch_) : 0.0;
  times_.bytes = launched_bytes_ + wire_->bytes_sent - wire_bytes_at_step_;
}

DistributedDataParallel::DistributedDataParallel(std::shared_ptr<torch::nn::Module> module,
                                                 comm::CommunicatorPtr comm, DdpOptions opts)
    : BucketedSync(std::move(module), std::move(comm), opts, /*ring=*/false) {}

comm::RequestPtr DistributedDataParallel::launch(at::Tensor& flat) { return comm_->all_reduce_async(flat); }

ParameterAverager::ParameterAverager(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, bool ring)
    : params_(*module),
      flat_(at::empty({params_.total()}, at::TensorOptions().dtype(params_.dtype()))),
      wire_(std::move(comm), ring) {}

void ParameterAverager::average() {
  if (wire_.size() == 1) return;
  params_.gather_params(flat_, params_.all());
  wire_.all_reduce(flat_);
  flat_.mul_(1.0 / wire_.size());
  params_.scatter_params(flat_, params_.all());
}

}  // namespace tandem::sync
