// Communicator over one host's shared-memory segment (see tandem/comm/shm.h).
//
// Collectives advance in chunks numbered k = 0, 1, 2, ... on every rank alike
// (all ranks run the same collectives in the same order). Rank r publishes its
// progress on chunk k in its `phase` word:
//   3k+1  its input for chunk k is in its slot buffer k%2
//   3k+2  it reduced its slice of chunk k (written back into its own slot)
//   3k+3  it is done reading everyone's slots for chunk k
// Before rank r writes its buffer k%2 again (chunk k) every rank must have
// published 3(k-2)+3 = 3k-3, i.e. finished reading chunk k-2 from it. That is
// the only back-pressure, so a rank runs at most one chunk ahead of the
// slowest: copy-in of chunk k+1 overlaps the others' reduce of chunk k.
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <list>
#include <mutex>
#include <thread>

#include "kernels.h"
#include "op_state.h"
#include "p2p_engine.h"
#include "segment.h"
#include "tandem/comm/env.h"
#include "tandem/comm/shm.h"
#include "tandem/util/check.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

namespace tandem::comm {
namespace {

using shm::OpState;
using shm::OpStatePtr;
using shm::PeerStatus;
using shm::Segment;
using SteadyClock = std::chrono::steady_clock;

enum class Kind { kAllReduce, kBroadcast, kReduce, kAllGather, kBarrier };

struct CollOp {
  Kind kind;
  at::Tensor t;   // in place; all-gather: the output
  at::Tensor in;  // all-gather: the input
  ReduceOp op = ReduceOp::kSum;
  int root = -1;
  OpStatePtr st;
};

std::int64_t default_spin(int ranks) {
  long cores = ::sysconf(_SC_NPROCESSORS_ONLN);
  // 1 ms: measured on 2 cores with 2 ranks of DDP, a futex wake-up costs more
  // than spinning through the other rank's usual lateness (docs/benchmarks.md).
  return ranks <= cores ? 1'000'000 : 0;
}

constexpr int kMaxRanks = 64;

std::vector<int> labels_for(const ShmOptions& o, int size) {
  if (!o.rank_labels.empty()) return o.rank_labels;
  std::vector<int> v(size);
  for (int r = 0; r < size; ++r) v[r] = r;
  return v;
}

std::string job_id_for(const ShmOptions& o) {
  if (!o.job_id.empty()) return o.job_id;
  const char* v = std::getenv(env::kJobId);
  return v && *v ? v : "j";
}

class ShmCommunicator : public Communicator {
 public:
  ShmCommunicator(c10::intrusive_ptr<c10d::Store> store, int rank, int size, const ShmOptions& o)
      : rank_(rank), size_(size), opts_(o), store_(store),
        seg_(store, rank, shm::Geometry{size, o.chunk_bytes, o.channel_bytes}, job_id_for(o), o.timeout),
        spin_ns_(o.spin_ns >= 0 ? o.spin_ns : default_spin(size)), labels_(labels_for(o, size)),
        p2p_(seg_, labels_, spin_ns_) {
    timeout_ = o.timeout;
  }

  CommunicatorPtr sub_group(const std::vector<int>& ranks, const std::string& name) override {
    const int me = index_in(ranks);
    if (ranks.size() == 1) return make_single();
    ShmOptions o = opts_;
    o.spin_ns = -1;  // the default: a group's own collectives, whatever the parent's waits do
    o.rank_labels.clear();
    for (int r : ranks) o.rank_labels.push_back(labels_[static_cast<size_t>(r)]);
    return make_shm(c10::make_intrusive<c10d::PrefixStore>("tandem/sub/" + name + "/", store_), me,
                    static_cast<int>(ranks.size()), o);
  }

  ~ShmCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(qmu_);
      stop_ = true;
    }
    qcv_.notify_all();
    stopping_.store(true);
    seg_.ring(rank_);  // a collective asleep on the doorbell sees stopping_ and gives up
    if (coll_thread_.joinable()) coll_thread_.join();
    // p2p_ (declared last) stops its thread first, then seg_ closes this rank.
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "shm"; }

