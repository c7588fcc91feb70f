#include "tandem/obs/progress.h"

#include <unistd.h>

#include <cmath>

namespace tandem::obs {

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  long t = std::lround(s);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%02ld:%02ld", t / 60, t % 60);
  return buf;
}

ProgressBar::ProgressBar(std::string label, int64_t total, bool enabled, FILE* out)
    : label_(std::move(label)), total_(total), enabled_(enabled), tty_(isatty(fileno(out))), out_(out),
      start_(std::chrono::steady_clock::now()), last_draw_(start_ - std::chrono::seconds(1)) {}

namespace {
int decile_of(int64_t done, int64_t total) { return total > 0 ? static_cast<int>(10 * done / total) : 0; }
}  // namespace

bool ProgressBar::due(int64_t done) const {
  if (!enabled_) return false;
  if (tty_) return std::chrono::steady_clock::now() - last_draw_ >= std::chrono::milliseconds(100);
  return decile_of(done, total_) != last_decile_;
}

void ProgressBar::update(int64_t done, const std::string& status) {
  if (!due(done)) return;
  if (tty_) last_draw_ = std::chrono::steady_clock::now();
  else last_decile_ = decile_of(done, total_);
  draw(done, status, false);
}

void ProgressBar::finish(const std::string& status) {
  if (!enabled_) return;
  draw(total_, status, true);
}

void ProgressBar::draw(int64_t done, const std::string& status, bool final) {
  const int width = 24;
  double frac = total_ > 0 ? std::min(1.0, double(done) / total_) : 1.0;
  int filled = static_cast<int>(frac * width);
  std::string bar(filled, '#');
  bar += std::string(width - filled, '.');
  double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  double eta = frac > 0 ? elapsed * (1 - frac) / frac : NAN;
  std::fprintf(out_, "%s%s [%s] %3d%% %lld/%lld %s %s %s%s", tty_ ? "\r\033[K" : "", label_.c_str(), bar.c_str(),
               static_cast<int>(frac * 100), static_cast<long long>(done), static_cast<long long>(total_),
               status.c_str(), final ? "in" : "ETA", format_duration(final ? elapsed : eta).c_str(),
               (final || !tty_) ? "\n" : "");
  std::fflush(out_);
}

}  // namespace tandem::obs
