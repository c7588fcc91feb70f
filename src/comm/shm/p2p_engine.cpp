#include "p2p_engine.h"

#include <algorithm>
#include <cstring>

namespace tandem::comm::shm {

P2PEngine::P2PEngine(Segment& seg, std::vector<int> labels, std::int64_t spin_ns)
    : seg_(seg), rank_(seg.rank()), size_(seg.ranks()), cap_(seg.geometry().channel_bytes), labels_(std::move(labels)),
      spin_ns_(spin_ns) {
  incoming_.resize(size_);
  sends_.resize(size_);
  dead_.assign(size_, 0);
}

P2PEngine::~P2PEngine() {
  {
    std::lock_guard<std::mutex> lock(pmu_);
    stopping_.store(true);
  }
  pcv_.notify_all();
  seg_.ring(rank_);
  if (thread_.joinable()) thread_.join();
}

RequestPtr P2PEngine::post(bool send, int peer, int tag, at::Tensor& t, std::string what) {
  auto op = std::make_shared<P2POp>();
  op->send = send;
  op->peer = peer;
  op->tag = tag;
  op->data = static_cast<std::uint8_t*>(t.data_ptr());
  op->bytes = t.numel() * t.element_size();
  op->keep = t;
  op->st = std::make_shared<OpState>(std::move(what), spin_ns_);
  auto st = op->st;
  if (send) {
    // Eager: written here, whole, when nothing to `peer` is queued before it
    // and the ring has room for all of it; otherwise the engine streams it
    // (a partial write here would leave the rest waiting for the engine anyway).
    std::lock_guard<std::mutex> lock(smu_);
    auto& q = sends_[peer];
    const bool eager = q.empty() && room(peer) >= sizeof(MsgHeader) + padded(op->bytes);
    q.push_back(std::move(op));
    if (eager) pump_send(peer);
    if (q.empty()) return st;  // written whole (else the engine, kicked below, goes on)
  }
  {
    std::lock_guard<std::mutex> lock(pmu_);
    if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
    if (send) ++kicks_;
    else submitted_.push_back(std::move(op));
    posted_count_.fetch_add(1, std::memory_order_release);
  }
  pcv_.notify_one();
  seg_.ring(rank_);
  return st;
}

void P2PEngine::fail(const std::shared_ptr<P2POp>& op, const std::string& why) {
  op->st->complete(std::make_exception_ptr(CommError(op->st->what() + " failed: " + why)));
}

// Free bytes in the ring towards `dst` (smu_ held: this rank is its only writer).
std::size_t P2PEngine::room(int dst) const {
  const auto& ch = seg_.channel(rank_, dst);
  return cap_ - static_cast<std::size_t>(ch.head.load(std::memory_order_relaxed) - ch.tail.load(std::memory_order_acquire));
}

// Writes as much of the head send to `dst` as the ring has room for (smu_ held).
bool P2PEngine::pump_send(int dst) {
  auto& q = sends_[dst];
  bool progress = false;
  while (!q.empty()) {
    auto& op = q.front();
    auto& ch = seg_.channel(rank_, dst);
    std::uint8_t* ring = seg_.channel_data(rank_, dst);
    const std::size_t cap = cap_;
    std::uint64_t head = ch.head.load(std::memory_order_relaxed);
    std::uint64_t tail = ch.tail.load(std::memory_order_acquire);
    std::size_t room = cap - static_cast<std::size_t>(head - tail);
    if (!op->header_sent) {
      if (room < sizeof(MsgHeader)) break;
      MsgHeader h{op->tag, op->bytes};
      std::memcpy(ring + head % cap, &h, sizeof h);
      head += sizeof h;
      room -= sizeof h;
      op->header_sent = true;
      progress = true;
    }
    const std::size_t total = padded(op->bytes);
    while (op->done < total && room > 0) {
      const std::size_t pos = head % cap;
      const std::size_t n = std::min({room, cap - pos, total - op->done});
      const std::size_t real = op->done < op->bytes ? std::min(n, op->bytes - op->done) : 0;
      if (real) std::memcpy(ring + pos, op->data + op->done, real);
      head += n;
      room -= n;
      op->done += n;
      progress = true;
    }
    ch.head.store(head, std::memory_order_release);
    if (progress) seg_.ring(dst);
    if (op->done < total) break;
    op->st->complete();
    q.pop_front();
  }
  return progress;
}

std::shared_ptr<P2PEngine::P2POp> P2PEngine::match_posted(int src, int tag) {
  for (auto it = recvs_.begin(); it != recvs_.end(); ++it) {
    if ((*it)->tag == tag && ((*it)->peer == src || (*it)->peer < 0)) {
      auto op = *it;
      recvs_.erase(it);
      return op;
    }
  }
  return nullptr;
}

// A posted receive takes the oldest complete held message that matches.
bool P2PEngine::match_unexpected(const std::shared_ptr<P2POp>& op) {
  for (auto it = unexpected_.begin(); it != unexpected_.end(); ++it) {
    if (!it->complete || it->tag != op->tag || (op->peer >= 0 && it->src != op->peer)) continue;
    if (it->data->size() != op->bytes) {
      fail(op, "size mismatch: rank " + std::to_string(labels_.at(it->src)) + " sent " +
                   std::to_string(it->data->size()) + " bytes, the receive holds " + std::to_string(op->bytes));
    } else {
      if (op->bytes) std::memcpy(op->data, it->data->data(), op->bytes);
      op->st->complete(nullptr, it->src);
    }
    unexpected_.erase(it);
    return true;
  }
  return false;
}

bool P2PEngine::pump_recv(int src) {
  auto& ch = seg_.channel(src, rank_);
  const std::uint8_t* ring = seg_.channel_data(src, rank_);
  const std::size_t cap = cap_;
  auto& in = incoming_[src];
  bool progress = false;
  std::uint64_t tail = ch.tail.load(std::memory_order_relaxed);
  std::uint64_t head = ch.head.load(std::memory_order_acquire);
  for (;;) {
    if (!in.active) {
      if (head - tail < sizeof(MsgHeader)) break;
      MsgHeader h;
      std::memcpy(&h, ring + tail % cap, sizeof h);
      tail += sizeof h;
      in = Incoming{};
      in.active = true;
      in.tag = static_cast<int>(h.tag);
      in.bytes = h.bytes;
      in.target = match_posted(src, in.tag);
      if (in.target && in.target->bytes != in.bytes) {
        fail(in.target, "size mismatch: rank " + std::to_string(labels_.at(src)) + " sent " + std::to_string(in.bytes) +
                            " bytes, the receive holds " + std::to_string(in.target->bytes));
        in.target = nullptr;
      }
      if (!in.target) {
        in.unexpected = std::make_shared<std::vector<std::uint8_t>>(in.bytes);
        unexpected_.push_back({src, in.tag, in.unexpected, false});
      }
      progress = true;
    }
    const std::size_t total = padded(in.bytes);
    while (in.done < total && head > tail) {
      const std::size_t pos = tail % cap;
      const std::size_t n = std::min({static_cast<std::size_t>(head - tail), cap - pos, total - in.done});
      const std::size_t real = in.done < in.bytes ? std::min(n, in.bytes - in.done) : 0;
      std::uint8_t* dst = in.target ? in.target->data : in.unexpected->data();
      if (real) std::memcpy(dst + in.done, ring + pos, real);
      tail += n;
      in.done += n;
      progress = true;
    }
    if (in.done < total) break;
    in.active = false;
    if (in.target) {
      in.target->st->complete(nullptr, src);
    } else {
      for (auto& u : unexpected_)
        if (u.data == in.unexpected) u.complete = true;
      // A receive posted while this message was arriving takes it now.
      for (auto it = recvs_.begin(); it != recvs_.end(); ++it)
        if (match_unexpected(*it)) {
          recvs_.erase(it);
          break;
        }
    }
  }
  if (progress) {
    ch.tail.store(tail, std::memory_order_release);
    seg_.ring(src);
  }
  return progress;
}

// Changes whenever something the engine waits on may have moved.
std::uint64_t P2PEngine::signature() const {
  std::uint64_t s = posted_count_.load(std::memory_order_acquire);
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    s += seg_.channel(r, rank_).head.load(std::memory_order_acquire) * 3;
    s += seg_.channel(rank_, r).tail.load(std::memory_order_acquire) * 7;
  }
  return s;
}