  RequestPtr all_reduce_async(at::Tensor& t, ReduceOp op) override {
    return submit({Kind::kAllReduce, checked(t, "all-reduce"), {}, op, -1, nullptr});
  }
  RequestPtr broadcast_async(at::Tensor& t, int root) override {
    check_root(root, "broadcast");
    return submit({Kind::kBroadcast, checked(t, "broadcast", false), {}, ReduceOp::kSum, root, nullptr});
  }
  RequestPtr reduce_async(at::Tensor& t, int root, ReduceOp op) override {
    check_root(root, "reduce");
    return submit({Kind::kReduce, checked(t, "reduce"), {}, op, root, nullptr});
  }
  RequestPtr all_gather_async(at::Tensor& out, const at::Tensor& in) override {
    check_gather(out, in);
    return submit({Kind::kAllGather, out, in, ReduceOp::kSum, -1, nullptr});
  }
  void barrier() override { run_blocking({Kind::kBarrier, {}, {}, ReduceOp::kSum, -1, nullptr}); }

  void all_reduce(at::Tensor& t, ReduceOp op) override {
    run_blocking({Kind::kAllReduce, checked(t, "all-reduce"), {}, op, -1, nullptr});
  }
  void broadcast(at::Tensor& t, int root) override {
    check_root(root, "broadcast");
    run_blocking({Kind::kBroadcast, checked(t, "broadcast", false), {}, ReduceOp::kSum, root, nullptr});
  }
  void reduce(at::Tensor& t, int root, ReduceOp op) override {
    check_root(root, "reduce");
    run_blocking({Kind::kReduce, checked(t, "reduce"), {}, op, root, nullptr});
  }
  void all_gather(at::Tensor& out, const at::Tensor& in) override {
    check_gather(out, in);
    run_blocking({Kind::kAllGather, out, in, ReduceOp::kSum, -1, nullptr});
  }

  RequestPtr send_async(at::Tensor& t, int dst, int tag) override {
    check_p2p(t, "send");
    TANDEM_CHECK(dst >= 0 && dst < size_ && dst != rank_, "send: bad destination rank ", dst);
    return p2p_.post(true, dst, tag, t, self() + ": shared-memory send to rank " + std::to_string(label(dst)));
  }
  RequestPtr recv_async(at::Tensor& t, int src, int tag) override {
    check_p2p(t, "recv");
    TANDEM_CHECK(src >= 0 && src < size_ && src != rank_, "recv: bad source rank ", src);
    return p2p_.post(false, src, tag, t, self() + ": shared-memory recv from rank " + std::to_string(label(src)));
  }
  RequestPtr recv_any_async(at::Tensor& t, int tag) override {
    check_p2p(t, "recv");
    TANDEM_CHECK(size_ > 1, "recv in a world of size 1");
    return p2p_.post(false, -1, tag, t, self() + ": shared-memory recv from any rank");
  }

 private:
  // ---- argument checks -------------------------------------------------
  at::Tensor checked(at::Tensor& t, const char* what, bool reducing = true) {
    TANDEM_CHECK(t.is_contiguous(), "communicator: tensors must be contiguous");
    TANDEM_CHECK(t.is_cpu(), "shared-memory ", what, " takes CPU tensors, got one on ", t.device().str(),
                 "; copy it to the CPU first");
    if (reducing)
      TANDEM_CHECK(shm::reducible(t.scalar_type()), "shared-memory ", what, ": element type ",
                   c10::toString(t.scalar_type()),
                   " is not supported (float32/64, float16, bfloat16, int32/64 are); use --comm gloo");
    return t;
  }
  void check_root(int root, const char* what) const {
    TANDEM_CHECK(root >= 0 && root < size_, what, ": root rank ", root, " is outside world size ", size_);
  }
  void check_gather(const at::Tensor& out, const at::Tensor& in) const {
    TANDEM_CHECK(out.is_contiguous() && in.is_contiguous(), "communicator: tensors must be contiguous");
    TANDEM_CHECK(out.is_cpu() && in.is_cpu(), "shared-memory all-gather takes CPU tensors");
    TANDEM_CHECK(out.scalar_type() == in.scalar_type() && out.numel() == in.numel() * size_,
                 "all_gather: output must hold world size x ", in.numel(), " elements of the input's type, got ",
                 out.numel());
  }
  void check_p2p(const at::Tensor& t, const char* what) const {
    TANDEM_CHECK(t.is_contiguous(), "communicator: tensors must be contiguous");
    TANDEM_CHECK(t.is_cpu(), "shared-memory ", what, " takes CPU tensors, got one on ", t.device().str());
  }
  int label(int r) const { return labels_[r]; }
  std::string self() const { return "rank " + std::to_string(label(rank_)); }

