// The checkpoint Writer: one writer thread that turns Snapshots into checkpoint
// directories, atomically, and prunes old ones.
//
// Note [Checkpoint atomicity]
// A checkpoint is built in a temporary directory `.ckpt-<step>.tmp-<pid>-<random>`
// next to its final place: each file is written and fsynced, then the manifest
// (sizes + xxh64) is written and fsynced, then the temporary directory itself
// is fsynced so that its entries are durable, and only then is it renamed to
// `ckpt-<step>` and the parent directory fsynced. rename() is atomic, so a
// crash at any point leaves either the whole checkpoint under its final name
// or none; what a killed writer leaves is a temporary, which the next Writer
// on that directory removes. If `ckpt-<step>` already exists (the same step
// written again after a restart) the two directories are swapped with
// renameat2(RENAME_EXCHANGE) where the file system supports it, so the name
// always holds a complete checkpoint; elsewhere the old one is first renamed
// aside. Readers still verify sizes and checksums (a disk can lose data after
// an fsync), and latest_good() falls back to an older checkpoint.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_set>

#include <xxhash.h>

#include "internal.h"
#include "tandem/ckpt/checkpoint.h"
#include "tandem/util/check.h"

namespace tandem::ckpt {

namespace fs = std::filesystem;
using detail::describe_errno;
using detail::Fd;

namespace {

bool is_temporary(const std::string& name) {
  return name.rfind(".ckpt-", 0) == 0 && name.find(".tmp") != std::string::npos;
}

std::string now_iso() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string random_hex() {
  uint64_t r;
  try {
    std::random_device rd;
    r = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  } catch (const std::exception&) {
    r = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }
  return detail::to_hex64(r).substr(8);
}

std::string human_bytes(uint64_t n) {
  char buf[32];
  if (n >= (1u << 20)) std::snprintf(buf, sizeof buf, "%.1f MiB", n / 1048576.0);
  else if (n >= 1024) std::snprintf(buf, sizeof buf, "%.1f KiB", n / 1024.0);
  else std::snprintf(buf, sizeof buf, "%llu bytes", static_cast<unsigned long long>(n));
  return buf;
}

// The test-only fault of kFaultEnv: after which file to SIGKILL (0: none).
int fault_kill_after() {
  const char* v = std::getenv(kFaultEnv);
  if (v == nullptr || *v == '\0') return 0;
  const std::string s = v, prefix = "kill-after-files:";
  bool ok = s.size() > prefix.size() && s.size() <= prefix.size() + 6 && s.compare(0, prefix.size(), prefix) == 0 &&
            s.find_first_not_of("0123456789", prefix.size()) == std::string::npos;
  TANDEM_CHECK(ok, kFaultEnv, "=", s, ": expected kill-after-files:N (a test-only fault; unset it)");
  return std::stoi(s.substr(prefix.size()));
}

[[noreturn]] void io_fail(int64_t step, const std::string& what, const std::string& path, int err) {
  TANDEM_FAIL("checkpoint step ", step, ": cannot ", what, " ", path, ": ", describe_errno(err));
}

void write_file(int64_t step, const std::string& path, const std::string& bytes) {
  Fd f(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (f.fd < 0) io_fail(step, "create", path, errno);
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(f.fd, bytes.data() + off, std::min<size_t>(bytes.size() - off, size_t{1} << 30));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) io_fail(step, "write", path, errno);
    off += static_cast<size_t>(n);
  }
  if (::fsync(f.fd) != 0) io_fail(step, "fsync", path, errno);
  int fd = f.fd;
  f.fd = -1;
  if (::close(fd) != 0) io_fail(step, "close", path, errno);
}

void fsync_dir(int64_t step, const std::string& path) {
  Fd f(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (f.fd < 0) io_fail(step, "open directory", path, errno);
  if (::fsync(f.fd) != 0) io_fail(step, "fsync directory", path, errno);
}

// Renames the finished temporary `tmp` to `final_path`, replacing a checkpoint
// of the same step (Note [Checkpoint atomicity]).
void install(int64_t step, const std::string& tmp, const std::string& final_path) {
  if (::rename(tmp.c_str(), final_path.c_str()) == 0) return;
  if (errno != ENOTEMPTY && errno != EEXIST) io_fail(step, "rename " + tmp + " to", final_path, errno);
  std::error_code ec;
#ifdef RENAME_EXCHANGE
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_path.c_str(), RENAME_EXCHANGE) == 0) {
    fs::remove_all(tmp, ec);  // now the old checkpoint
    return;
  }
  if (errno != EINVAL && errno != ENOSYS) io_fail(step, "swap " + tmp + " with", final_path, errno);
#endif
  std::string aside = tmp + "-old";
  if (::rename(final_path.c_str(), aside.c_str()) != 0) io_fail(step, "move aside the old", final_path, errno);
  if (::rename(tmp.c_str(), final_path.c_str()) != 0) io_fail(step, "rename " + tmp + " to", final_path, errno);
  fs::remove_all(aside, ec);
}

