#include "tandem/obs/trace.h"

#include <fstream>

#include <nlohmann/json.hpp>

#include "tandem/util/check.h"

namespace tandem::obs {

void Trace::span(const std::string& name, const std::string& track, Clock::time_point b, Clock::time_point e) {
  if (!enabled_) return;
  double ts = std::chrono::duration<double, std::micro>(b - origin_).count();
  double dur = std::chrono::duration<double, std::micro>(e - b).count();
  std::lock_guard<std::mutex> lock(mu_);
  events_.push_back({name, track, 'X', ts, dur, 0});
}

void Trace::counter(const std::string& name, double value, Clock::time_point at) {
  if (!enabled_) return;
  double ts = std::chrono::duration<double, std::micro>(at - origin_).count();
  std::lock_guard<std::mutex> lock(mu_);
  events_.push_back({name, "counters", 'C', ts, 0, value});
}

void Trace::write(const std::string& path) const {
  std::lock_guard<std::mutex> lock(mu_);
  nlohmann::json events = nlohmann::json::array();
  std::vector<std::string> tracks;
  auto tid = [&](const std::string& t) {
    for (size_t i = 0; i < tracks.size(); ++i)
      if (tracks[i] == t) return static_cast<int>(i);
    tracks.push_back(t);
    return static_cast<int>(tracks.size() - 1);
  };
  for (const auto& e : events_) {
    nlohmann::json j{{"name", e.name}, {"ph", std::string(1, e.phase)}, {"ts", e.ts_us}, {"pid", pid_},
                     {"tid", tid(e.track)}};
    if (e.phase == 'X') j["dur"] = e.dur_us;
    if (e.phase == 'C') j["args"] = {{"value", e.value}};
    events.push_back(j);
  }
  for (size_t i = 0; i < tracks.size(); ++i)
    events.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", pid_}, {"tid", i}, {"args", {{"name", tracks[i]}}}});
  events.push_back({{"name", "process_name"}, {"ph", "M"}, {"pid", pid_}, {"args", {{"name", "rank " + std::to_string(pid_)}}}});
  std::ofstream f(path);
  TANDEM_CHECK(f, "--trace: cannot write ", path);
  f << nlohmann::json{{"traceEvents", events}, {"displayTimeUnit", "ms"}}.dump() << "\n";
}

}  // namespace tandem::obs
