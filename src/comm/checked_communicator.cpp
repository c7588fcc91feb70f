// Checked communicator: collective sequence numbers, cross-rank fingerprints
// and the stall inspector (contract in tandem/comm/checked.h).
#include "tandem/comm/checked.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <iostream>
#include <mutex>
#include <sstream>
#include <thread>

#include "tandem/util/check.h"
#include "tandem/util/clock.h"

namespace tandem::comm {
namespace {

thread_local const OpLabel* tls_label = nullptr;

enum Kind : int64_t { kAllReduce = 1, kBroadcast, kReduce, kAllGather, kBarrier };

// One collective as this rank issued it. Fields that do not apply are -1.
struct Op {
  int64_t kind = 0;
  int64_t dtype = -1;  // c10::ScalarType
  int64_t numel = -1;
  int64_t root = -1;
  int64_t reduce = -1;  // ReduceOp
  std::shared_ptr<const std::string> label;
};

Op make_op(int64_t kind, const at::Tensor* t, int64_t root, int64_t reduce) {
  Op op;
  op.kind = kind;
  if (t) {
    op.dtype = static_cast<int64_t>(t->scalar_type());
    op.numel = t->numel();
  }
  op.root = root;
  op.reduce = reduce;
  op.label = OpLabel::current();
  return op;
}

std::string dtype_name(int64_t code) {
  switch (static_cast<at::ScalarType>(code)) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default:
      if (code >= 0 && code < static_cast<int64_t>(at::ScalarType::NumOptions))
        return c10::toString(static_cast<at::ScalarType>(code));
      return "dtype " + std::to_string(code);
  }
}

const char* reduce_name(int64_t op) {
  switch (static_cast<ReduceOp>(op)) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
  }
  return "?";
}

// "all_reduce(float32 x 1024, sum)", "broadcast(float32 x 10, root 0)", ...
std::string describe(int64_t kind, int64_t dtype, int64_t numel, int64_t root, int64_t reduce) {
  static const char* names[] = {"?", "all_reduce", "broadcast", "reduce", "all_gather", "barrier"};
  if (kind < kAllReduce || kind > kBarrier) return "unknown collective (kind " + std::to_string(kind) + ")";
  std::string s = std::string(names[kind]) + "(";
  if (kind != kBarrier) s += dtype_name(dtype) + " x " + std::to_string(numel);
  if (kind == kAllGather) s += " per rank";
  if (root >= 0) s += ", root " + std::to_string(root);
  if (reduce >= 0) s += std::string(", ") + reduce_name(reduce);
  return s + ")";
}

// The label, quoted, or else the description.
std::string display_name(const Op& op) {
  if (op.label && !op.label->empty()) return "'" + *op.label + "'";
  return describe(op.kind, op.dtype, op.numel, op.root, op.reduce);
}

// ---------------------------------------------------------------------------
// Fingerprints. A row of int64: the compared fields, then the first label
// bytes (shown in the message, never compared: labels may name rank-specific
// things, and the operation itself is what must agree).
constexpr int kColSeq = 0, kColKind = 1, kColDtype = 2, kColNumel = 3, kColRoot = 4, kColReduce = 5, kCompared = 6;
constexpr int kLabelLen = 6, kLabelStart = 7, kLabelWords = 6, kRow = kLabelStart + kLabelWords;
constexpr size_t kLabelBytes = kLabelWords * sizeof(int64_t);

std::string row_label(const int64_t* row) {
  int64_t len = row[kLabelLen];
  if (len <= 0) return "";
  char buf[kLabelBytes];
  std::memcpy(buf, row + kLabelStart, kLabelBytes);
  size_t n = std::min<size_t>(static_cast<size_t>(len), kLabelBytes);
  return "'" + std::string(buf, n) + (static_cast<size_t>(len) > kLabelBytes ? "...'" : "'");
}

