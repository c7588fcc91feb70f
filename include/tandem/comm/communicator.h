#pragma once
// Communicator: tandem's narrow interface over a c10d process group.
//
// Contract: one Communicator per rank per group. Calls are issued by one thread
// at a time per communicator (the owner); the asynchronous calls return a
// Request that may be waited on from any thread. Every blocking call takes a
// timeout; a peer failure or timeout throws tandem::CommError, which leaves the
// communicator unusable (rebuild it), as with Gloo's IoException.
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include <torch/csrc/distributed/c10d/Store.hpp>

namespace tandem {

// Peer or transport failure (a rank died, a message timed out).
class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace comm {

using Milliseconds = std::chrono::milliseconds;
constexpr Milliseconds kDefaultTimeout{300000};

enum class ReduceOp { kSum, kMax, kMin };

// A pending operation. wait() throws CommError on failure or timeout.
class Request {
 public:
  virtual ~Request() = default;
  virtual void wait(Milliseconds timeout) = 0;
  // Source rank of a completed receive-from-any; -1 otherwise.
  virtual int source_rank() const { return -1; }
};
using RequestPtr = std::shared_ptr<Request>;

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;
  Milliseconds timeout() const { return timeout_; }

  // Collectives (in place). All ranks call them in the same order.
  virtual RequestPtr all_reduce_async(at::Tensor& t, ReduceOp op = ReduceOp::kSum) = 0;
  virtual RequestPtr broadcast_async(at::Tensor& t, int root) = 0;
  virtual RequestPtr reduce_async(at::Tensor& t, int root, ReduceOp op = ReduceOp::kSum) = 0;
  // out (size() x in.numel() elements, same type) receives every rank's `in`,
  // rank r's at offset r x in.numel().
  virtual RequestPtr all_gather_async(at::Tensor& out, const at::Tensor& in) = 0;
  virtual void barrier() = 0;

  // Point-to-point. Tags tell concurrent messages between one pair apart.
  virtual RequestPtr send_async(at::Tensor& t, int dst, int tag) = 0;
  virtual RequestPtr recv_async(at::Tensor& t, int src, int tag) = 0;
  virtual RequestPtr recv_any_async(at::Tensor& t, int tag) = 0;

  // Blocking conveniences (wait with this communicator's timeout). A backend
  // may override the collectives to run them on the caller's thread.
  virtual void all_reduce(at::Tensor& t, ReduceOp op = ReduceOp::kSum) { all_reduce_async(t, op)->wait(timeout_); }
  virtual void broadcast(at::Tensor& t, int root) { broadcast_async(t, root)->wait(timeout_); }
  virtual void reduce(at::Tensor& t, int root, ReduceOp op = ReduceOp::kSum) {
    reduce_async(t, root, op)->wait(timeout_);
  }
  virtual void all_gather(at::Tensor& out, const at::Tensor& in) { all_gather_async(out, in)->wait(timeout_); }
  void send(at::Tensor& t, int dst, int tag) { send_async(t, dst, tag)->wait(timeout_); }
  void recv(at::Tensor& t, int src, int tag) { recv_async(t, src, tag)->wait(timeout_); }
  // Returns the rank the message came from.
  int recv_any(at::Tensor& t, int tag) {
    auto r = recv_any_async(t, tag);
    r->wait(timeout_);
    return r->source_rank();
  }

  // A new group over `ranks` (this group's rank numbers, ascending, holding
  // rank()), rendezvoused through this group's store under `name`: every
  // rank in `ranks` calls it with the same arguments, the others don't. In
  // the new group a rank's number is its index in `ranks`. Uses: the
  // data-parallel groups of pipeline stages (pp/). One rank: a world of one.
  // Throws tandem::Error for a backend without a store (the default).
  virtual std::shared_ptr<Communicator> sub_group(const std::vector<int>& ranks, const std::string& name);

 protected:
  // Checks `ranks` and returns this rank's index in it.
  int index_in(const std::vector<int>& ranks) const;
  Milliseconds timeout_{kDefaultTimeout};
};
using CommunicatorPtr = std::shared_ptr<Communicator>;

struct GlooOptions {
  Milliseconds timeout = kDefaultTimeout;
  // Address Gloo binds to. "127.0.0.1" keeps a single-host job on loopback;
  // empty means c10d's default device (the host's name resolution).
  std::string hostname = "127.0.0.1";
  int threads = 2;  // Gloo worker threads: concurrent collectives in flight.
};

// A c10d ProcessGroupGloo over `store`. Ranks rendezvous through the store.
CommunicatorPtr make_gloo(c10::intrusive_ptr<c10d::Store> store, int rank, int size,
                          const GlooOptions& opts = {});

struct NcclOptions {
  Milliseconds timeout = kDefaultTimeout;  // also c10d's per-operation timeout (its watchdog's)
  int device = -1;  // this rank's GPU (CUDA index); -1: the current CUDA device
};

// Whether this build has the NCCL communicator: tandem built with
// TANDEM_WITH_CUDA against a LibTorch with c10d's NCCL (USE_C10D_NCCL).
bool nccl_available();

// A c10d ProcessGroupNCCL over `store`, one GPU per rank. It moves CUDA
// tensors on opts.device, and CPU tensors through that GPU (small ones: the
// bookkeeping collectives); receive-from-any is refused. wait() returns when
// the operation finished on the GPU (Note [NCCL wait] in
// src/comm/nccl_communicator.cpp). Throws tandem::Error in a build without
// NCCL, saying so and to use --comm gloo. Only a world of one on one GPU has
// been run.
CommunicatorPtr make_nccl(c10::intrusive_ptr<c10d::Store> store, int rank, int size, const NcclOptions& opts = {});

// World size 1, no peers: collectives are identity, p2p is an error.
CommunicatorPtr make_single();

// In-process group for tests: `size` communicators sharing one HashStore, one
// per thread. Construction is collective, so each is built on its own thread.
// backend: "gloo", "shm", or "hybrid" (the first half of the ranks act as one
// host, the rest as another).
class InProcessGroup {
 public:
  explicit InProcessGroup(int size, GlooOptions opts = {}, std::string backend = "gloo");
  CommunicatorPtr connect(int rank);  // call from the rank's thread
  int size() const { return size_; }

 private:
  int size_;
  GlooOptions opts_;
  std::string backend_;
  c10::intrusive_ptr<c10d::Store> store_;
};

// Runs fn(rank, comm) on `size` threads with an in-process group; rethrows the
// first exception after every thread finished.
void spawn(int size, const std::function<void(int, CommunicatorPtr)>& fn, GlooOptions opts = {},
           const std::string& backend = "gloo");

}  // namespace comm
}  // namespace tandem