void check_snapshot(const Snapshot& s) {
  checkpoint_name(s.step);  // checks the step
  std::unordered_set<std::string> names;
  for (const auto& f : s.files) {
    std::string bad = detail::bad_file_name(f.name);
    TANDEM_CHECK(bad.empty(), "checkpoint step ", s.step, ": bad file name: ", bad);
    TANDEM_CHECK(names.insert(f.name).second, "checkpoint step ", s.step, ": file '", f.name,
                 "' given twice; give each file of a snapshot its own name");
    TANDEM_CHECK(static_cast<bool>(f.bytes), "checkpoint step ", s.step, ": file '", f.name,
                 "' has no function producing its bytes");
  }
}

}  // namespace

struct Writer::State {
  std::string dir;
  WriterOptions opts;
  std::mutex mu;
  std::condition_variable cv;
  std::optional<Snapshot> pending;  // handed over, not yet taken by the thread
  bool busy = false;                // the thread is writing
  bool stop = false;
  std::optional<std::string> error;  // of the last failed write, until reported
  std::string last_written;
  double last_seconds = 0;
  std::thread thread;

  void log(const std::string& line) const {
    if (opts.log) opts.log(line);
  }

  void run() {
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      cv.wait(lock, [&] { return stop || pending.has_value(); });
      if (!pending) return;
      Snapshot s = std::move(*pending);
      pending.reset();
      busy = true;
      lock.unlock();
      auto t0 = std::chrono::steady_clock::now();
      std::string path, err;
      try {
        path = write(s);
      } catch (const std::exception& e) {
        err = e.what();
      } catch (...) {
        err = "checkpoint step " + std::to_string(s.step) + ": unknown exception";
      }
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const int64_t step = s.step;
      s = Snapshot{};  // frees the cloned tensors before the next one arrives
      if (!err.empty()) log("checkpoint: writing step " + std::to_string(step) + " failed: " + err);
      lock.lock();
      busy = false;
      if (err.empty()) {
        last_written = path;
        last_seconds = secs;
      } else {
        error = err;
      }
      cv.notify_all();
    }
  }

  // Writes one checkpoint (Note [Checkpoint atomicity]); returns its path.
  std::string write(Snapshot& s) {
    auto t0 = std::chrono::steady_clock::now();
    const int kill_after = fault_kill_after();
    const std::string name = checkpoint_name(s.step);
    const std::string final_path = (fs::path(dir) / name).string();
    const std::string tmp =
        (fs::path(dir) / ("." + name + ".tmp-" + std::to_string(::getpid()) + "-" + random_hex())).string();
    if (::mkdir(tmp.c_str(), 0755) != 0) io_fail(s.step, "create directory", tmp, errno);
    uint64_t total = 0;
    try {
      Manifest m;
      m.step = s.step;
      m.created = now_iso();
      m.meta = s.meta;
      for (size_t i = 0; i < s.files.size(); ++i) {
        const FileSpec& f = s.files[i];
        std::string bytes;
        try {
          bytes = f.bytes();
        } catch (const std::exception& e) {
          TANDEM_FAIL("checkpoint step ", s.step, ": producing file '", f.name, "' failed: ", e.what());
        }
        write_file(s.step, (fs::path(tmp) / f.name).string(), bytes);
        m.files.push_back({f.name, bytes.size(), XXH64(bytes.data(), bytes.size(), 0)});
        total += bytes.size();
        if (kill_after == static_cast<int>(i + 1)) ::kill(::getpid(), SIGKILL);
      }
      write_file(s.step, (fs::path(tmp) / kManifestName).string(), to_manifest_json(m));
      fsync_dir(s.step, tmp);
      install(s.step, tmp, final_path);
    } catch (...) {
      std::error_code ec;
      fs::remove_all(tmp, ec);
      throw;
    }
    // The checkpoint is complete under its name; should this fsync fail, the
    // write is reported as failed although the directory stays (it verifies).
    fsync_dir(s.step, dir);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.2f", secs);
    const size_t n = s.files.size();
    log("checkpoint: wrote " + final_path + " (" + std::to_string(n) + (n == 1 ? " file, " : " files, ") +
        human_bytes(total) + ") in " + buf + " s");
    prune(final_path);
    return final_path;
  }

  // Keeps the checkpoint just written and the keep-1 newest others. Failures
  // are logged, not thrown: the new checkpoint is good.
  void prune(const std::string& just_written) {
    std::vector<std::string> others;
    try {
      for (auto& p : list_checkpoints(dir))
        if (p != just_written) others.push_back(std::move(p));
    } catch (const std::exception& e) {
      log(std::string("checkpoint: cannot prune: ") + e.what());
      return;
    }
    const size_t keep_others = static_cast<size_t>(opts.keep - 1);
    for (size_t i = 0; i + keep_others < others.size(); ++i) {
      std::error_code ec;
      fs::remove_all(others[i], ec);
      if (ec) log("checkpoint: cannot prune " + others[i] + ": " + ec.message());
      else log("checkpoint: pruned " + others[i]);
    }
  }

  // Returns the error of a failed write as a tandem::Error, once.
  void rethrow_locked() {
    if (!error) return;
    std::string msg = std::move(*error);
    error.reset();
    throw Error(msg);
  }
};

