#pragma once
// Durable training: what a checkpoint of a training run holds, how the ranks
// take one together, and how a run resumes from one. Internal to train/; the
// files, their atomic write and their checksums are ckpt/'s.
//
// A checkpoint (<checkpoint dir>/ckpt-<step>/) holds
//   model.pt    the parameters and buffers, a PyTorch state_dict (torch.load reads it)
//   optim.pt    the optimiser state: SGD momentum per parameter name (ddp, ring),
//               or the servers' momentum as one flat tensor (ps)
//   state.json  TrainState, the results so far, the RNG, the parameter
//               server's update count, and a fingerprint of the configuration
// Every owner of training state saves and restores its part: the model and
// optimiser (here), the sampler (a position, Note [Resume position] in
// data/sampler.h), the results (TrainState), the servers (ps::Server).
//
// Taking one is collective (every rank calls Checkpointer::take at the same
// step): the ranks combine the epoch's partial sums, the servers hand their
// shards and momentum over; rank 0 copies everything into memory and its
// ckpt::Writer writes it in the background while training goes on.
#include <memory>
#include <optional>
#include <string>

#include "observers.h"
#include "tandem/ckpt/checkpoint.h"

namespace tandem::train {

// Where a run is, and what it has, besides the model and the optimiser.
struct TrainState {
  int epoch = 1;               // the epoch in progress (or the next one to start)
  int64_t step = 0;            // steps of it done
  int64_t global_step = 0;     // steps done since training began
  int64_t start_position = 0;  // sample position where this epoch's sampler starts
  int64_t done_before = 0;     // steps of this epoch done before start_position
  double elapsed = 0;          // training seconds of this epoch before the resume
  EpochSums carried;           // all ranks' sums of those steps (added by rank 0 only)
  RunResult result;            // finished epochs, per-step losses, timeline, restarts
  at::Tensor rng;              // the CPU generator's state (restore_rng)
  int64_t ps_updates = 0;      // updates the parameter servers had applied
};

class Checkpointer {
 public:
  // Rank 0 gets a writer; every rank gets the schedule. every = 0: at the
  // end of each epoch only.
  Checkpointer(const TrainOptions& o, const Roles& roles, comm::CommunicatorPtr comm, nlohmann::json fingerprint);
  ~Checkpointer();
  // The next global step > `global_step` at which a mid-epoch checkpoint is
  // due (a large number when none is).
  int64_t next_due(int64_t global_step) const;
  // At the end of an epoch: with every = 0, or on a multiple of it, and at
  // the end of training (so that --resume --epochs M can train further).
  bool due_at_epoch_end(int64_t global_step, bool last_epoch) const;
  // Collective. `sums` is this rank's (with the loader counters folded in).
  // `train_seconds` is this rank's training time of the epoch so far.
  void take(const TrainState& state, const EpochSums& sums, double train_seconds, Step& step);
  // The logging rank records how far training got (for steps_redone after a
  // restart); cheap, written at most 5 times a second unless `now_or_never`.
  void note_progress(int64_t global_step, bool now_or_never = false);
  // Waits for the write in flight (rethrows its error).
  void flush();

 private:
  const TrainOptions& o_;
  Roles roles_;
  comm::CommunicatorPtr comm_;
  std::string dir_;
  nlohmann::json fingerprint_;
  std::unique_ptr<ckpt::Writer> writer_;
  Clock::time_point last_progress_{};
};

// What must match for a checkpoint to continue this run: the model, the
// data, the strategy, the seed; for the parameter server also its shards
// (servers, mode, world size). ddp and ring re-shard to another world size.
nlohmann::json fingerprint(const TrainOptions& o, const Roles& roles, int world,
                           const std::vector<int64_t>& sample_shape, int64_t num_classes, int64_t train_size);

// Resuming. find_resume_point is collective: rank 0 picks the checkpoint
// (`--resume PATH` or the newest good one, falling back past damaged ones
// with a warning) and tells the others. nullopt: start fresh.
std::optional<std::string> find_resume_point(const TrainOptions& o, comm::Communicator& comm, bool log);

// The checkpoint's TrainState (read before anything is built), after
// checking its fingerprint against `o`
// (tandem::Error naming the difference it cannot handle). Only rank 0 keeps
// the carried sums. `steps_redone` and `restarts` are updated from the
// progress record and the launcher's restart count.
TrainState load_state(const std::string& ckpt, const TrainOptions& o, const Roles& roles, int world, int rank,
                      const nlohmann::json& fingerprint, bool log);
// The CPU generator's state, once the model is built (its init draws from it).
void restore_rng(const at::Tensor& state);
// Parameters and buffers into `model` (before the synchroniser is built).
void load_model(const std::string& ckpt, torch::nn::Module& model);
// Momentum into the optimiser, or into this rank's parameter server.
void load_optimizer(const std::string& ckpt, const TrainState& state, Step& step, const Roles& roles);

// The restart count of this attempt (0 for the first): TANDEM_RESTART_COUNT
// (tandem launch), else TORCHELASTIC_RESTART_COUNT (torchrun), else
// SLURM_RESTART_COUNT.
int restart_count();

}  // namespace tandem::train
