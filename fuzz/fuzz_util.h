#pragma once
// Shared by the fuzz targets (one <name>_fuzz.cpp each, see docs/fuzzing.md).
//
// Contract every target follows: an input the parser rejects must end in an
// exception (tandem::Error, c10::Error or another std::exception); anything
// else is a finding that libFuzzer reports: a crash, an ASan/UBSan report, a
// leak, an allocation over -malloc_limit_mb, a stack overflow, and
// tandem::InternalError, which by docs/errors.md means a bug in tandem.
//
// TANDEM_FUZZ_STRICT=1 in the environment also makes every exception that is
// not a tandem::Error a finding: the headers promise "every malformed input is
// a tandem::Error naming the file", so this mode finds rejections whose
// message comes from LibTorch, zlib or the standard library instead.
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "tandem/util/check.h"

namespace tandem::fuzz {

// Inputs above this are skipped: real files can be bigger, but a parser bug
// shows up in small ones, and the per-input work stays bounded.
constexpr size_t kMaxInputBytes = size_t(1) << 20;

[[noreturn]] inline void die(const char* what, const char* detail) {
  std::fprintf(stderr, "tandem fuzz: FINDING: %s: %s\n", what, detail);
  std::fflush(stderr);
  std::abort();  // libFuzzer catches SIGABRT, prints the stack and saves the input
}

inline bool strict() {
  static const bool on = [] {
    const char* v = std::getenv("TANDEM_FUZZ_STRICT");
    return v && *v && std::strcmp(v, "0") != 0;
  }();
  return on;
}

// One intra-op thread: every input then runs on libFuzzer's thread, so a
// report's stack is the parser's, and two fuzzers on two cores stay on two.
inline void init_fuzz_process() { at::set_num_threads(1); }

// Runs `parse` on one input. Expected rejections return normally; see the
// contract at the top of this file for what is a finding.
template <typename F>
void run_guarded(F&& parse) {
  try {
    parse();
  } catch (const tandem::InternalError& e) {
    die("tandem::InternalError (an invariant of tandem broke)", e.what());
  } catch (const tandem::Error&) {
    // the documented rejection
  } catch (const c10::Error& e) {
    if (strict()) die("c10::Error instead of tandem::Error", e.what_without_backtrace());
  } catch (const std::exception& e) {
    if (strict()) die("std::exception instead of tandem::Error", e.what());
  }
}

// An anonymous in-memory file for parsers that only take a path: the path
// /proc/self/fd/N opens the same bytes. Rewritten per input; no disk I/O and
// nothing left behind when the process dies.
class MemFile {
 public:
  explicit MemFile(const char* name) {
    fd_ = memfd_create(name, MFD_CLOEXEC);
    if (fd_ < 0) die("memfd_create failed", std::strerror(errno));
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  ~MemFile() { close(fd_); }

  void write(const uint8_t* data, size_t size) {
    if (ftruncate(fd_, 0) != 0) die("ftruncate failed", std::strerror(errno));
    size_t done = 0;
    while (done < size) {
      ssize_t n = pwrite(fd_, data + done, size - done, static_cast<off_t>(done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) die("pwrite to memfd failed", std::strerror(errno));
      done += static_cast<size_t>(n);
    }
  }
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

}  // namespace tandem::fuzz
