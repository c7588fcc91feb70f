#pragma once
// Whole numbers from flags' text. Callers name the flag and the accepted
// range in their own error; this only says whether the text is a number.
#include <cerrno>
#include <cstdlib>
#include <optional>
#include <string>

namespace tandem {

// The value of `s` when all of it is a decimal integer (an optional sign,
// then digits) that fits a long; nullopt for "", "2x", "auto", overflow.
inline std::optional<long> parse_whole(const std::string& s) {
  if (s.empty()) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (errno == ERANGE || end == s.c_str() || *end != '\0') return std::nullopt;
  return v;
}

}  // namespace tandem
