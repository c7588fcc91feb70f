#pragma once
// GradientSync: how gradients become consistent across ranks. The trainer
// (or a user's own loop) drives it around each micro-step:
//
//   sync.begin_step(/*sync=*/true);   // false on the first K-1 micro-steps of --grad-accum K
//   loss = loss_fn(model(x), y); loss.backward();
//   sync.finish();                    // .grad() now holds the average over ranks
//   if (!sync.applies_update()) optimizer.step();
//
// Implementations: DistributedDataParallel (c10d all-reduce of buckets during
// backward), RingSync (same buckets, tandem's ring all-reduce), and the
// parameter-server worker (pulls parameters in begin_step, pushes gradients in
// finish; the server applies the update).
#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace tandem::sync {

// One communication operation of a step, for the trace: launch to observed completion.
struct CommSpan {
  std::string name;
  std::chrono::steady_clock::time_point begin, end;
};

// Seconds spent in the last synchronised step.
struct StepTimes {
  double comm = 0;  // communication span: first launch to last completion
  double wait = 0;  // of which the step was blocked (not hidden behind backward)
  double pull = 0;  // parameter server: parameter pull
  double push = 0;  // parameter server: gradient push
  int64_t bytes = 0;  // sent by this rank (as a ring would send it; docs/algorithms.md)
  std::vector<CommSpan> spans;  // per bucket / message (filled by bucketed synchronisers)
};

class GradientSync {
 public:
  virtual ~GradientSync() = default;
  virtual std::string name() const = 0;
  virtual void begin_step(bool sync) { sync_ = sync; }
  virtual void finish() = 0;
  // True when the optimiser update happens elsewhere (parameter server).
  virtual bool applies_update() const { return false; }
  const StepTimes& last_times() const { return times_; }

 protected:
  bool sync_ = true;
  StepTimes times_;
};

using GradientSyncPtr = std::unique_ptr<GradientSync>;

}  // namespace tandem::sync
