// Communicator over c10d's ProcessGroupNCCL, in builds whose LibTorch has
// CUDA and c10d's NCCL (TANDEM_WITH_CUDA against PyTorch's LibTorch); the
// calls themselves are c10d_communicator.h's. Elsewhere make_nccl throws.
//
// Tested here: a world of one on one GPU (scripts/gpu_check.sh, comm_test's
// Nccl tests when a GPU is present). Several GPUs or hosts over NCCL have not
// been run.
#include "tandem/comm/communicator.h"

#include "tandem/config.h"
#include "tandem/util/check.h"

#if defined(__has_include)
#if __has_include(<torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>)
#define TANDEM_NCCL_HEADER 1
#endif
#endif

#if TANDEM_HAVE_CUDA && defined(USE_C10D_NCCL) && defined(TANDEM_NCCL_HEADER)
#define TANDEM_HAVE_NCCL 1
#else
#define TANDEM_HAVE_NCCL 0
#endif

#if TANDEM_HAVE_NCCL
#include <chrono>
#include <thread>

#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include "c10d_communicator.h"
#endif

namespace tandem::comm {

#if TANDEM_HAVE_NCCL
namespace {

// Note [NCCL wait]
// c10d's WorkNCCL::wait() only makes the *calling thread's current CUDA
// stream* wait for NCCL's stream (unless TORCH_NCCL_BLOCKING_WAIT is set); the
// host goes on at once. tandem waits from other threads than the one that
// computes (DDP's finish() on the training thread, compressors on the
// communication thread) and reads results on the CPU (epoch sums), so
// Request::wait here means what it means for Gloo and shm: when it returns,
// the operation has finished and its tensor holds the result for any stream
// and for the CPU. It calls work->wait() (the current stream waits too, and
// a failure c10d already saw is thrown), then polls work->isCompleted() (a
// cudaEventQuery on NCCL's end event) until it is true or `timeout` passed:
// then CommError, as with Gloo. The cost is a host thread blocked for the
// collective, which is what every tandem caller of wait() expects.
// Inputs: NCCL's stream waits for the work queued on the *posting* thread's
// current stream, so a tensor must be computed on that stream (tandem posts
// from the thread that computed it, or after a wait that finished it).
// Timeout: NcclOptions::timeout is also c10d's per-operation timeout; its
// watchdog aborts a collective that runs longer and, with c10d's default
// TORCH_NCCL_ASYNC_ERROR_HANDLING, ends the process, which the launcher then
// reports, before or instead of this wait's CommError.
class NcclRequest : public detail::C10dRequest {
 public:
  using C10dRequest::C10dRequest;
  void wait(Milliseconds timeout) override {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    try {
      work_->wait(timeout);
      for (int polls = 0; !work_->isCompleted(); ++polls) {
        if (std::chrono::steady_clock::now() > deadline)
          throw std::runtime_error("not finished on the GPU within " + std::to_string(timeout.count()) + " ms");
        if (polls < 1000)
          std::this_thread::yield();
        else
          std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
      if (auto e = work_->exception()) std::rethrow_exception(e);
    } catch (const std::exception& e) {
      throw failure(e);
    }
  }
};

// A request on a copy of a CPU tensor on the GPU: when the operation is
// done, the result is copied back into the CPU tensor.
class CopyBackRequest : public Request {
 public:
  CopyBackRequest(RequestPtr inner, at::Tensor gpu, at::Tensor cpu)
      : inner_(std::move(inner)), gpu_(std::move(gpu)), cpu_(std::move(cpu)) {}
  void wait(Milliseconds timeout) override {
    inner_->wait(timeout);
    if (cpu_.defined()) cpu_.copy_(gpu_);
  }
  int source_rank() const override { return inner_->source_rank(); }

 private:
  RequestPtr inner_;
  at::Tensor gpu_, cpu_;  // cpu_ undefined: nothing to copy back (a send)
};

// Note [NCCL and CPU tensors]
// NCCL moves CUDA tensors only. tandem's bookkeeping collectives are on CPU
// tensors whatever the communicator (the model shape check, epoch sums, the
// stall inspector's fingerprints), so a CPU tensor is copied to this group's
// GPU, moved there, and copied back when the request is waited on. That is
// for small tensors; gradients and activations of a CUDA model are on the GPU
// already. CUDA tensors must be on this group's GPU (NCCL keeps one
// communicator per device set, and ranks must agree on it); other devices are
// refused.
class NcclCommunicator : public detail::C10dCommunicator {
 public:
  NcclCommunicator(c10::intrusive_ptr<c10d::Store> store, int rank, int size, const NcclOptions& o)
      : C10dCommunicator(store, rank, size, o.timeout), opts_(o) {
    c10::impl::VirtualGuardImpl cuda(c10::DeviceType::CUDA);
    TANDEM_CHECK(cuda.deviceCount() > 0, "--comm nccl: this machine has no CUDA device; use --comm gloo");
    device_ = o.device >= 0 ? c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(o.device)) : cuda.getDevice();
    TANDEM_CHECK(device_.index() < cuda.deviceCount(), "--comm nccl: no CUDA device ", device_.str(), " (", cuda.deviceCount(),
                 " visible)");
    opts_.device = device_.index();
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = o.timeout;
    try {
      pg_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
    } catch (const std::exception& e) {
      throw detail::rendezvous_failure(rank, size, e.what());
    }
  }
  std::string backend() const override { return "nccl"; }

