#pragma once
// Checked communicator: a Communicator decorator for `--check-collectives`
// (also TANDEM_DEBUG=detail) and the stall inspector (`--stall-warn S`).
//
// Contract:
//  - make_checked(inner, store, opts) returns a communicator with inner's rank,
//    size, backend() and timeout; results are inner's. Timeouts are unchanged:
//    a stall is reported, then inner's timeout ends the job as before.
//  - Every collective (all_reduce, broadcast, reduce, all_gather, barrier; async
//    and blocking) takes the next sequence number of this rank, from #1.
//    Point-to-point calls pass through unnumbered and unchecked.
//  - fingerprints: before collective #N is forwarded, the ranks all-gather a
//    small int64 record {N, kind, dtype, numel, root, reduce op} (plus the first
//    bytes of the OpLabel, shown but never compared) through `inner`. If the
//    rows differ, every rank throws tandem::Error naming each rank's call; the
//    collective is not issued and inner stays usable. The exchange is
//    synchronous at issue time, so asynchronous collectives are still issued in
//    program order, but each costs one extra blocking round trip.
//  - stall inspector (stall_warn_s > 0): a watchdog thread per rank (1 s tick)
//    publishes "issued #, completed #, newest name, wall times" to the store key
//    <store_prefix>rank<R> when they change (one store write per second at
//    most, never on the caller's thread). An asynchronous collective completes
//    when wait() on its Request returns (or the Request is destroyed); a
//    blocking one when it returns. Rank 0's watchdog logs once per stalled
//    collective which ranks have not reached it, when its own oldest incomplete
//    collective has waited longer than stall_warn_s, or when another rank's
//    has waited longer than stall_warn_s + 1.5 s by its record (read every
//    max(1 s, stall_warn_s / 2); a record may be a tick old). Other ranks
//    never log.
//    Per-collective cost with fingerprints off: a clock read and a mutex
//    section at issue, a mutex section at completion (~200 ns in all).
//  - The store must be shared by all ranks and safe to use from a second thread
//    (c10d's HashStore, FileStore and TCPStore serialise each client's calls
//    with a mutex; TCPStore's get() holds it while waiting for its key, so the
//    watchdog's calls queue behind another thread's blocking get). Use a
//    distinct store_prefix for each checked communicator over one store.
//  - The destructor stops the watchdog and waits for it at most ~1 s (a store
//    call stuck behind another thread's blocking get is left to finish alone).
//  - Threads: as Communicator (one issuing thread; Requests waited anywhere).
#include <functional>
#include <memory>
#include <string>

#include "tandem/comm/communicator.h"

namespace tandem::comm {

struct CheckOptions {
  bool fingerprints = false;  // compare a fingerprint of every collective across ranks before running it
  double stall_warn_s = 60;   // <= 0: no stall inspector
  std::string store_prefix = "tandem/check/";
  // Called on the watchdog thread. Default: a line to stderr prefixed "[tandem] ".
  std::function<void(const std::string&)> log;
};

// Wraps `inner`. `store` may be null only when the stall inspector is off.
CommunicatorPtr make_checked(CommunicatorPtr inner, c10::intrusive_ptr<c10d::Store> store, CheckOptions opts);

// Names the collectives this thread issues while it lives:
//   { OpLabel l("bucket 2 all-reduce"); comm->all_reduce_async(t); }
// The label shows in mismatch errors and stall reports. Scoped: labels nest,
// the innermost one names the collective, and each must be destroyed in
// reverse order of construction (use it as a local variable). Cost: one
// allocation at construction; issuing a collective copies a shared pointer.
class OpLabel {
 public:
  explicit OpLabel(std::string name);
  // A label built once and reused (no allocation per collective).
  explicit OpLabel(std::shared_ptr<const std::string> name);
  ~OpLabel();
  OpLabel(const OpLabel&) = delete;
  OpLabel& operator=(const OpLabel&) = delete;

  // The innermost label of this thread; null when none is alive.
  static std::shared_ptr<const std::string> current();

 private:
  std::shared_ptr<const std::string> name_;
  const OpLabel* prev_;
};

}  // namespace tandem::comm
