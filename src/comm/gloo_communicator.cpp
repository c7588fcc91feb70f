// Communicator over c10d's ProcessGroupGloo (LibTorch 1.13 and 2.x).
#include "tandem/comm/communicator.h"

#include <thread>

#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/version.h>

#include "tandem/comm/shm.h"
#include "tandem/util/check.h"

namespace tandem::comm {
namespace {

std::string op_name(const char* what, int peer) {
  return peer >= 0 ? std::string(what) + " with rank " + std::to_string(peer) : std::string(what);
}

class GlooRequest : public Request {
 public:
  GlooRequest(c10::intrusive_ptr<c10d::Work> work, at::Tensor keep, std::string what, int self_rank)
      : work_(std::move(work)), keep_(std::move(keep)), what_(std::move(what)), self_(self_rank) {}
  void wait(Milliseconds timeout) override {
    try {
      work_->wait(timeout);
    } catch (const std::exception& e) {
      throw CommError("rank " + std::to_string(self_) + ": " + what_ + " failed: " + e.what() +
                      " (a peer rank exited or stopped responding; see the launcher's report for "
                      "which rank failed, or raise --timeout)");
    }
  }
  int source_rank() const override { return work_->sourceRank(); }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
  at::Tensor keep_;
  std::string what_;
  int self_;
};

c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kMax: return c10d::ReduceOp::MAX;
    case ReduceOp::kMin: return c10d::ReduceOp::MIN;
    default: return c10d::ReduceOp::SUM;
  }
}

class DoneRequest : public Request {
 public:
  void wait(Milliseconds) override {}
};

class GlooCommunicator : public Communicator {
 public:
  GlooCommunicator(c10::intrusive_ptr<c10d::Store> store, int rank, int size, const GlooOptions& o)
      : rank_(rank), size_(size), store_(store), opts_(o) {
    timeout_ = o.timeout;
    auto opts = c10d::ProcessGroupGloo::Options::create(o.timeout);
    if (o.hostname.empty()) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(o.hostname));
    }
    opts->threads = o.threads;
    try {
      pg_ = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, opts);
    } catch (const std::exception& e) {
      throw CommError("rank " + std::to_string(rank) + " of " + std::to_string(size) +
                      ": rendezvous failed: " + e.what() +
                      " (are all ranks started, with the same world size and store?)");
    }
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "gloo"; }

  RequestPtr all_reduce_async(at::Tensor& t, ReduceOp op) override {
    check_contig(t);
    std::vector<at::Tensor> v{t};
    c10d::AllreduceOptions o;
    o.reduceOp = to_c10d(op);
    o.timeout = timeout_;
    return post([&] { return pg_->allreduce(v, o); }, t, "all-reduce", -1);
  }
  RequestPtr broadcast_async(at::Tensor& t, int root) override {
    check_contig(t);
    std::vector<at::Tensor> v{t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = timeout_;
    return post([&] { return pg_->broadcast(v, o); }, t, "broadcast", root);
  }
  RequestPtr reduce_async(at::Tensor& t, int root, ReduceOp op) override {
    check_contig(t);
    std::vector<at::Tensor> v{t};
    c10d::ReduceOptions o;
    o.rootRank = root;
    o.reduceOp = to_c10d(op);
    o.timeout = timeout_;
    return post([&] { return pg_->reduce(v, o); }, t, "reduce", root);
  }
  RequestPtr all_gather_async(at::Tensor& out, const at::Tensor& in) override {
    check_contig(out);
    check_contig(in);
    TANDEM_CHECK(out.scalar_type() == in.scalar_type() && out.numel() == in.numel() * size_,
                 "all_gather: output must hold world size x ", in.numel(), " elements of the input's type, got ",
                 out.numel());
    if (in.numel() == 0) return std::make_shared<DoneRequest>();  // nothing to move (and Gloo divides by it)
    std::vector<at::Tensor> input{in.view({-1})};
    std::vector<std::vector<at::Tensor>> outputs(1);
    auto flat = out.view({size_, in.numel()});
    for (int r = 0; r < size_; ++r) outputs[0].push_back(flat[r]);
    c10d::AllgatherOptions o;
    o.timeout = timeout_;
    return post([&] { return pg_->allgather(outputs, input, o); }, out, "all-gather", -1);
  }
  void barrier() override {
    c10d::BarrierOptions o;
    o.timeout = timeout_;
    post([&] { return pg_->barrier(o); }, at::Tensor(), "barrier", -1)->wait(timeout_);
  }
  RequestPtr send_async(at::Tensor& t, int dst, int tag) override {
    check_contig(t);
    check_cpu(t, "send");
    TANDEM_CHECK(dst >= 0 && dst < size_ && dst != rank_, "send: bad destination rank ", dst);
    std::vector<at::Tensor> v{t};
    return post([&] { return pg_->send(v, dst, tag); }, t, "send", dst);
  }
  RequestPtr recv_async(at::Tensor& t, int src, int tag) override {
    check_contig(t);
    check_cpu(t, "recv");
    TANDEM_CHECK(src >= 0 && src < size_ && src != rank_, "recv: bad source rank ", src);
    std::vector<at::Tensor> v{t};
    return post([&] { return pg_->recv(v, src, tag); }, t, "recv", src);
  }
  RequestPtr recv_any_async(at::Tensor& t, int tag) override {
    check_contig(t);
    check_cpu(t, "recv");
    std::vector<at::Tensor> v{t};
    return post([&] { return pg_->recvAnysource(v, tag); }, t, "recv from any rank", -1);
  }

  CommunicatorPtr sub_group(const std::vector<int>& ranks, const std::string& name) override {
    const int me = index_in(ranks);
    if (ranks.size() == 1) return make_single();
    return make_gloo(c10::make_intrusive<c10d::PrefixStore>("tandem/sub/" + name, store_), me,
                     static_cast<int>(ranks.size()), opts_);
  }

 private:
  static void check_contig(const at::Tensor& t) {
    TANDEM_CHECK(t.is_contiguous(), "communicator: tensors must be contiguous");
  }
  static void check_cpu(const at::Tensor& t, const char* what) {
    TANDEM_CHECK(t.is_cpu(), "communicator: Gloo ", what, " takes CPU tensors only, got one on ", t.device().str(),
                 "; copy it to the CPU first");
  }
  // Posts an operation; Gloo can throw at post time (a peer's connection is
  // gone), which becomes a CommError naming the operation like a failed wait.
  template <class F>
  RequestPtr post(F&& start, const at::Tensor& t, const char* what, int peer) {
    c10::intrusive_ptr<c10d::Work> w;
    try {
      w = start();
    } catch (const tandem::Error&) {
      throw;
    } catch (const std::exception& e) {
      throw CommError("rank " + std::to_string(rank_) + ": " + op_name(what, peer) + " failed: " + e.what() +
                      " (a peer rank exited or stopped responding; see the launcher's report for which rank "
                      "failed, or raise --timeout)");
    }
    return wrap(std::move(w), t, what, peer);
  }
  RequestPtr wrap(c10::intrusive_ptr<c10d::Work> w, const at::Tensor& t, const char* what, int peer) {
    return std::make_shared<GlooRequest>(std::move(w), t, op_name(what, peer), rank_);
  }
  int rank_, size_;
  c10::intrusive_ptr<c10d::Store> store_;  // for sub-groups
  GlooOptions opts_;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg_;
};

