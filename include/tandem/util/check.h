#pragma once
// Errors, in two tiers (see docs/errors.md):
//  - tandem::Error: the user's input or environment is wrong. The message names
//    the thing (file, flag, rank) and the fix. Thrown by TANDEM_CHECK/TANDEM_FAIL.
//  - tandem::InternalError: an invariant of tandem itself broke (a bug); carries
//    file:line. Thrown by TANDEM_ASSERT.
// Peer and transport failures are tandem::CommError (comm/communicator.h).
// Library code never aborts the process.
#include <sstream>
#include <stdexcept>
#include <string>

namespace tandem {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class InternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

namespace detail {
template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace tandem

#define TANDEM_CHECK(cond, ...)                                       \
  do {                                                                \
    if (!(cond)) throw ::tandem::Error(::tandem::detail::str_cat(__VA_ARGS__)); \
  } while (0)

#define TANDEM_FAIL(...) throw ::tandem::Error(::tandem::detail::str_cat(__VA_ARGS__))

#define TANDEM_ASSERT(cond, ...)                                                         \
  do {                                                                                   \
    if (!(cond))                                                                         \
      throw ::tandem::InternalError(::tandem::detail::str_cat(                           \
          __FILE__, ":", __LINE__, ": internal error: ", #cond, " ", ##__VA_ARGS__));    \
  } while (0)
