#pragma once
// Progress bar for the logging rank. On a terminal it redraws one line (at
// most 10 times a second); otherwise (logs, CI) it prints a line every 10%.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace tandem::obs {

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, bool enabled, FILE* out = stderr);
  // Whether update(done, ...) would draw now: callers build the status text
  // only then, not on every step.
  bool due(int64_t done) const;
  // `done` of `total` finished; `status` is shown after the bar.
  void update(int64_t done, const std::string& status);
  void finish(const std::string& status);

 private:
  void draw(int64_t done, const std::string& status, bool final);
  std::string label_;
  int64_t total_;
  bool enabled_, tty_;
  FILE* out_;
  std::chrono::steady_clock::time_point start_, last_draw_;
  int last_decile_ = -1;
};

std::string format_duration(double seconds);

}  // namespace tandem::obs
