// Communicator over c10d's ProcessGroupGloo (LibTorch 1.13 and 2.x); the
// calls themselves are c10d_communicator.h's. Also the world of one and the
// in-process groups of tests.
#include "tandem/comm/communicator.h"

#include <thread>

#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "c10d_communicator.h"
#include "tandem/comm/shm.h"
#include "tandem/util/check.h"

namespace tandem::comm {
namespace {

using detail::DoneRequest;

class GlooCommunicator : public detail::C10dCommunicator {
 public:
  GlooCommunicator(c10::intrusive_ptr<c10d::Store> store, int rank, int size, const GlooOptions& o)
      : C10dCommunicator(store, rank, size, o.timeout), opts_(o) {
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
      throw detail::rendezvous_failure(rank, size, e.what());
    }
  }
  std::string backend() const override { return "gloo"; }

 private:
  // Collectives take any device Gloo has (CPU; CUDA through its CUDA
  // algorithms); point-to-point only CPU tensors.
  void check_device(const at::Tensor& t, const char* what, bool p2p) const override {
    TANDEM_CHECK(!p2p || t.is_cpu(), "communicator: Gloo ", what, " takes CPU tensors only, got one on ",
                 t.device().str(), "; copy it to the CPU first");
  }
  CommunicatorPtr make_group(c10::intrusive_ptr<c10d::Store> store, int rank, int size) const override {
    return make_gloo(std::move(store), rank, size, opts_);
  }
  GlooOptions opts_;
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
