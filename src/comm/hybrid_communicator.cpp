// Hierarchical communicator: shared memory inside each host, Gloo among one
// leader per host (see tandem/comm/shm.h).
#include <unistd.h>

#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <thread>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#include "tandem/comm/env.h"
#include "tandem/comm/shm.h"
#include "tandem/util/check.h"

namespace tandem::comm {
namespace {

class FutureRequest : public Request {
 public:
  FutureRequest(std::future<void> f, std::string what) : f_(std::move(f)), what_(std::move(what)) {}
  void wait(Milliseconds timeout) override {
    if (f_.wait_for(timeout) != std::future_status::ready)
      throw CommError(what_ + " did not complete within " + std::to_string(timeout.count()) +
                      " ms (a peer rank stopped responding; raise --timeout if it is only slow)");
    try {
      f_.get();
    } catch (const std::future_error&) {
      throw CommError(what_ + ": the communicator was destroyed before it ran");
    }
  }

 private:
  std::future<void> f_;
  std::string what_;
};

class HybridCommunicator : public Communicator {
 public:
  HybridCommunicator(c10::intrusive_ptr<c10d::Store> store, int rank, int size, const std::vector<std::string>& host_of,
                     const GlooOptions& gloo, const ShmOptions& shm)
      : rank_(rank), size_(size) {
    timeout_ = gloo.timeout;
    TANDEM_CHECK(static_cast<int>(host_of.size()) == size, "hybrid communicator: ", host_of.size(),
                 " host names for ", size, " ranks");
    // Hosts in order of their first rank; a host's leader is its first rank.
    std::map<std::string, int> index;
    std::vector<std::vector<int>> members;  // ranks of each host
    for (int r = 0; r < size; ++r) {
      auto it = index.find(host_of[r]);
      if (it == index.end()) {
        it = index.emplace(host_of[r], static_cast<int>(members.size())).first;
        members.emplace_back();
      }
      host_index_.push_back(it->second);
      local_index_.push_back(static_cast<int>(members[it->second].size()));
      members[it->second].push_back(r);
    }
    my_host_ = host_index_[rank];
    const auto& mine = members[my_host_];
    const bool leader = mine.front() == rank;

    world_ = make_gloo(c10::make_intrusive<c10d::PrefixStore>("tandem/hybrid/world", store), rank, size, gloo);
    if (mine.size() > 1) {
      ShmOptions so = shm;
      so.timeout = gloo.timeout;
      so.rank_labels = mine;
      local_ = make_shm(c10::make_intrusive<c10d::PrefixStore>(
                            "tandem/hybrid/host" + std::to_string(my_host_), store),
                        local_index_[rank], static_cast<int>(mine.size()), so);
    } else {
      local_ = make_single();
    }
    const int hosts = static_cast<int>(members.size());
    if (leader && hosts > 1)
      leaders_ = make_gloo(c10::make_intrusive<c10d::PrefixStore>("tandem/hybrid/leaders", store), my_host_, hosts,
                           gloo);
    thread_ = std::thread([this] { run(); });
  }

  ~HybridCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "hybrid"; }

  RequestPtr all_reduce_async(at::Tensor& t, ReduceOp op) override {
    return enqueue("all-reduce", [this, t, op]() mutable {
      local_->reduce(t, 0, op);
      if (leaders_) leaders_->all_reduce(t, op);
      local_->broadcast(t, 0);
    });
  }
  RequestPtr broadcast_async(at::Tensor& t, int root) override {
    check_root(root);
    return enqueue("broadcast", [this, t, root]() mutable {
      const int rh = host_index_[root];
      if (rh == my_host_) local_->broadcast(t, local_index_[root]);
      if (leaders_) leaders_->broadcast(t, rh);
      if (rh != my_host_) local_->broadcast(t, 0);
    });
  }
  // The root receives the reduction; other ranks' buffers are unspecified
  // afterwards (those on the root's host receive it too).
  RequestPtr reduce_async(at::Tensor& t, int root, ReduceOp op) override {
    check_root(root);
    return enqueue("reduce", [this, t, root, op]() mutable {
      const int rh = host_index_[root];
      local_->reduce(t, 0, op);
      if (leaders_) leaders_->reduce(t, rh, op);
      if (rh == my_host_ && local_index_[root] != 0) local_->broadcast(t, 0);
    });
  }
  RequestPtr all_gather_async(at::Tensor& out, const at::Tensor& in) override {
    return enqueue("all-gather", [this, out, in]() mutable { world_->all_gather(out, in); });
  }
  void barrier() override {
    enqueue("barrier", [this] {
      local_->barrier();
      if (leaders_) leaders_->barrier();
      local_->barrier();
    })->wait(timeout_ + Milliseconds(1000));
  }