std::string rank_list(const std::vector<int>& ranks) {
  std::string s = ranks.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

// Identical on every rank: it is computed from the gathered rows alone.
std::string mismatch_message(const int64_t* rows, int size) {
  std::vector<std::pair<const int64_t*, std::vector<int>>> groups;  // distinct (op, label) -> ranks
  bool same_seq = true;
  for (int r = 0; r < size; ++r) {
    const int64_t* row = rows + r * kRow;
    same_seq = same_seq && row[kColSeq] == rows[kColSeq];
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const auto& g) { return std::equal(row, row + kRow, g.first); });
    if (it == groups.end()) {
      groups.push_back({row, {r}});
    } else {
      it->second.push_back(r);
    }
  }
  std::string s = "collective mismatch";
  s += same_seq ? " at #" + std::to_string(rows[kColSeq]) + ": " : ": ";
  for (size_t i = 0; i < groups.size(); ++i) {
    const int64_t* row = groups[i].first;
    s += i ? (groups.size() > 2 ? "; " : ", ") : "";
    s += rank_list(groups[i].second) + (groups[i].second.size() == 1 ? " calls " : " call ");
    if (!same_seq) s += "#" + std::to_string(row[kColSeq]) + " ";
    s += describe(row[kColKind], row[kColDtype], row[kColNumel], row[kColRoot], row[kColReduce]);
    std::string label = row_label(row);
    if (!label.empty()) s += " " + label;
  }
  return s + " (every rank must issue the same collectives, with the same dtype, element count, root and reduce "
             "op, in the same order)";
}

// ---------------------------------------------------------------------------
// Progress of one rank: shared by the communicator (issue), its Requests
// (completion, from any thread) and the watchdog (snapshots).
struct Snapshot {
  uint64_t issued = 0, completed = 0;  // completed: every collective up to this one has completed
  std::string newest_name, oldest_name;
  Clock::time_point newest_t, oldest_t;  // oldest: of the oldest incomplete (valid when completed < issued)
};

class Tracker {
 public:
  uint64_t issue(const Op& op) {
    auto now = Clock::now();
    std::lock_guard<std::mutex> lock(m_);
    uint64_t seq = ++issued_;
    inflight_.push_back({seq, op, now, false});
    newest_ = op;
    newest_t_ = now;
    return seq;
  }
  void complete(uint64_t seq) {
    std::lock_guard<std::mutex> lock(m_);
    if (inflight_.empty() || seq < inflight_.front().seq) return;
    size_t i = seq - inflight_.front().seq;
    if (i >= inflight_.size()) return;
    inflight_[i].done = true;
    while (!inflight_.empty() && inflight_.front().done) inflight_.pop_front();
  }
  // The version (issued, completed) is cheap to compare; names are formatted
  // only when it changed.
  std::pair<uint64_t, uint64_t> version() {
    std::lock_guard<std::mutex> lock(m_);
    return {issued_, completed_locked()};
  }
  Snapshot snapshot() {
    Op newest, oldest;
    Snapshot s;
    {
      std::lock_guard<std::mutex> lock(m_);
      s.issued = issued_;
      s.completed = completed_locked();
      newest = newest_;
      s.newest_t = newest_t_;
      if (!inflight_.empty()) {
        oldest = inflight_.front().op;
        s.oldest_t = inflight_.front().t;
      }
    }
    if (s.issued > 0) s.newest_name = display_name(newest);
    if (s.completed < s.issued) s.oldest_name = display_name(oldest);
    return s;
  }

 private:
  struct Entry {
    uint64_t seq;
    Op op;
    Clock::time_point t;
    bool done;
  };
  uint64_t completed_locked() const { return inflight_.empty() ? issued_ : inflight_.front().seq - 1; }

  std::mutex m_;
  uint64_t issued_ = 0;
  std::deque<Entry> inflight_;  // issued, not all completed; front: the oldest incomplete
  Op newest_;
  Clock::time_point newest_t_;
};

// Completion of an asynchronous collective: wait() returned, or nobody can
// wait any more (destroyed), so nobody is stalled on it.
class CheckedRequest : public Request {
 public:
  CheckedRequest(RequestPtr inner, std::shared_ptr<Tracker> tracker, uint64_t seq)
      : inner_(std::move(inner)), tracker_(std::move(tracker)), seq_(seq) {}
  ~CheckedRequest() override { retire(); }
  void wait(Milliseconds timeout) override {
    inner_->wait(timeout);
    retire();
  }
  int source_rank() const override { return inner_->source_rank(); }