  // ---- collectives: queue, thread, inline path -------------------------
  std::string describe_op(const CollOp& c) const {
    static const char* names[] = {"all-reduce", "broadcast", "reduce", "all-gather", "barrier"};
    std::string s = self() + ": shared-memory " + names[static_cast<int>(c.kind)];
    if (c.t.defined()) s += " of " + std::to_string(c.t.numel() * c.t.element_size()) + " bytes";
    return s + " (collective #" + std::to_string(coll_count_) + ")";
  }

  RequestPtr submit(CollOp c) {
    ++coll_count_;
    c.st = std::make_shared<OpState>(describe_op(c), spin_ns_);
    auto st = c.st;
    {
      std::lock_guard<std::mutex> lock(qmu_);
      if (!coll_thread_.joinable()) coll_thread_ = std::thread([this] { coll_loop(); });
      queue_.push_back(std::move(c));
    }
    qcv_.notify_one();
    return st;
  }

  // A blocking collective runs on the caller's thread when nothing is queued
  // (saves two thread hand-offs on small messages), else behind the queue.
  void run_blocking(CollOp c) {
    bool inline_run = false;
    {
      std::lock_guard<std::mutex> lock(qmu_);
      if (queue_.empty() && !busy_) busy_ = inline_run = true;
    }
    if (!inline_run) {
      submit(std::move(c))->wait(timeout_ + Milliseconds(1000));
      return;
    }
    ++coll_count_;
    if (auto err = run_and_release(c)) std::rethrow_exception(err);
  }

  // Runs `c` (the caller set busy_), then frees the engine for the next one;
  // returns what it threw.
  std::exception_ptr run_and_release(CollOp& c) {
    std::exception_ptr err;
    try {
      execute(c);
    } catch (...) {
      err = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(qmu_);
      busy_ = false;
    }
    qcv_.notify_all();
    return err;
  }

  void coll_loop() {
    for (;;) {
      CollOp c;
      {
        std::unique_lock<std::mutex> lock(qmu_);
        qcv_.wait(lock, [&] { return stop_ || (!queue_.empty() && !busy_); });
        if (stop_) break;
        c = std::move(queue_.front());
        queue_.pop_front();
        busy_ = true;
      }
      c.st->complete(run_and_release(c));
    }
    std::lock_guard<std::mutex> lock(qmu_);
    for (auto& c : queue_) c.st->complete(std::make_exception_ptr(CommError(c.st->what() + ": communicator destroyed")));
    queue_.clear();
  }

  void execute(CollOp& c) {
    if (!broken_.empty()) throw CommError(broken_);
    try {
      switch (c.kind) {
        case Kind::kAllReduce: return reduce_chunks(c.t, c.op, -1);
        case Kind::kReduce: return reduce_chunks(c.t, c.op, c.root);
        case Kind::kBroadcast: return broadcast_chunks(c.t, c.root);
        case Kind::kAllGather: return gather_chunks(c.t, c.in);
        case Kind::kBarrier: return barrier_chunk();
      }
    } catch (const CommError& e) {
      broken_ = e.what();
      throw;
    }
  }

  // ---- the chunk protocol ------------------------------------------------
  void publish(std::uint64_t phase) {
    seg_.state(rank_).phase.store(phase, std::memory_order_release);
    seg_.ring_all();
  }