class SingleCommunicator : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "single"; }
  RequestPtr all_reduce_async(at::Tensor&, ReduceOp) override { return std::make_shared<DoneRequest>(); }
  RequestPtr broadcast_async(at::Tensor&, int) override { return std::make_shared<DoneRequest>(); }
  RequestPtr reduce_async(at::Tensor&, int, ReduceOp) override { return std::make_shared<DoneRequest>(); }
  RequestPtr all_gather_async(at::Tensor& out, const at::Tensor& in) override {
    TANDEM_CHECK(out.numel() == in.numel(), "all_gather: output must hold ", in.numel(), " elements, got ", out.numel());
    if (!out.is_same(in)) out.view({-1}).copy_(in.view({-1}));
    return std::make_shared<DoneRequest>();
  }
  void barrier() override {}
  RequestPtr send_async(at::Tensor&, int dst, int) override { TANDEM_FAIL("send to rank ", dst, " in a world of size 1"); }
  RequestPtr recv_async(at::Tensor&, int src, int) override { TANDEM_FAIL("recv from rank ", src, " in a world of size 1"); }
  RequestPtr recv_any_async(at::Tensor&, int) override { TANDEM_FAIL("recv in a world of size 1"); }
};

}  // namespace

CommunicatorPtr make_gloo(c10::intrusive_ptr<c10d::Store> store, int rank, int size, const GlooOptions& opts) {
  TANDEM_CHECK(size >= 1, "world size must be >= 1, got ", size);
  TANDEM_CHECK(rank >= 0 && rank < size, "rank ", rank, " is outside world size ", size);
  return std::make_shared<GlooCommunicator>(std::move(store), rank, size, opts);
}

CommunicatorPtr make_single() { return std::make_shared<SingleCommunicator>(); }

int Communicator::index_in(const std::vector<int>& ranks) const {
  TANDEM_CHECK(!ranks.empty(), "sub_group: no ranks given");
  int me = -1;
  for (size_t i = 0; i < ranks.size(); ++i) {
    TANDEM_CHECK(ranks[i] >= 0 && ranks[i] < size(), "sub_group: rank ", ranks[i], " is outside a group of ", size());
    TANDEM_CHECK(i == 0 || ranks[i] > ranks[i - 1], "sub_group: ranks must be ascending and distinct");
    if (ranks[i] == rank()) me = static_cast<int>(i);
  }
  TANDEM_CHECK(me >= 0, "sub_group: rank ", rank(), " is not among the ranks of the group it builds");
  return me;
}

CommunicatorPtr Communicator::sub_group(const std::vector<int>& ranks, const std::string& name) {
  index_in(ranks);
  TANDEM_CHECK(ranks.size() == 1, "sub_group '", name, "': the ", backend(), " communicator cannot build sub-groups");
  return make_single();
}

InProcessGroup::InProcessGroup(int size, GlooOptions opts, std::string backend)
    : size_(size), opts_(std::move(opts)), backend_(std::move(backend)) {
  store_ = c10::make_intrusive<c10d::HashStore>();
}

CommunicatorPtr InProcessGroup::connect(int rank) {
  ShmOptions so;
  so.timeout = opts_.timeout;
  if (backend_ == "shm") return make_shm(store_, rank, size_, so);
  if (backend_ == "hybrid") {
    std::vector<std::string> hosts;
    for (int r = 0; r < size_; ++r) hosts.push_back(r < (size_ + 1) / 2 ? "hostA" : "hostB");
    return make_hybrid(store_, rank, size_, hosts, opts_, so);
  }
  TANDEM_CHECK(backend_ == "gloo", "in-process group: unknown backend '", backend_, "' (gloo, shm, hybrid)");
  return make_gloo(store_, rank, size_, opts_);
}

void spawn(int size, const std::function<void(int, CommunicatorPtr)>& fn, GlooOptions opts, const std::string& backend) {
  InProcessGroup group(size, opts, backend);
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(size);
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto c = size == 1 ? make_single() : group.connect(r);
        fn(r, c);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace tandem::comm