void P2PEngine::loop() {
  std::uint64_t kicks_seen = 0;
  for (;;) {
    const std::uint64_t sig = signature();
    std::deque<std::shared_ptr<P2POp>> fresh;
    {
      std::lock_guard<std::mutex> lock(pmu_);
      fresh.swap(submitted_);
      kicks_seen = kicks_;
    }
    for (auto& op : fresh)
      if (!match_unexpected(op)) recvs_.push_back(op);
    bool progress = !fresh.empty();
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      {
        std::lock_guard<std::mutex> lock(smu_);
        progress |= pump_send(r);
      }
      if (!dead_[r]) progress |= pump_recv(r);
    }
    if (stopping_.load()) break;
    if (progress) continue;
    if (idle()) {
      // Nothing pending: sleep until the owner posts a receive or queues a send.
      std::unique_lock<std::mutex> lock(pmu_);
      pcv_.wait(lock, [&] { return stopping_.load() || !submitted_.empty() || kicks_ != kicks_seen; });
      continue;
    }
    try {
      seg_.wait([&] { return stopping_.load() || signature() != sig; }, [&] { check_peers(); },
                spin_ns_);
    } catch (const CommError&) {
    }
  }
  auto gone = [&](const std::shared_ptr<P2POp>& op) { fail(op, "communicator destroyed"); };
  {
    std::lock_guard<std::mutex> lock(smu_);
    for (auto& q : sends_) {
      for (auto& op : q) gone(op);
      q.clear();
    }
  }
  for (auto& op : recvs_) gone(op);
  std::lock_guard<std::mutex> lock(pmu_);
  for (auto& op : submitted_) gone(op);
}

