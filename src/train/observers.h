#pragma once
// What watches the step loop: the Trainer calls every observer, in the order
// added, on the training thread, after each step and at the epoch's edges.
// Observers read the step's outcome; they never change training (the
// checkpointer only copies state). Internal to train/.
//
//   ProgressObserver   the progress bar and the epoch line (logging rank)
//   TraceObserver      Chrome-trace spans of the step's phases and communication
//   TimelineObserver   the utilisation timeline of the results JSON
//   Checkpointer       checkpoints (checkpointing.h)
#include <memory>
#include <vector>

#include "step.h"
#include "tandem/obs/progress.h"
#include "tandem/obs/trace.h"
#include "tandem/train/results.h"

namespace tandem::train {

// This rank's running sums of the epoch: what the ranks combine at its end.
struct EpochSums {
  double loss_sum = 0, correct = 0, count = 0;
  double comm = 0, pull = 0, push = 0, wait = 0;  // seconds, over synchronised steps
  // Loader counters since the epoch began (folded in at its end).
  double data_wait = 0, worker_busy = 0, fill_sum = 0, fill_samples = 0;
  double bad_samples = 0;           // undecodable images replaced so far (the dataset's running count)
  double bytes = 0;                 // sent by this rank (StepOutput::bytes)
  std::vector<double> step_losses;  // one per step of the epoch

  // The scalars, then the per-step losses: the layout the ranks sum and a
  // checkpoint stores.
  std::vector<double> to_vector() const;
  static EpochSums from_vector(const std::vector<double>& v);
};

// The element-wise sum of every rank's sums (a collective).
EpochSums sum_over_ranks(const EpochSums& s, comm::Communicator& comm);

struct StepEvent {
  int epoch = 0;
  int64_t step = 0;   // steps done in this epoch, this one included
  int64_t steps = 0;  // steps in this epoch
  int64_t global_step = 0;
  const StepOutput& out;
  const sync::GradientSync* gsync;  // null for the compute-only strategy
  const EpochSums& sums;
};

class Observer {
 public:
  virtual ~Observer() = default;
  // `first_step` > 0 when the epoch is resumed part-way.
  virtual void epoch_begin(int epoch, int64_t steps, int64_t first_step) {}
  virtual void after_step(const StepEvent& e) {}
  // This rank's training part of the epoch is over (before the ranks combine it).
  virtual void epoch_trained(int epoch, int64_t steps, const EpochSums& sums) {}
  virtual void epoch_end(const EpochResult& r) {}
};

class ProgressObserver : public Observer {
 public:
  ProgressObserver(int epochs, int trainers, const data::Loader& loader, bool enabled, bool ps,
                   const Datasets* bad_sample_report);
  void epoch_begin(int epoch, int64_t steps, int64_t first_step) override;
  void after_step(const StepEvent& e) override;
  void epoch_trained(int epoch, int64_t steps, const EpochSums& sums) override;
  void epoch_end(const EpochResult& r) override;

 private:
  int epochs_, trainers_;
  const data::Loader& loader_;
  bool enabled_, ps_;
  const Datasets* bad_;
  std::unique_ptr<obs::ProgressBar> bar_;
  Clock::time_point t_train_;
  double wait_before_ = 0;
  double count_before_ = -1;  // samples in the sums before this run's first step of the epoch
};

class TraceObserver : public Observer {
 public:
  explicit TraceObserver(obs::Trace& trace) : trace_(trace) {}
  void after_step(const StepEvent& e) override;

 private:
  obs::Trace& trace_;
};

// Samples the loader's buffer fill and the data and model busy fractions at
// most 4 times a second into `timeline` (and the trace's buffer counter).
// Times count from `run_start`, plus `t_offset` (a resumed run's points
// continue after those of the checkpoint).
class TimelineObserver : public Observer {
 public:
  TimelineObserver(std::vector<TimelinePoint>& timeline, const data::Loader& loader, int num_workers,
                   Clock::time_point run_start, double t_offset, obs::Trace& trace);
  void after_step(const StepEvent& e) override;

 private:
  std::vector<TimelinePoint>& timeline_;
  const data::Loader& loader_;
  int num_workers_;
  Clock::time_point run_start_;
  double t_offset_;
  obs::Trace& trace_;
  double last_t_ = -1, last_worker_busy_ = 0, last_model_busy_ = 0, model_busy_ = 0;
};

}  // namespace tandem::train
