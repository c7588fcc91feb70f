#pragma once
// The shared-memory segment of one host's ranks (internal to comm/shm).
//
// Layout, all in one POSIX shm object created by local rank 0 with mode 0600
// and unlinked by the last rank to map it (so nothing stays in /dev/shm):
//   Header | RankState[L] | collective slots: L x 2 x chunk | channels: L x L
// Each rank owns its RankState (it alone writes `phase`) and its collective
// slot (it alone writes there; every rank reads it). Channel (s,d) is a
// single-producer single-consumer byte ring from rank s to rank d.
//
// Waiting: spin briefly on the condition, then sleep on the rank's doorbell
// (a futex word); whoever changes something a sleeping rank waits for bumps
// its doorbell and wakes it. Sleeps are bounded (a few ms) so that a waiter
// re-checks its peers' liveness (the pid, read from /proc) and its deadline.
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include <torch/csrc/distributed/c10d/Store.hpp>

namespace tandem::comm::shm {

constexpr std::size_t kLine = 128;  // two cache lines: no false sharing with the prefetcher's pair

struct alignas(kLine) RankState {
  std::atomic<std::uint64_t> phase;     // collective progress (see shm_communicator.cpp)
  std::atomic<std::uint32_t> doorbell;  // futex word
  std::atomic<std::uint32_t> sleepers;  // threads of this rank asleep (or going to sleep) on doorbell
  std::atomic<std::int32_t> pid;        // 0 until the rank mapped the segment
  std::atomic<std::uint32_t> closed;    // 1 once the rank destroyed its communicator
  std::uint64_t pid_ns;                 // inode of the rank's pid namespace: liveness only within one
};

struct alignas(kLine) ChannelState {
  std::atomic<std::uint64_t> head;  // bytes written, ever (producer)
  char pad[kLine - sizeof(std::atomic<std::uint64_t>)];
  std::atomic<std::uint64_t> tail;  // bytes consumed, ever (consumer)
};

struct Geometry {
  int ranks = 1;
  std::size_t chunk_bytes = 0;    // one collective buffer; each rank has two
  std::size_t channel_bytes = 0;  // ring size of one p2p channel
};

// What a rank sees when it waits on a peer.
enum class PeerStatus { kAlive, kStopped, kGone, kClosed };

class Segment {
 public:
  // Collective over the `ranks` local ranks: rank 0 creates the object (name
  // from `job_id`) and publishes its name in `store`; the others open it.
  Segment(c10::intrusive_ptr<c10d::Store> store, int rank, const Geometry& g, const std::string& job_id,
          std::chrono::milliseconds timeout);
  ~Segment();
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  int rank() const { return rank_; }
  int ranks() const { return geo_.ranks; }
  const Geometry& geometry() const { return geo_; }
  const std::string& name() const { return name_; }

  RankState& state(int r) const { return states_[r]; }
  // Collective buffer `which` (0 or 1) of rank r.
  std::uint8_t* slot(int r, int which) const { return slots_ + (2 * static_cast<std::size_t>(r) + which) * geo_.chunk_bytes; }
  ChannelState& channel(int src, int dst) const;
  std::uint8_t* channel_data(int src, int dst) const;

  // Bumps rank r's doorbell and wakes its sleepers, if any.
  void ring(int r) const;
  void ring_all() const;
  // Waits on this rank's doorbell until `ready()` holds. Every few ms asleep
  // `check()` runs: it throws to abort the wait. Spins for `spin_ns` before
  // the first sleep. A template so that the spin, the path of every short
  // wait, allocates nothing; only a wait that goes to sleep wraps its
  // callables in std::function.
  template <class Ready, class Check>
  void wait(const Ready& ready, const Check& check, std::int64_t spin_ns) const {
    if (ready()) return;
    if (spin_ns > 0) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(spin_ns);
      for (unsigned i = 1;; ++i) {
        cpu_relax();
        if (ready()) return;
        if ((i & 63) == 0 && std::chrono::steady_clock::now() >= until) break;
      }
    }
    sleep_until(ready, check);
  }

  PeerStatus status(int r) const;
  // Marks this rank closed and wakes everyone (they may wait on it).
  void close();

 private:
  static void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
  void sleep_until(const std::function<bool()>& ready, const std::function<void()>& check) const;

  int rank_;
  Geometry geo_;
  std::string name_;
  void* base_ = nullptr;
  std::size_t bytes_ = 0;
  bool unlinked_ = false;
  RankState* states_ = nullptr;
  std::uint8_t* slots_ = nullptr;
  std::uint8_t* channels_ = nullptr;
};

// "exited or was killed", "is stopped (SIGSTOP ...)", ...: follows "rank 3 (pid 1234) ".
const char* describe(PeerStatus s);

}  // namespace tandem::comm::shm
