#include "segment.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include "tandem/comm/communicator.h"
#include "tandem/util/check.h"
#include "tandem/util/clock.h"

namespace tandem::comm::shm {
namespace {

constexpr std::uint64_t kMagic = 0x74616e64656d5348ull;  // "tandemSH"
constexpr std::uint32_t kVersion = 1;
constexpr std::size_t kHeaderBytes = 4096;
constexpr const char* kNameKey = "tandem/shm/name";

struct Header {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t ranks;
  std::uint64_t chunk_bytes;
  std::uint64_t channel_bytes;
  std::uint64_t total_bytes;
  std::atomic<std::uint32_t> mapped;
};
static_assert(sizeof(Header) <= kHeaderBytes);

std::size_t round_up(std::size_t x, std::size_t a) { return (x + a - 1) / a * a; }

std::size_t channel_stride(const Geometry& g) { return sizeof(ChannelState) + round_up(g.channel_bytes, kLine); }

std::size_t total_bytes(const Geometry& g) {
  const std::size_t L = static_cast<std::size_t>(g.ranks);
  return kHeaderBytes + round_up(L * sizeof(RankState), 4096) + L * 2 * g.chunk_bytes +
         L * L * channel_stride(g);
}

std::uint64_t self_pid_ns() {
  struct stat st {};
  return ::stat("/proc/self/ns/pid", &st) == 0 ? static_cast<std::uint64_t>(st.st_ino) : 0;
}

// The state letter of /proc/<pid>/stat ('R', 'S', 'T', 'Z', ...), 0 when
// there is no such process, '?' when it cannot be told (then it counts as
// alive: only the timeout decides).
char proc_state(int pid) {
  const std::string path = "/proc/" + std::to_string(pid) + "/stat";
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno == ENOENT || errno == ESRCH ? 0 : '?';
  char buf[512];
  ssize_t n = ::read(fd, buf, sizeof buf - 1);
  int e = errno;
  ::close(fd);
  if (n <= 0) return n < 0 && e == ESRCH ? 0 : '?';
  std::string line(buf, static_cast<std::size_t>(n));
  auto p = line.rfind(')');
  if (p == std::string::npos || p + 2 >= line.size()) return '?';
  return line[p + 2];
}

std::string random_hex() {
  std::random_device rd;
  std::ostringstream os;
  os << std::hex << rd() << rd();
  return os.str();
}

long futex(std::atomic<std::uint32_t>* addr, int op, std::uint32_t val, const timespec* ts) {
  // Shared (not FUTEX_PRIVATE): the word lives in memory mapped by several processes.
  return ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(addr), op, val, ts, nullptr, 0);
}

}  // namespace