  // Waits until rank `only` (or every rank, with -1) has published `phase`.
  void wait_phase(std::uint64_t phase, const char* step, int only = -1) {
    auto reached = [&](int r) { return seg_.state(r).phase.load(std::memory_order_acquire) >= phase; };
    auto ready = [&] {
      if (only >= 0) return reached(only);
      for (int r = 0; r < size_; ++r)
        if (!reached(r)) return false;
      return true;
    };
    const auto deadline = SteadyClock::now() + timeout_;
    auto check = [&] {
      if (stopping_.load()) throw CommError(self() + ": communicator destroyed during " + step);
      std::string late;
      bool fatal = false, expired = SteadyClock::now() >= deadline;
      for (int r = 0; r < size_; ++r) {
        if ((only >= 0 && r != only) || reached(r)) continue;
        auto s = seg_.status(r);
        if (reached(r)) continue;  // it published, then left: not a failure
        if (s == PeerStatus::kGone || s == PeerStatus::kClosed) fatal = true;
        if (s == PeerStatus::kGone || s == PeerStatus::kClosed || expired)
          late += (late.empty() ? "" : "; ") + std::string("rank ") + std::to_string(label(r)) + " (pid " +
                  std::to_string(seg_.state(r).pid.load()) + ") " + shm::describe(s);
      }
      if (fatal || expired)
        throw CommError(self() + ": " + step + " (collective chunk " + std::to_string(phase / 3) + ") failed: " +
                        late + (expired ? " within the timeout of " + std::to_string(timeout_.count()) + " ms" : "") +
                        " (see the launcher's report for why; raise --timeout if a rank is only slow)");
    };
    seg_.wait(ready, check, spin_ns_);
  }

  // Before writing my slot buffer for chunk k: everyone has finished chunk k-2.
  void claim_buffer(std::uint64_t k, const char* step) {
    if (k >= 2) wait_phase(3 * k - 3, step);
  }

  std::size_t chunk_elems(const at::Tensor& t) const {
    return std::max<std::size_t>(1, opts_.chunk_bytes / t.element_size());
  }

  // All-reduce (root < 0) or reduce to `root`.
  void reduce_chunks(at::Tensor& t, ReduceOp op, int root) {
    const std::size_t n = static_cast<std::size_t>(t.numel()), es = t.element_size(), ce = chunk_elems(t);
    auto* data = static_cast<std::uint8_t*>(t.data_ptr());
    const auto type = t.scalar_type();
    const bool want = root < 0 || root == rank_;
    const void* in[kMaxRanks];
    for (std::size_t off = 0; off < n; off += ce) {
      const std::size_t m = std::min(ce, n - off);
      const std::uint64_t k = seq_++;
      const int b = static_cast<int>(k & 1);
      claim_buffer(k, "reduce: waiting for a free buffer");
      std::memcpy(seg_.slot(rank_, b), data + off * es, m * es);
      publish(3 * k + 1);
      wait_phase(3 * k + 1, "reduce: waiting for every rank's input");
      if (m * es <= opts_.small_bytes) {
        if (want) {
          for (int r = 0; r < size_; ++r) in[r] = seg_.slot(r, b);
          shm::reduce(type, op, data + off * es, in, size_, m);
        }
        publish(3 * k + 3);
        continue;
      }
      // Reduce-scatter: my slice, from every slot, into my slot ...
      const std::size_t per = ((m + size_ - 1) / size_ + 15) & ~std::size_t{15};  // slices start on 16-element boundaries
      const std::size_t lo = std::min(m, per * rank_), hi = std::min(m, lo + per);
      if (hi > lo) {
        for (int r = 0; r < size_; ++r) in[r] = seg_.slot(r, b) + lo * es;
        std::uint8_t* mine = seg_.slot(rank_, b) + lo * es;
        shm::reduce(type, op, mine, in, size_, hi - lo);
        if (want) std::memcpy(data + (off + lo) * es, mine, (hi - lo) * es);
      }
      publish(3 * k + 2);
      // ... then all-gather: every other slice from its owner's slot.
      if (want) {
        wait_phase(3 * k + 2, "reduce: waiting for the reduced slices");
        for (int r = 0; r < size_; ++r) {
          const std::size_t rlo = std::min(m, per * r), rhi = std::min(m, rlo + per);
          if (r != rank_ && rhi > rlo) std::memcpy(data + (off + rlo) * es, seg_.slot(r, b) + rlo * es, (rhi - rlo) * es);
        }
      }
      publish(3 * k + 3);
    }
  }