Writer::Writer(std::string dir, WriterOptions opts) : state_(std::make_unique<State>()) {
  TANDEM_CHECK(opts.keep >= 1, "checkpoint writer for ", dir, ": keep is ", opts.keep, "; keep at least 1 checkpoint");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir))
    TANDEM_FAIL("cannot create checkpoint directory ", dir, ": ", ec ? ec.message() : "a file has that name",
                " (check the path and its permissions)");
  state_->dir = std::move(dir);
  state_->opts = std::move(opts);
  for (fs::directory_iterator it(state_->dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (!is_temporary(it->path().filename().string())) continue;
    std::error_code rm;
    fs::remove_all(it->path(), rm);
    if (rm) state_->log("checkpoint: cannot remove stale temporary " + it->path().string() + ": " + rm.message());
    else state_->log("checkpoint: removed stale temporary " + it->path().string() + " (left by a killed writer)");
  }
  if (ec) TANDEM_FAIL("cannot list checkpoint directory ", state_->dir, ": ", ec.message());
  State* st = state_.get();
  st->thread = std::thread([st] { st->run(); });
}

Writer::~Writer() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stop = true;
  }
  state_->cv.notify_all();
  if (state_->thread.joinable()) state_->thread.join();
  // A failure was logged when it happened; without a log it would vanish.
  if (state_->error && !state_->opts.log) std::cerr << "tandem: checkpoint write failed: " << *state_->error << "\n";
}

void Writer::submit(Snapshot s) {
  check_snapshot(s);
  std::unique_lock<std::mutex> lock(state_->mu);
  state_->cv.wait(lock, [&] { return !state_->busy && !state_->pending; });
  state_->rethrow_locked();
  state_->pending = std::move(s);
  state_->cv.notify_all();
}

void Writer::flush() {
  std::unique_lock<std::mutex> lock(state_->mu);
  state_->cv.wait(lock, [&] { return !state_->busy && !state_->pending; });
  state_->rethrow_locked();
}

std::string Writer::last_written() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->last_written;
}

double Writer::last_write_seconds() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->last_seconds;
}

}  // namespace tandem::ckpt