Segment::Segment(c10::intrusive_ptr<c10d::Store> store, int rank, const Geometry& g, const std::string& job_id,
                 std::chrono::milliseconds timeout)
    : rank_(rank), geo_(g) {
  TANDEM_ASSERT(g.ranks >= 1 && rank >= 0 && rank < g.ranks);
  bytes_ = total_bytes(g);
  int fd = -1;
  if (rank == 0) {
    name_ = "/tandem-" + job_id + "-" + random_hex();
    fd = ::shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    TANDEM_CHECK(fd >= 0, "shared-memory communicator: cannot create ", name_, " in /dev/shm: ", std::strerror(errno),
                 " (is /dev/shm mounted and writable? use --comm gloo otherwise)");
    // posix_fallocate: on a tmpfs that is too small, ftruncate succeeds and
    // the first write into the missing pages kills the rank with SIGBUS.
    int e = ::ftruncate(fd, static_cast<off_t>(bytes_)) != 0 ? errno
                                                                : ::posix_fallocate(fd, 0, static_cast<off_t>(bytes_));
    if (e != 0) {
      ::close(fd);
      ::shm_unlink(name_.c_str());
      TANDEM_FAIL("shared-memory communicator: cannot size ", name_, " to ", bytes_, " bytes: ", std::strerror(e),
                  " (/dev/shm too small? see `df /dev/shm`, or use --comm gloo)");
    }
  } else {
    store->setTimeout(timeout);
    auto v = store->get(kNameKey);
    name_.assign(v.begin(), v.end());
    fd = ::shm_open(name_.c_str(), O_RDWR, 0600);
    TANDEM_CHECK(fd >= 0, "shared-memory communicator: rank ", rank, " cannot open ", name_, ": ",
                 std::strerror(errno), " (local rank 0 gone, or the ranks are not on one host: set TANDEM_HOST_ID "
                 "per host, or use --comm gloo)");
    struct stat st {};
    if (::fstat(fd, &st) != 0 || static_cast<std::size_t>(st.st_size) != bytes_) {
      ::close(fd);
      TANDEM_FAIL("shared-memory communicator: ", name_, " has ", st.st_size, " bytes, expected ", bytes_,
                  " (ranks disagree on the segment geometry)");
    }
  }
  // MAP_POPULATE: fault every page in now, not in the middle of a collective.
  base_ = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  int map_errno = errno;
  ::close(fd);
  if (base_ == MAP_FAILED) {
    base_ = nullptr;
    if (rank == 0) ::shm_unlink(name_.c_str());
    TANDEM_FAIL("shared-memory communicator: cannot map ", name_, ": ", std::strerror(map_errno));
  }
  try {
    auto* h = static_cast<Header*>(base_);
    auto* p = static_cast<std::uint8_t*>(base_) + kHeaderBytes;
    states_ = reinterpret_cast<RankState*>(p);
    p += round_up(static_cast<std::size_t>(g.ranks) * sizeof(RankState), 4096);
    slots_ = p;
    p += static_cast<std::size_t>(g.ranks) * 2 * g.chunk_bytes;
    channels_ = p;
    if (rank == 0) {
      // Fresh pages are zero: every counter starts at 0.
      h->magic = kMagic;
      h->version = kVersion;
      h->ranks = static_cast<std::uint32_t>(g.ranks);
      h->chunk_bytes = g.chunk_bytes;
      h->channel_bytes = g.channel_bytes;
      h->total_bytes = bytes_;
    }
    auto& me = states_[rank];
    me.pid_ns = self_pid_ns();
    me.pid.store(static_cast<std::int32_t>(::getpid()), std::memory_order_release);
    if (rank == 0) {
      // The header is complete before anyone can learn the name.
      std::string n = name_;
      store->set(kNameKey, std::vector<std::uint8_t>(n.begin(), n.end()));
    } else {
      TANDEM_CHECK(h->magic == kMagic && h->version == kVersion && h->ranks == static_cast<std::uint32_t>(g.ranks) &&
                       h->chunk_bytes == g.chunk_bytes && h->channel_bytes == g.channel_bytes,
                   "shared-memory communicator: ", name_, " was made for another geometry (", h->ranks,
                   " ranks) than this rank's (", g.ranks, " ranks)");
    }
    // The last rank to map the object removes its name: from here on nothing of
    // the job is left in /dev/shm, whatever happens to the ranks.
    if (h->mapped.fetch_add(1) + 1 == static_cast<std::uint32_t>(g.ranks)) {
      ::shm_unlink(name_.c_str());
      unlinked_ = true;
    }
    ring_all();
    // Construction ends when every rank has mapped the object, so that a rank
    // leaving early (a first collective of zero bytes moves nothing) cannot
    // take the name from one still opening it.
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    wait([&] { return h->mapped.load() >= static_cast<std::uint32_t>(g.ranks); },
         [&] {
           if (std::chrono::steady_clock::now() < deadline) return;
           std::string missing;
           for (int r = 0; r < g.ranks; ++r)
             if (states_[r].pid.load() == 0) missing += " " + std::to_string(r);
           throw CommError("shared-memory communicator: local ranks" + missing + " did not map " + name_ + " within " +
                           std::to_string(timeout.count()) + " ms (are all local ranks started?)");
         },
         0);
  } catch (...) {
    // No destructor runs for a constructor that throws: leave nothing behind.
    ::munmap(base_, bytes_);
    base_ = nullptr;
    if (!unlinked_) ::shm_unlink(name_.c_str());
    throw;
  }
}

