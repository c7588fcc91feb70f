#pragma once
// Point-to-point over the segment's channels (internal to comm/shm): a
// progress engine on its own thread, started by the first operation, so that
// sends and receives in both directions and in any tag order never deadlock.
// Each message is a 16-byte header (tag, bytes) and its payload padded to 16
// bytes, streamed through the single-producer single-consumer ring of its
// (source, destination) pair. A message that arrives before its receive is
// posted is held in private memory (unexpected) until one matches it, in
// arrival order per source (MPI's non-overtaking rule). While nothing is
// pending the engine sleeps on a condition variable; while operations are
// pending (a queued send included) it sleeps on the rank's doorbell and
// checks its peers' liveness.
// A send is eager: the posting thread writes it into the ring itself when
// nothing to that peer is queued before it and all of it fits, so that a
// small hand-off costs no wake-up of the sender's engine (a pipeline stage
// posts its output and computes on at once); larger ones stream from the engine.
#include <atomic>
#include <condition_variable>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "op_state.h"
#include "segment.h"

namespace tandem::comm::shm {

class P2PEngine {
 public:
  // labels: rank numbers for messages; spin_ns: as the communicator's.
  P2PEngine(Segment& seg, std::vector<int> labels, std::int64_t spin_ns);
  ~P2PEngine();
  P2PEngine(const P2PEngine&) = delete;
  P2PEngine& operator=(const P2PEngine&) = delete;
  // peer -1: receive from any rank. `what` names the operation in errors.
  RequestPtr post(bool send, int peer, int tag, at::Tensor& t, std::string what);

 private:
  struct P2POp {
    bool send;
    int peer;  // -1: any source
    int tag;
    std::uint8_t* data;
    std::size_t bytes;
    std::size_t done = 0;
    bool header_sent = false;
    at::Tensor keep;
    OpStatePtr st;
  };

  // A message on a channel: a 16-byte header, then the payload padded to 16.
  struct MsgHeader {
    std::int64_t tag;
    std::uint64_t bytes;
  };
  static constexpr std::size_t kAlign = 16;
  static std::size_t padded(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

  struct Incoming {
    bool active = false;
    int tag = 0;
    std::size_t bytes = 0, done = 0;
    std::shared_ptr<P2POp> target;             // matched receive, or
    std::shared_ptr<std::vector<std::uint8_t>> unexpected;  // held until a receive is posted
  };

  struct Unexpected {
    int src, tag;
    std::shared_ptr<std::vector<std::uint8_t>> data;
    bool complete;
  };

  void loop();
  void fail(const std::shared_ptr<P2POp>& op, const std::string& why);
  std::size_t room(int dst) const;
  bool pump_send(int dst);
  bool pump_recv(int src);
  std::shared_ptr<P2POp> match_posted(int src, int tag);
  bool match_unexpected(const std::shared_ptr<P2POp>& op);
  std::uint64_t signature() const;
  bool idle() const;
  void check_peers();
  std::string name(int r) const;

  Segment& seg_;
  const int rank_, size_;
  const std::size_t cap_;  // bytes of one channel's ring
  std::vector<int> labels_;
  std::int64_t spin_ns_;
  std::atomic<bool> stopping_{false};

  // submitted_ and kicks_ under pmu_; sends_ (and the write side of this
  // rank's outgoing channels) under smu_; the rest belongs to the engine thread.
  std::mutex pmu_;
  std::condition_variable pcv_;
  std::deque<std::shared_ptr<P2POp>> submitted_;
  std::uint64_t kicks_ = 0;  // sends queued directly in sends_
  std::atomic<std::uint64_t> posted_count_{0};
  std::thread thread_;
  mutable std::mutex smu_;
  std::vector<std::deque<std::shared_ptr<P2POp>>> sends_;
  std::list<std::shared_ptr<P2POp>> recvs_;
  std::vector<Incoming> incoming_;
  std::list<Unexpected> unexpected_;
  std::vector<char> dead_;  // 1: the peer left in the middle of a message to us
};

}  // namespace tandem::comm::shm
