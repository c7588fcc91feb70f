#pragma once
// Private to src/comm: what the communicators over a c10d process group
// (ProcessGroupGloo, ProcessGroupNCCL) share. A backend builds the group and
// says which devices it moves, how a wait completes and how a sub-group is
// built; the calls, their options and their error messages are written once here.
#include <string>
#include <utility>
#include <vector>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/version.h>

#include "tandem/comm/communicator.h"
#include "tandem/util/check.h"

namespace tandem::comm::detail {

// The class c10d's process groups derive from: ProcessGroup in LibTorch 1.x;
// since 2.0 ProcessGroup dispatches to a Backend, which the groups derive from.
#if TORCH_VERSION_MAJOR >= 2
using C10dGroup = c10d::Backend;
#else
using C10dGroup = c10d::ProcessGroup;
#endif

inline std::string op_name(const char* what, int peer) {
  return peer >= 0 ? std::string(what) + " with rank " + std::to_string(peer) : std::string(what);
}

// The error of an operation that failed at post or wait time.
inline CommError op_failure(int rank, const std::string& what, const char* error) {
  return CommError("rank " + std::to_string(rank) + ": " + what + " failed: " + error +
                   " (a peer rank exited or stopped responding; see the launcher's report for which rank failed, "
                   "or raise --timeout)");
}

// The error of a group whose construction failed.
inline CommError rendezvous_failure(int rank, int size, const char* error) {
  return CommError("rank " + std::to_string(rank) + " of " + std::to_string(size) + ": rendezvous failed: " + error +
                   " (are all ranks started, with the same world size and store?)");
}

// A c10d Work as a Request. `keep` holds the tensor the operation writes or
// reads until the request is gone.
class C10dRequest : public Request {
 public:
  C10dRequest(c10::intrusive_ptr<c10d::Work> work, at::Tensor keep, std::string what, int self_rank)
      : work_(std::move(work)), keep_(std::move(keep)), what_(std::move(what)), self_(self_rank) {}
  void wait(Milliseconds timeout) override {
    try {
      work_->wait(timeout);
    } catch (const std::exception& e) {
      throw failure(e);
    }
  }
  int source_rank() const override { return work_->sourceRank(); }

 protected:
  CommError failure(const std::exception& e) const { return op_failure(self_, what_, e.what()); }
  c10::intrusive_ptr<c10d::Work> work_;

 private:
  at::Tensor keep_;
  std::string what_;
  int self_;
};

class DoneRequest : public Request {
 public:
  void wait(Milliseconds) override {}
};

inline c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kMax: return c10d::ReduceOp::MAX;
    case ReduceOp::kMin: return c10d::ReduceOp::MIN;
    default: return c10d::ReduceOp::SUM;
  }
}

// The Communicator calls over one c10d group. A backend sets pg_ in its
// constructor and implements check_device and make_group; it may override
// wrap (how a wait completes) and any call.
class C10dCommunicator : public Communicator {
 public:
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  RequestPtr all_reduce_async(at::Tensor& t, ReduceOp op) override {
    check_tensor(t, "all-reduce", false);
    std::vector<at::Tensor> v{t};
    c10d::AllreduceOptions o;
    o.reduceOp = to_c10d(op);
    o.timeout = timeout_;
    return post([&] { return pg_->allreduce(v, o); }, t, "all-reduce", -1);
  }
  RequestPtr broadcast_async(at::Tensor& t, int root) override {
    check_tensor(t, "broadcast", false);
    std::vector<at::Tensor> v{t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = timeout_;
    return post([&] { return pg_->broadcast(v, o); }, t, "broadcast", root);
  }
  RequestPtr reduce_async(at::Tensor& t, int root, ReduceOp op) override {
    check_tensor(t, "reduce", false);
    std::vector<at::Tensor> v{t};
    c10d::ReduceOptions o;
    o.rootRank = root;
    o.reduceOp = to_c10d(op);
    o.timeout = timeout_;
    return post([&] { return pg_->reduce(v, o); }, t, "reduce", root);
  }
  RequestPtr all_gather_async(at::Tensor& out, const at::Tensor& in) override {
    check_tensor(out, "all-gather", false);
    check_tensor(in, "all-gather", false);
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
    check_tensor(t, "send", true);
    TANDEM_CHECK(dst >= 0 && dst < size_ && dst != rank_, "send: bad destination rank ", dst);
    std::vector<at::Tensor> v{t};
    return post([&] { return pg_->send(v, dst, tag); }, t, "send", dst);
  }
  RequestPtr recv_async(at::Tensor& t, int src, int tag) override {
    check_tensor(t, "recv", true);
    TANDEM_CHECK(src >= 0 && src < size_ && src != rank_, "recv: bad source rank ", src);
    std::vector<at::Tensor> v{t};
    return post([&] { return pg_->recv(v, src, tag); }, t, "recv", src);
  }
  RequestPtr recv_any_async(at::Tensor& t, int tag) override {
    check_tensor(t, "recv", true);
    std::vector<at::Tensor> v{t};
    return post([&] { return pg_->recvAnysource(v, tag); }, t, "recv from any rank", -1);
  }

  // A group of the same backend over a PrefixStore of this group's store.
  CommunicatorPtr sub_group(const std::vector<int>& ranks, const std::string& name) override {
    const int me = index_in(ranks);
    if (ranks.size() == 1) return make_single();
    return make_group(c10::make_intrusive<c10d::PrefixStore>("tandem/sub/" + name, store_), me,
                      static_cast<int>(ranks.size()));
  }

 protected:
  C10dCommunicator(c10::intrusive_ptr<c10d::Store> store, int rank, int size, Milliseconds timeout)
      : rank_(rank), size_(size), store_(std::move(store)) {
    timeout_ = timeout;
  }
  // Throws tandem::Error when this backend cannot move `t` for `what`
  // (p2p: a send or receive).
  virtual void check_device(const at::Tensor& t, const char* what, bool p2p) const = 0;
  // This backend's group over `store` with this group's options.
  virtual CommunicatorPtr make_group(c10::intrusive_ptr<c10d::Store> store, int rank, int size) const = 0;
  // The Request of a posted operation.
  virtual RequestPtr wrap(c10::intrusive_ptr<c10d::Work> w, const at::Tensor& t, std::string what) {
    return std::make_shared<C10dRequest>(std::move(w), t, std::move(what), rank_);
  }
  static void check_contig(const at::Tensor& t) {
    TANDEM_CHECK(t.is_contiguous(), "communicator: tensors must be contiguous");
  }
  void check_tensor(const at::Tensor& t, const char* what, bool p2p) const {
    check_contig(t);
    check_device(t, what, p2p);
  }
  // Posts an operation; c10d can throw at post time (Gloo: a peer's
  // connection is gone), which becomes a CommError naming the operation like
  // a failed wait.
  template <class F>
  RequestPtr post(F&& start, const at::Tensor& t, const char* what, int peer) {
    c10::intrusive_ptr<c10d::Work> w;
    try {
      w = start();
    } catch (const tandem::Error&) {
      throw;
    } catch (const std::exception& e) {
      throw op_failure(rank_, op_name(what, peer), e.what());
    }
    return wrap(std::move(w), t, op_name(what, peer));
  }

  int rank_, size_;
  c10::intrusive_ptr<c10d::Store> store_;  // for sub-groups
  c10::intrusive_ptr<C10dGroup> pg_;
};

}  // namespace tandem::comm::detail