bool P2PEngine::idle() const {
  if (!recvs_.empty()) return false;
  std::lock_guard<std::mutex> lock(smu_);
  for (int r = 0; r < size_; ++r)
    if (!sends_[r].empty() || incoming_[r].active) return false;
  return true;
}

// Fails the operations that wait on a peer that is gone. A peer that
// exited cleanly (closed) fails only what it alone could complete; a
// receive from any rank fails when a peer was killed, or when every peer left.
void P2PEngine::check_peers() {
  int left = 0;
  bool killed = false;
  std::string why_any;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    auto s = seg_.status(r);
    if (s != PeerStatus::kGone && s != PeerStatus::kClosed) continue;
    ++left;
    killed |= s == PeerStatus::kGone;
    if (!dead_[r]) pump_recv(r);  // whatever it wrote before it went is in the ring: take it first
    const std::string why = "rank " + std::to_string(labels_.at(r)) + " (pid " + std::to_string(seg_.state(r).pid.load()) +
                            ") " + describe(s);
    if (why_any.empty() || s == PeerStatus::kGone) why_any = why;
    {
      std::lock_guard<std::mutex> lock(smu_);
      auto& q = sends_[r];
      for (auto& op : q) fail(op, why);
      q.clear();
    }
    for (auto it = recvs_.begin(); it != recvs_.end();) {
      if ((*it)->peer == r) {
        fail(*it, why);
        it = recvs_.erase(it);
      } else {
        ++it;
      }
    }
    if (incoming_[r].active) {
      // Its message stops half-way: the rest of this channel means nothing.
      if (incoming_[r].target) fail(incoming_[r].target, why);
      incoming_[r] = Incoming{};
      dead_[r] = 1;
    }
  }
  if (!killed && left < size_ - 1) return;
  for (auto it = recvs_.begin(); it != recvs_.end();) {
    if ((*it)->peer < 0) {
      fail(*it, why_any);
      it = recvs_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace tandem::comm::shm