 private:
  void retire() {
    if (!done_.exchange(true)) tracker_->complete(seq_);
  }
  RequestPtr inner_;
  std::shared_ptr<Tracker> tracker_;
  uint64_t seq_;
  std::atomic<bool> done_{false};
};

// ---------------------------------------------------------------------------
// Stall inspector. A rank's record in the store, as text:
//   "<issued> <completed> <newest issue wall ms> <oldest incomplete issue wall ms>\n<newest name>\n<oldest name>"
struct Record {
  bool present = false;
  uint64_t issued = 0, completed = 0;
  int64_t newest_ms = 0, oldest_ms = 0;
  std::string newest_name, oldest_name;
};

int64_t wall_ms_now() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

int64_t to_wall_ms(Clock::time_point t, Clock::time_point now, int64_t now_ms) {
  return now_ms - std::chrono::duration_cast<std::chrono::milliseconds>(now - t).count();
}

std::string one_line(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

Record to_record(const Snapshot& s) {
  auto now = Clock::now();
  int64_t now_ms = wall_ms_now();
  Record r;
  r.present = true;
  r.issued = s.issued;
  r.completed = s.completed;
  r.newest_ms = s.issued ? to_wall_ms(s.newest_t, now, now_ms) : 0;
  r.oldest_ms = s.completed < s.issued ? to_wall_ms(s.oldest_t, now, now_ms) : 0;
  r.newest_name = one_line(s.newest_name);
  r.oldest_name = one_line(s.oldest_name);
  return r;
}

std::string serialize(const Record& r) {
  std::ostringstream os;
  os << r.issued << ' ' << r.completed << ' ' << r.newest_ms << ' ' << r.oldest_ms << '\n'
     << r.newest_name << '\n'
     << r.oldest_name;
  return os.str();
}

Record parse(const std::vector<uint8_t>& bytes) {
  std::istringstream is(std::string(bytes.begin(), bytes.end()));
  Record r;
  std::string line;
  if (!std::getline(is, line)) return r;
  std::istringstream nums(line);
  if (!(nums >> r.issued >> r.completed >> r.newest_ms >> r.oldest_ms)) return r;
  std::getline(is, r.newest_name);
  std::getline(is, r.oldest_name);
  r.present = true;
  return r;
}

std::string secs(double s) {
  std::ostringstream os;
  os.precision(0);
  os << std::fixed << std::max(0.0, s) << " s";
  return os.str();
}

// Which ranks have not reached collective #seq that has waited `waited_s` on
// rank `on_rank`. recs[r]: rank r's newest record (rank 0's is local).
std::string stall_message(uint64_t seq, const std::string& name, double waited_s, int on_rank,
                          const std::vector<Record>& recs) {
  constexpr size_t kDetailed = 8;  // ranks described one by one; the rest are counted
  int64_t now_ms = wall_ms_now();
  std::string s = "stall: collective #" + std::to_string(seq) + " " + name + " has waited " + secs(waited_s) +
                  " on rank " + std::to_string(on_rank) + "; ";
  std::vector<int> behind;
  for (int r = 0; r < static_cast<int>(recs.size()); ++r)
    if (!recs[r].present || recs[r].issued < seq) behind.push_back(r);
  auto detail = [&](int r) {
    const Record& rec = recs[r];
    if (!rec.present) return std::string("no progress published yet");
    if (rec.issued == 0) return std::string("no collective issued yet");
    return "last issued #" + std::to_string(rec.issued) + " " + rec.newest_name + ", " +
           secs((now_ms - rec.newest_ms) / 1000.0) + " ago";
  };
  if (!behind.empty()) {
    std::vector<int> shown(behind.begin(), behind.begin() + std::min(behind.size(), kDetailed));
    s += rank_list(shown);
    if (behind.size() > shown.size()) s += " and " + std::to_string(behind.size() - shown.size()) + " more ranks";
    s += behind.size() == 1 ? " has not reached it (" : " have not reached it (";
    for (size_t i = 0; i < shown.size(); ++i) {
      if (behind.size() > 1) s += (i ? "; rank " : "rank ") + std::to_string(shown[i]) + ": ";
      s += detail(shown[i]);
    }
    return s + ")";
  }
  // Every rank issued it: either the transport is stuck or the ranks issued
  // different collectives under one number. A rank whose newest is #seq
  // tells which one it issued.
  s += "every rank has issued it";
  for (int r = 0; r < static_cast<int>(recs.size()); ++r)
    if (recs[r].issued == seq && recs[r].newest_name != name)
      s += "; rank " + std::to_string(r) + " issued it as " + recs[r].newest_name;
  return s + " (if the ranks called different collectives here, --check-collectives names them)";
}

class Inspector {
 public:
  static constexpr double kStaleS = 1.5;  // how old another rank's record may be: a tick and a half

  Inspector(std::shared_ptr<Tracker> tracker, c10::intrusive_ptr<c10d::Store> store, int rank, int size,
            const CheckOptions& opts)
      : tracker_(std::move(tracker)),
        store_(std::move(store)),
        rank_(rank),
        size_(size),
        prefix_(opts.store_prefix),
        warn_s_(opts.stall_warn_s),
        poll_s_(std::max(1.0, opts.stall_warn_s / 2)),
        log_(opts.log) {}

  // The thread body: one tick a second until stop().
  void run() {
    std::unique_lock<std::mutex> lock(m_);
    while (!stop_) {
      lock.unlock();
      tick();
      lock.lock();
      cv_.wait_for(lock, std::chrono::seconds(1), [&] { return stop_; });
    }
    finished_ = true;
    cv_.notify_all();
  }
  // Asks the thread to stop; true when it did within `grace`.
  bool stop(std::chrono::milliseconds grace) {
    std::unique_lock<std::mutex> lock(m_);
    stop_ = true;
    cv_.notify_all();
    return cv_.wait_for(lock, grace, [&] { return finished_; });
  }

 private:
  std::string key(int r) const { return prefix_ + "rank" + std::to_string(r); }

  void tick() {
    try {
      auto version = tracker_->version();
      if (!published_ || version != last_version_) {
        store_->set(key(rank_), as_bytes(serialize(to_record(tracker_->snapshot()))));
        published_ = true;
        last_version_ = version;
      }
      if (rank_ == 0) inspect();
      store_failed_ = false;
    } catch (const std::exception& e) {
      if (!store_failed_) say("stall inspector on rank " + std::to_string(rank_) + ": store error: " + e.what());
      store_failed_ = true;
    }
  }

  // Rank 0: its own oldest incomplete collective every tick; the other ranks'
  // records every poll_s_, so a stall rank 0 is not part of is seen too.
  void inspect() {
    Snapshot own = tracker_->snapshot();
    auto now = Clock::now();
    if (own.completed < own.issued && own.completed + 1 > warned_ && seconds(now - own.oldest_t) > warn_s_) {
      report(own.completed + 1, own.oldest_name, seconds(now - own.oldest_t), 0, read_records(own));
      return;
    }
    if (now < next_poll_) return;
    next_poll_ = now + std::chrono::milliseconds(static_cast<int64_t>(poll_s_ * 1000));
    auto recs = read_records(own);
    int64_t now_ms = wall_ms_now();
    int worst = -1;  // the rank with the lowest stalled collective
    for (int r = 1; r < size_; ++r) {
      // A record is republished on the rank's next tick after a change, so it
      // may be a tick old: a collective that completed since still shows as
      // waiting. Waiting past stall_warn_s + kStaleS cannot be such a one.
      const Record& rec = recs[r];
      bool stalled = rec.present && rec.completed < rec.issued && rec.completed + 1 > warned_ &&
                     (now_ms - rec.oldest_ms) / 1000.0 > warn_s_ + kStaleS;
      if (stalled && (worst < 0 || rec.completed < recs[worst].completed)) worst = r;
    }
    if (worst < 0) return;
    const Record& w = recs[worst];
    report(w.completed + 1, w.oldest_name, (now_ms - w.oldest_ms) / 1000.0, worst, recs);
  }

  std::vector<Record> read_records(const Snapshot& own) {
    std::vector<Record> recs(size_);
    recs[0] = to_record(own);
    for (int r = 1; r < size_; ++r) {
      // check() first: get() of a missing key would block until the store's timeout.
      if (store_->check({key(r)})) recs[r] = parse(store_->get(key(r)));
    }
    return recs;
  }

  void report(uint64_t seq, const std::string& name, double waited_s, int on_rank, const std::vector<Record>& recs) {
    warned_ = seq;
    say(stall_message(seq, name, waited_s, on_rank, recs));
  }

  // The caller's log must not end the watchdog thread (nor the process).
  void say(const std::string& line) {
    try {
      log_(line);
    } catch (...) {
    }
  }

  static std::vector<uint8_t> as_bytes(const std::string& s) { return {s.begin(), s.end()}; }

  std::shared_ptr<Tracker> tracker_;
  c10::intrusive_ptr<c10d::Store> store_;
  int rank_, size_;
  std::string prefix_;
  double warn_s_, poll_s_;
  std::function<void(const std::string&)> log_;

  // The watchdog thread's own state.
  bool published_ = false, store_failed_ = false;
  std::pair<uint64_t, uint64_t> last_version_;
  uint64_t warned_ = 0;  // the newest collective reported stalled
  Clock::time_point next_poll_{};

  std::mutex m_;
  std::condition_variable cv_;
  bool stop_ = false, finished_ = false;
};

// ---------------------------------------------------------------------------
class CheckedCommunicator : public Communicator {
 public:
  CheckedCommunicator(CommunicatorPtr inner, c10::intrusive_ptr<c10d::Store> store, CheckOptions opts)
      : inner_(std::move(inner)), fingerprints_(opts.fingerprints && inner_->size() > 1) {
    timeout_ = inner_->timeout();
    if (opts.stall_warn_s > 0) {
      inspector_ = std::make_shared<Inspector>(tracker_, std::move(store), inner_->rank(), inner_->size(), opts);
      // The thread owns the inspector too, so it may outlive us (see the destructor).
      watchdog_ = std::thread([insp = inspector_] { insp->run(); });
    }
  }
  ~CheckedCommunicator() override {
    if (!watchdog_.joinable()) return;
    // A tick is a few store calls; one stuck behind another thread's blocking
    // get on the same store client must not hold up shutdown.
    if (inspector_->stop(std::chrono::milliseconds(1200))) {
      watchdog_.join();
    } else {
      watchdog_.detach();
    }
  }

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend(); }

  RequestPtr all_reduce_async(at::Tensor& t, ReduceOp op) override {
    uint64_t seq = begin(make_op(kAllReduce, &t, -1, static_cast<int64_t>(op)));
    return issue_async(seq, [&] { return inner_->all_reduce_async(t, op); });
  }
  RequestPtr broadcast_async(at::Tensor& t, int root) override {
    uint64_t seq = begin(make_op(kBroadcast, &t, root, -1));
    return issue_async(seq, [&] { return inner_->broadcast_async(t, root); });
  }
  RequestPtr reduce_async(at::Tensor& t, int root, ReduceOp op) override {
    uint64_t seq = begin(make_op(kReduce, &t, root, static_cast<int64_t>(op)));
    return issue_async(seq, [&] { return inner_->reduce_async(t, root, op); });
  }
  RequestPtr all_gather_async(at::Tensor& out, const at::Tensor& in) override {
    uint64_t seq = begin(make_op(kAllGather, &in, -1, -1));
    return issue_async(seq, [&] { return inner_->all_gather_async(out, in); });
  }
  void all_reduce(at::Tensor& t, ReduceOp op) override {
    uint64_t seq = begin(make_op(kAllReduce, &t, -1, static_cast<int64_t>(op)));
    run_blocking(seq, [&] { inner_->all_reduce(t, op); });
  }
  void broadcast(at::Tensor& t, int root) override {
    uint64_t seq = begin(make_op(kBroadcast, &t, root, -1));
    run_blocking(seq, [&] { inner_->broadcast(t, root); });
  }
  void reduce(at::Tensor& t, int root, ReduceOp op) override {
    uint64_t seq = begin(make_op(kReduce, &t, root, static_cast<int64_t>(op)));
    run_blocking(seq, [&] { inner_->reduce(t, root, op); });
  }
  void all_gather(at::Tensor& out, const at::Tensor& in) override {
    uint64_t seq = begin(make_op(kAllGather, &in, -1, -1));
    run_blocking(seq, [&] { inner_->all_gather(out, in); });
  }
  void barrier() override {
    uint64_t seq = begin(make_op(kBarrier, nullptr, -1, -1));
    run_blocking(seq, [&] { inner_->barrier(); });
  }

  RequestPtr send_async(at::Tensor& t, int dst, int tag) override { return inner_->send_async(t, dst, tag); }
  RequestPtr recv_async(at::Tensor& t, int src, int tag) override { return inner_->recv_async(t, src, tag); }
  RequestPtr recv_any_async(at::Tensor& t, int tag) override { return inner_->recv_any_async(t, tag); }

  // Unchecked: the sub-group is the inner backend's.
  CommunicatorPtr sub_group(const std::vector<int>& ranks, const std::string& name) override {
    return inner_->sub_group(ranks, name);
  }

 private:
  // Numbers the collective (it counts as waiting from here, so a rank stuck
  // in the fingerprint exchange shows as stalled in it) and checks it.
  uint64_t begin(const Op& op) {
    uint64_t seq = tracker_->issue(op);
    if (fingerprints_) {
      try {
        verify(seq, op);
      } catch (...) {
        tracker_->complete(seq);
        throw;
      }
    }
    return seq;
  }

  void verify(uint64_t seq, const Op& op) {
    auto mine = at::zeros({kRow}, at::kLong);
    int64_t* row = mine.data_ptr<int64_t>();
    row[kColSeq] = static_cast<int64_t>(seq);
    row[kColKind] = op.kind;
    row[kColDtype] = op.dtype;
    row[kColNumel] = op.numel;
    row[kColRoot] = op.root;
    row[kColReduce] = op.reduce;
    if (op.label) {
      row[kLabelLen] = static_cast<int64_t>(op.label->size());
      std::memcpy(row + kLabelStart, op.label->data(), std::min(op.label->size(), kLabelBytes));
    }
    auto all = at::empty({size(), kRow}, at::kLong);
    inner_->all_gather(all, mine);
    const int64_t* rows = all.data_ptr<int64_t>();
    for (int r = 1; r < size(); ++r) {
      if (!std::equal(rows, rows + kCompared, rows + r * kRow)) TANDEM_FAIL(mismatch_message(rows, size()));
    }
  }

  template <class F>
  RequestPtr issue_async(uint64_t seq, F&& start) {
    RequestPtr r;
    try {
      r = start();
    } catch (...) {
      tracker_->complete(seq);
      throw;
    }
    return std::make_shared<CheckedRequest>(std::move(r), tracker_, seq);
  }

  template <class F>
  void run_blocking(uint64_t seq, F&& run) {
    struct Done {
      Tracker& t;
      uint64_t seq;
      ~Done() { t.complete(seq); }
    } done{*tracker_, seq};
    run();
  }

  CommunicatorPtr inner_;
  bool fingerprints_;
  std::shared_ptr<Tracker> tracker_ = std::make_shared<Tracker>();
  std::shared_ptr<Inspector> inspector_;
  std::thread watchdog_;
};

}  // namespace

CommunicatorPtr make_checked(CommunicatorPtr inner, c10::intrusive_ptr<c10d::Store> store, CheckOptions opts) {
  TANDEM_CHECK(inner, "make_checked: no communicator to wrap");
  TANDEM_CHECK(opts.stall_warn_s <= 0 || store, "make_checked: the stall inspector (stall_warn_s = ",
               opts.stall_warn_s, ") needs the job's store; pass it, or set stall_warn_s to 0");
  if (!opts.log) {
    opts.log = [](const std::string& line) { std::cerr << ("[tandem] " + line + "\n") << std::flush; };
  }
  return std::make_shared<CheckedCommunicator>(std::move(inner), std::move(store), std::move(opts));
}

OpLabel::OpLabel(std::string name) : OpLabel(std::make_shared<const std::string>(std::move(name))) {}

OpLabel::OpLabel(std::shared_ptr<const std::string> name) : name_(std::move(name)), prev_(tls_label) {
  tls_label = this;
}

OpLabel::~OpLabel() { tls_label = prev_; }

std::shared_ptr<const std::string> OpLabel::current() { return tls_label ? tls_label->name_ : nullptr; }

}  // namespace tandem::comm
