#pragma once
// Helpers shared by the checkpoint writer, reader and manifest code; not
// installed, not part of the API.
#include <unistd.h>

#include <cstdint>
#include <optional>
#include <string>

namespace tandem::ckpt::detail {

// Ends the message of every damaged-checkpoint error; latest_good() replaces
// it with the checkpoint it uses instead.
constexpr const char* kDamagedHint = "; resume from an earlier checkpoint";

// Why `name` cannot be a file of a checkpoint ("" when it can): empty, "." or
// "..", contains '/', '\\', ".." or a NUL, longer than 255 bytes, or is the
// manifest's own name.
std::string bad_file_name(const std::string& name);

// The step of a checkpoint directory named "ckpt-<digits>", nullopt for any
// other name (or a step beyond int64).
std::optional<int64_t> step_of_name(const std::string& name);

// 16 lowercase hex digits.
std::string to_hex64(uint64_t v);

// Closes a file descriptor when it goes out of scope.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

// strerror(err), plus the fix when there is an obvious one.
std::string describe_errno(int err);

}  // namespace tandem::ckpt::detail