  // Point-to-point goes through the Gloo group over all ranks.
  RequestPtr send_async(at::Tensor& t, int dst, int tag) override { return world_->send_async(t, dst, tag); }
  RequestPtr recv_async(at::Tensor& t, int src, int tag) override { return world_->recv_async(t, src, tag); }
  RequestPtr recv_any_async(at::Tensor& t, int tag) override { return world_->recv_any_async(t, tag); }
  // Through the Gloo group over all ranks (not hierarchical).
  CommunicatorPtr sub_group(const std::vector<int>& ranks, const std::string& name) override {
    return world_->sub_group(ranks, name);
  }

 private:
  void check_root(int root) const {
    TANDEM_CHECK(root >= 0 && root < size_, "root rank ", root, " is outside world size ", size_);
  }

  // Collectives run in order on one thread: each is a sequence of blocking
  // steps on the host group and the leaders' group.
  RequestPtr enqueue(const char* what, std::function<void()> fn) {
    std::packaged_task<void()> task(std::move(fn));
    auto req = std::make_shared<FutureRequest>(task.get_future(),
                                               "rank " + std::to_string(rank_) + ": hybrid " + what);
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(task));
    }
    cv_.notify_one();
    return req;
  }

  void run() {
    for (;;) {
      std::packaged_task<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        // Stopping: what is still queued is dropped, not run (each may wait
        // a whole timeout); its waiters get a broken promise -> CommError.
        if (stop_) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();  // an exception lands in the task's future
    }
  }

  int rank_, size_;
  int my_host_ = 0;
  std::vector<int> host_index_, local_index_;  // per rank: its host, its index within the host
  CommunicatorPtr world_, local_, leaders_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::packaged_task<void()>> queue_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace

CommunicatorPtr make_hybrid(c10::intrusive_ptr<c10d::Store> store, int rank, int size,
                            const std::vector<std::string>& host_of, const GlooOptions& gloo, const ShmOptions& shm) {
  TANDEM_CHECK(size >= 1, "world size must be >= 1, got ", size);
  TANDEM_CHECK(rank >= 0 && rank < size, "rank ", rank, " is outside world size ", size);
  return std::make_shared<HybridCommunicator>(std::move(store), rank, size, host_of, gloo, shm);
}

std::string host_id() {
  if (const char* v = std::getenv(env::kHostId); v && *v) return v;
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "localhost";
  return buf;
}

std::vector<std::string> exchange_hosts(c10d::Store& store, int rank, int size, const std::string& prefix,
                                        Milliseconds timeout) {
  const std::string mine = host_id();
  store.set(prefix + "host/" + std::to_string(rank), std::vector<std::uint8_t>(mine.begin(), mine.end()));
  store.setTimeout(timeout);
  std::vector<std::string> out(size);
  for (int r = 0; r < size; ++r) {
    std::vector<std::uint8_t> v;
    try {
      v = store.get(prefix + "host/" + std::to_string(r));
    } catch (const std::exception& e) {
      throw CommError("rank " + std::to_string(rank) + ": rank " + std::to_string(r) + " of " + std::to_string(size) +
                      " did not join the rendezvous within " + std::to_string(timeout.count()) +
                      " ms (is it started, with the same world size and store? it may have failed: see its log)");
    }
    out[r].assign(v.begin(), v.end());
  }
  return out;
}

}  // namespace tandem::comm
