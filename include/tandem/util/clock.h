#pragma once
// The one clock tandem times itself with, and its conversion to seconds.
#include <chrono>

namespace tandem {

using Clock = std::chrono::steady_clock;

inline double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }
inline double seconds_since(Clock::time_point t0) { return seconds(Clock::now() - t0); }

}  // namespace tandem