Segment::~Segment() {
  if (!base_) return;
  close();
  // A rank that leaves before everyone mapped (a failed start) removes the name.
  if (!unlinked_) ::shm_unlink(name_.c_str());
  ::munmap(base_, bytes_);
}

ChannelState& Segment::channel(int src, int dst) const {
  return *reinterpret_cast<ChannelState*>(channels_ +
                                          (static_cast<std::size_t>(src) * geo_.ranks + dst) * channel_stride(geo_));
}

std::uint8_t* Segment::channel_data(int src, int dst) const {
  return reinterpret_cast<std::uint8_t*>(&channel(src, dst)) + sizeof(ChannelState);
}

void Segment::ring(int r) const {
  auto& s = states_[r];
  // Pairs with the waiter's sleepers increment before its last check: either
  // it sees our change, or we see it asleep and wake it.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (s.sleepers.load(std::memory_order_relaxed) == 0) return;
  s.doorbell.fetch_add(1, std::memory_order_seq_cst);
  futex(&s.doorbell, FUTEX_WAKE, INT_MAX, nullptr);
}

void Segment::ring_all() const {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  for (int r = 0; r < geo_.ranks; ++r) {
    auto& s = states_[r];
    if (s.sleepers.load(std::memory_order_relaxed) == 0) continue;
    s.doorbell.fetch_add(1, std::memory_order_seq_cst);
    futex(&s.doorbell, FUTEX_WAKE, INT_MAX, nullptr);
  }
}

void Segment::sleep_until(const std::function<bool()>& ready, const std::function<void()>& check) const {
  auto& me = states_[rank_];
  // The first check comes after 5 ms asleep: a peer that is merely late
  // costs no read of /proc.
  auto last_check = std::chrono::steady_clock::now();
  const timespec nap{0, 2'000'000};  // 2 ms: bounds how late a dead peer is noticed
  for (;;) {
    auto now = std::chrono::steady_clock::now();
    if (now - last_check >= std::chrono::milliseconds(5)) {
      check();
      last_check = now;
    }
    std::uint32_t v = me.doorbell.load(std::memory_order_acquire);
    me.sleepers.fetch_add(1, std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);  // the increment before the re-check (Dekker)
    if (ready()) {
      me.sleepers.fetch_sub(1, std::memory_order_relaxed);
      return;
    }
    futex(&me.doorbell, FUTEX_WAIT, v, &nap);
    me.sleepers.fetch_sub(1, std::memory_order_relaxed);
    if (ready()) return;
  }
}

PeerStatus Segment::status(int r) const {
  const auto& s = states_[r];
  if (s.closed.load(std::memory_order_acquire)) return PeerStatus::kClosed;
  int pid = s.pid.load(std::memory_order_acquire);
  if (pid == 0 || pid == ::getpid() || s.pid_ns != states_[rank_].pid_ns) return PeerStatus::kAlive;
  switch (proc_state(pid)) {
    case 0:
    case 'Z':
    case 'X':
    case 'x': return PeerStatus::kGone;
    case 'T':
    case 't': return PeerStatus::kStopped;
    default: return PeerStatus::kAlive;
  }
}

void Segment::close() {
  states_[rank_].closed.store(1, std::memory_order_release);
  ring_all();
}

const char* describe(PeerStatus s) {
  switch (s) {
    case PeerStatus::kGone: return "exited or was killed";
    case PeerStatus::kClosed: return "closed its communicator (it left the job)";
    case PeerStatus::kStopped: return "is stopped (SIGSTOP or a debugger) and did not arrive";
    default: return "is alive but did not arrive";
  }
}

}  // namespace tandem::comm::shm