  void broadcast_chunks(at::Tensor& t, int root) {
    const std::size_t n = t.numel() * t.element_size(), c = opts_.chunk_bytes;
    auto* data = static_cast<std::uint8_t*>(t.data_ptr());
    for (std::size_t off = 0; off < n; off += c) {
      const std::size_t m = std::min(c, n - off);
      const std::uint64_t k = seq_++;
      const int b = static_cast<int>(k & 1);
      if (rank_ == root) {
        claim_buffer(k, "broadcast: waiting for a free buffer");
        std::memcpy(seg_.slot(rank_, b), data + off, m);
      } else {
        wait_phase(3 * k + 1, "broadcast: waiting for the root's data", root);
        std::memcpy(data + off, seg_.slot(root, b), m);
      }
      publish(3 * k + 3);
    }
  }

  void gather_chunks(at::Tensor& out, const at::Tensor& in) {
    const std::size_t n = in.numel() * in.element_size(), c = opts_.chunk_bytes;
    const auto* src = static_cast<const std::uint8_t*>(in.data_ptr());
    auto* dst = static_cast<std::uint8_t*>(out.data_ptr());
    for (std::size_t off = 0; off < n; off += c) {
      const std::size_t m = std::min(c, n - off);
      const std::uint64_t k = seq_++;
      const int b = static_cast<int>(k & 1);
      claim_buffer(k, "all-gather: waiting for a free buffer");
      std::memcpy(seg_.slot(rank_, b), src + off, m);
      publish(3 * k + 1);
      wait_phase(3 * k + 1, "all-gather: waiting for every rank's input");
      for (int r = 0; r < size_; ++r) std::memcpy(dst + r * n + off, seg_.slot(r, b), m);
      publish(3 * k + 3);
    }
  }

  void barrier_chunk() {
    const std::uint64_t k = seq_++;
    publish(3 * k + 1);
    wait_phase(3 * k + 1, "barrier");
    publish(3 * k + 3);
  }

  int rank_, size_;
  ShmOptions opts_;
  c10::intrusive_ptr<c10d::Store> store_;  // kept: a FileStore's file lives while any rank holds it
  Segment seg_;
  std::int64_t spin_ns_;
  std::vector<int> labels_;
  std::atomic<bool> stopping_{false};

  // Collectives. seq_ and broken_ belong to whoever runs the current one.
  std::mutex qmu_;
  std::condition_variable qcv_;
  std::deque<CollOp> queue_;
  bool busy_ = false, stop_ = false;
  std::thread coll_thread_;
  std::uint64_t seq_ = 0;
  std::uint64_t coll_count_ = 0;
  std::string broken_;

  shm::P2PEngine p2p_;
};

}  // namespace

CommunicatorPtr make_shm(c10::intrusive_ptr<c10d::Store> store, int rank, int size, const ShmOptions& opts) {
  TANDEM_CHECK(size >= 1, "world size must be >= 1, got ", size);
  TANDEM_CHECK(rank >= 0 && rank < size, "rank ", rank, " is outside world size ", size);
  TANDEM_CHECK(size <= kMaxRanks, "shared-memory communicator: at most ", kMaxRanks, " ranks on one host, got ", size,
               " (use --comm gloo)");
  TANDEM_CHECK(opts.chunk_bytes >= 4096 && opts.chunk_bytes % 64 == 0,
               "shared-memory chunk must be a multiple of 64 bytes, at least 4096, got ", opts.chunk_bytes);
  TANDEM_CHECK(opts.channel_bytes >= 4096 && opts.channel_bytes % 64 == 0,
               "shared-memory channel must be a multiple of 64 bytes, at least 4096, got ", opts.channel_bytes);
  return std::make_shared<ShmCommunicator>(std::move(store), rank, size, opts);
}

}  // namespace tandem::comm
