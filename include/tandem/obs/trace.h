#pragma once
// Chrome trace (chrome://tracing, Perfetto) of what each thread did and when.
// Thread-safe; disabled traces cost one branch per event.
#include <chrono>
#include <mutex>
#include <string>
#include <vector>

namespace tandem::obs {

class Trace {
 public:
  using Clock = std::chrono::steady_clock;
  // Timestamps count from the steady clock's epoch (boot), shared by every
  // process on the host, so the per-rank files of one job line up when
  // Perfetto opens them together.
  explicit Trace(bool enabled = false, int pid = 0) : enabled_(enabled), pid_(pid), origin_() {}
  bool enabled() const { return enabled_; }
  // A span on track `track` (e.g. "loader 0", "train", "comm").
  void span(const std::string& name, const std::string& track, Clock::time_point begin, Clock::time_point end);
  // A sampled value (e.g. buffer fill) drawn as a counter track.
  void counter(const std::string& name, double value, Clock::time_point at);
  // Writes {"traceEvents": [...]} to `path`.
  void write(const std::string& path) const;

 private:
  struct Event {
    std::string name, track;
    char phase;
    double ts_us, dur_us, value;
  };
  bool enabled_;
  int pid_;
  Clock::time_point origin_;
  mutable std::mutex mu_;
  std::vector<Event> events_;
};

}  // namespace tandem::obs
