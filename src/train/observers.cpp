// Observers of the step loop. See observers.h.
#include "observers.h"

#include <algorithm>
#include <cstdio>
#include <string>

#include <torch/torch.h>

#include "tandem/util/check.h"

namespace tandem::train {
namespace {

std::string fmt(const char* f, double a, double b, double c, double d) {
  char buf[160];
  std::snprintf(buf, sizeof buf, f, a, b, c, d);
  return buf;
}

}  // namespace

namespace {
constexpr size_t kScalars = 13;
}  // namespace

std::vector<double> EpochSums::to_vector() const {
  std::vector<double> v{loss_sum, correct, count,    comm,        pull,         push,
                        wait,     data_wait, worker_busy, fill_sum, fill_samples, bad_samples, bytes};
  v.insert(v.end(), step_losses.begin(), step_losses.end());
  return v;
}

EpochSums EpochSums::from_vector(const std::vector<double>& v) {
  TANDEM_CHECK(v.size() >= kScalars, "epoch sums: ", v.size(), " numbers, expected at least ", kScalars);
  EpochSums s;
  s.loss_sum = v[0], s.correct = v[1], s.count = v[2], s.comm = v[3], s.pull = v[4], s.push = v[5];
  s.wait = v[6], s.data_wait = v[7], s.worker_busy = v[8], s.fill_sum = v[9], s.fill_samples = v[10];
  s.bad_samples = v[11], s.bytes = v[12];
  s.step_losses.assign(v.begin() + kScalars, v.end());
  return s;
}

EpochSums sum_over_ranks(const EpochSums& s, comm::Communicator& comm) {
  auto t = torch::tensor(s.to_vector(), torch::kFloat64);
  comm.all_reduce(t);
  const double* p = t.data_ptr<double>();
  return EpochSums::from_vector(std::vector<double>(p, p + t.numel()));
}

ProgressObserver::ProgressObserver(int epochs, int trainers, const data::Loader& loader, bool enabled, bool ps,
                                   const Datasets* bad_sample_report)
    : epochs_(epochs), trainers_(trainers), loader_(loader), enabled_(enabled), ps_(ps), bad_(bad_sample_report) {}

void ProgressObserver::epoch_begin(int epoch, int64_t steps, int64_t first_step) {
  bar_ = std::make_unique<obs::ProgressBar>("epoch " + std::to_string(epoch) + "/" + std::to_string(epochs_), steps,
                                            enabled_);
  if (enabled_ && first_step > 0)
    std::fprintf(stderr, "[tandem] epoch %d resumed at step %lld of %lld\n", epoch,
                 static_cast<long long>(first_step), static_cast<long long>(steps));
  t_train_ = Clock::now();
  wait_before_ = loader_.stats().wait_seconds;
  count_before_ = -1;
}

void ProgressObserver::after_step(const StepEvent& e) {
  if (!enabled_) return;
  // A resumed epoch's sums start with what was done before the checkpoint:
  // the rate counts only this run's samples.
  if (count_before_ < 0) count_before_ = e.sums.count - e.out.count;
  if (!bar_->due(e.step)) return;
  const double el = seconds_since(t_train_);
  const auto& s = e.sums;
  bar_->update(e.step, fmt("loss %.4f acc %.3f %.0f img/s stall %.1f%%", s.loss_sum / s.count, s.correct / s.count,
                           (s.count - count_before_) * trainers_ / el,
                           100.0 * (loader_.stats().wait_seconds - wait_before_) / el));
}

void ProgressObserver::epoch_trained(int epoch, int64_t steps, const EpochSums& s) {
  if (!bar_) return;
  bar_->finish(fmt("loss %.4f acc %.3f %.0f img/s (%.0f steps)", s.loss_sum / std::max(1.0, s.count),
                   s.correct / std::max(1.0, s.count),
                   (s.count - std::max(0.0, count_before_)) * trainers_ / seconds_since(t_train_),
                   static_cast<double>(steps)));
}

void ProgressObserver::epoch_end(const EpochResult& er) {
  if (!enabled_) return;
  std::string extra;
  if (er.comm_bytes > 0) extra += ", sent " + std::to_string(static_cast<int64_t>(er.comm_bytes / 1024)) + " KiB/step";
  if (!er.shares.empty()) {
    extra += ", shares ";
    for (size_t i = 0; i < er.shares.size(); ++i) {
      char buf[16];
      std::snprintf(buf, sizeof buf, "%s%.2f", i ? "/" : "", er.shares[i]);
      extra += buf;
    }
  }
  std::fprintf(stderr,
               "[tandem] epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s, %.0f img/s, "
               "comm %.2f ms/step%s, stall %.1f%%\n",
               er.epoch, er.train_loss, er.train_accuracy, er.val_loss, er.val_accuracy, er.train_time,
               er.train_throughput, 1e3 * (ps_ ? er.avg_comm_time_pull + er.avg_comm_time_push : er.avg_comm_time),
               extra.c_str(), 100 * er.pipeline.stall_fraction);
  if (bad_ && bad_->train_folder)
    std::fprintf(stderr,
                 "[tandem] --skip-bad-samples: %lld undecodable training image loads replaced so far (all ranks), "
                 "%lld validation loads on this rank\n",
                 static_cast<long long>(er.pipeline.bad_samples),
                 static_cast<long long>(bad_->val_folder ? bad_->val_folder->bad_samples() : 0));
}

void TraceObserver::after_step(const StepEvent& e) {
  if (!trace_.enabled()) return;
  // CPU-side spans: on CUDA they show launch time, not kernel time.
  const auto& o = e.out;
  const bool pulls = e.gsync && e.gsync->applies_update();
  trace_.span("step " + std::to_string(e.step - 1), "train", o.begin, o.end);
  if (pulls) trace_.span("pull", "step phases", o.begin, o.xfer);
  trace_.span("transfer", "step phases", o.xfer, o.fwd);
  trace_.span("forward", "step phases", o.fwd, o.bwd);
  trace_.span("backward", "step phases", o.bwd, o.sync);
  if (e.gsync) trace_.span("sync wait", "step phases", o.sync, o.opt);
  trace_.span("optimizer", "step phases", o.opt, o.end);
  if (e.gsync && o.synced)
    for (const auto& c : e.gsync->last_times().spans) trace_.span(c.name, "comm", c.begin, c.end);
}

TimelineObserver::TimelineObserver(std::vector<TimelinePoint>& timeline, const data::Loader& loader, int num_workers,
                                   Clock::time_point run_start, double t_offset, obs::Trace& trace)
    : timeline_(timeline),
      loader_(loader),
      num_workers_(num_workers),
      run_start_(run_start),
      t_offset_(t_offset),
      trace_(trace) {}

void TimelineObserver::after_step(const StepEvent& e) {
  model_busy_ += seconds(e.out.end - e.out.begin);
  const double now = seconds(e.out.end - run_start_);
  if (now - last_t_ < 0.25) return;
  auto st = loader_.stats();
  const double dt = last_t_ < 0 ? now : now - last_t_;
  const double wb = st.worker_busy_seconds;
  TimelinePoint p;
  p.t = t_offset_ + now;
  p.buffer_fill = loader_.buffer_fill();
  p.data_busy = std::min(1.0, (wb - last_worker_busy_) / (dt * std::max(1, num_workers_)));
  p.model_busy = std::min(1.0, (model_busy_ - last_model_busy_) / dt);
  timeline_.push_back(p);
  trace_.counter("buffer fill", p.buffer_fill, e.out.end);
  last_t_ = now;
  last_worker_busy_ = wb;
  last_model_busy_ = model_busy_;
}

}  // namespace tandem::train