  RequestPtr all_reduce_async(at::Tensor& t, ReduceOp op) override {
    return staged(t, true, [&](at::Tensor& g) { return C10dCommunicator::all_reduce_async(g, op); });
  }
  RequestPtr broadcast_async(at::Tensor& t, int root) override {
    return staged(t, true, [&](at::Tensor& g) { return C10dCommunicator::broadcast_async(g, root); });
  }
  RequestPtr reduce_async(at::Tensor& t, int root, ReduceOp op) override {
    return staged(t, true, [&](at::Tensor& g) { return C10dCommunicator::reduce_async(g, root, op); });
  }
  RequestPtr all_gather_async(at::Tensor& out, const at::Tensor& in) override {
    check_contig(in);
    const at::Tensor gin = in.is_cpu() ? in.to(device_) : in;
    return staged(out, true, [&](at::Tensor& g) { return C10dCommunicator::all_gather_async(g, gin); });
  }
  RequestPtr send_async(at::Tensor& t, int dst, int tag) override {
    return staged(t, false, [&](at::Tensor& g) { return C10dCommunicator::send_async(g, dst, tag); });
  }
  RequestPtr recv_async(at::Tensor& t, int src, int tag) override {
    return staged(t, true, [&](at::Tensor& g) { return C10dCommunicator::recv_async(g, src, tag); });
  }
  RequestPtr recv_any_async(at::Tensor&, int) override {
    TANDEM_FAIL("communicator: NCCL cannot receive from any rank (every receive names its sender); "
                "use --comm gloo or shm");
  }
  // c10d's NCCL barrier guesses the GPU when no collective ran yet (rank mod
  // devices); an all-reduce of one element on this group's GPU cannot guess wrong.
  void barrier() override {
    std::vector<at::Tensor> v{at::zeros({1}, at::TensorOptions().device(device_).dtype(at::kFloat))};
    c10d::AllreduceOptions o;
    o.timeout = timeout_;
    post([&] { return pg_->allreduce(v, o); }, v[0], "barrier", -1)->wait(timeout_);
  }

 private:
  void check_device(const at::Tensor& t, const char* what, bool) const override {
    TANDEM_CHECK(t.is_cuda() && t.device() == device_, "communicator: NCCL ", what,
                 " takes CUDA tensors on this group's GPU (", device_.str(), ") or CPU tensors, got one on ",
                 t.device().str(), "; move it to ", device_.str());
  }
  CommunicatorPtr make_group(c10::intrusive_ptr<c10d::Store> store, int rank, int size) const override {
    return make_nccl(std::move(store), rank, size, opts_);
  }
  RequestPtr wrap(c10::intrusive_ptr<c10d::Work> w, const at::Tensor& t, std::string what) override {
    return std::make_shared<NcclRequest>(std::move(w), t, std::move(what), rank_);
  }
  // Runs op on t, or on a copy of a CPU t on this group's GPU (Note [NCCL
  // and CPU tensors]); `back`: the operation writes t.
  template <class F>
  RequestPtr staged(at::Tensor& t, bool back, F&& op) {
    if (!t.is_cpu()) return op(t);
    check_contig(t);
    at::Tensor g = t.to(device_);
    auto r = op(g);
    return std::make_shared<CopyBackRequest>(std::move(r), g, back ? t : at::Tensor());
  }
  NcclOptions opts_;
  c10::Device device_{c10::kCUDA, 0};
};

}  // namespace

bool nccl_available() { return true; }

CommunicatorPtr make_nccl(c10::intrusive_ptr<c10d::Store> store, int rank, int size, const NcclOptions& opts) {
  TANDEM_CHECK(size >= 1, "world size must be >= 1, got ", size);
  TANDEM_CHECK(rank >= 0 && rank < size, "rank ", rank, " is outside world size ", size);
  return std::make_shared<NcclCommunicator>(std::move(store), rank, size, opts);
}

#else  // !TANDEM_HAVE_NCCL

bool nccl_available() { return false; }

CommunicatorPtr make_nccl(c10::intrusive_ptr<c10d::Store>, int, int, const NcclOptions&) {
  TANDEM_FAIL("NCCL communicator: this LibTorch has no NCCL (tandem was built without CUDA, or against a "
              "LibTorch without c10d's NCCL); use --comm gloo");
}

#endif

}  // namespace tandem::comm
