#pragma once
// Model parallelism: a model cut into pipeline stages on several ranks, with
// micro-batches flowing through them (GPipe; PipeDream-Flush / 1F1B).
// ("Pipeline" alone means the data pipeline in this project; this is `pp`.)
//
// Three parts, each usable alone:
//   make_schedule      the ops (forward or backward of micro-batch m) each
//                      stage runs in one step, as data: tests inspect it,
//                      the trace shows it;
//   partition_min_max  contiguous cut of a model's blocks (models::Block)
//                      into stages, the slowest stage as fast as possible;
//                      profile_blocks measures the costs it cuts by;
//   Stage              runs one stage's ops on its blocks: receives
//                      activations from the previous stage and gradients
//                      from the next through the communicator's
//                      point-to-point calls (posted one micro-batch ahead,
//                      sends waited for at the end of the step), computes
//                      the loss on the last stage, accumulates gradients
//                      into the blocks' parameters.
// The training loop (train/pipeline_step.cpp) adds the optimiser, the
// data-parallel groups of a stage and the observers.
//
// Threads: a Stage is used by one thread (the training thread). Errors:
// tandem::Error for a bad configuration, CommError (naming the peer rank)
// when a neighbour dies or times out mid-schedule.
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "tandem/comm/communicator.h"
#include "tandem/models/models.h"
#include "tandem/obs/trace.h"
#include "tandem/sync/ddp.h"
#include "tandem/sync/gradient_sync.h"

namespace tandem::pp {

enum class ScheduleKind { kGPipe, k1F1B };
// "gpipe" or "1f1b"; throws tandem::Error naming --schedule otherwise.
ScheduleKind parse_schedule(const std::string& s);
const char* schedule_name(ScheduleKind k);

struct Op {
  enum Kind : uint8_t { kForward, kBackward };
  Kind kind;
  int micro;
  bool operator==(const Op& o) const { return kind == o.kind && micro == o.micro; }
};
using StageOps = std::vector<Op>;

// For each of `stages` stages, its ops in order, for `micro_batches` M:
//   gpipe: F0 .. F(M-1), then B0 .. B(M-1);
//   1f1b:  min(K-1-s, M) warm-up forwards, then one forward and one
//          backward until the forwards are done, then the remaining backwards.
// Throws tandem::Error for stages < 1 or micro_batches < 1.
std::vector<StageOps> make_schedule(ScheduleKind kind, int stages, int micro_batches);
// Most micro-batches a stage holds at once (forwarded, not yet backwarded).
int max_in_flight(const StageOps& ops);
// GPipe's idle fraction of each stage with equal stages: (K-1)/(M+K-1).
double theory_bubble(int stages, int micro_batches);
// Each stage's idle fraction of one step of `schedule` when op i of stage s
// takes op_s[s][i] seconds and messages take none: every stage runs its ops
// in order, each as soon as its input (the previous stage's forward, the
// next stage's backward) is done. Equal ops give theory_bubble(K, M) on
// every stage; measured op times show what the stages' unequal and varying
// speeds alone cost, so that the rest of a measured bubble is messaging.
// Throws tandem::Error when op_s does not match the schedule's shape.
std::vector<double> simulate_bubble(const std::vector<StageOps>& schedule, const std::vector<std::vector<double>>& op_s);

// Cuts blocks with `costs` into `stages` contiguous non-empty ranges so that
// the largest sum is as small as possible (ties: the earliest cut). Returns
// stages + 1 boundaries: stage s has blocks [cut[s], cut[s+1]). Throws
// tandem::Error naming --pp when there are fewer blocks than stages.
std::vector<int> partition_min_max(const std::vector<double>& costs, int stages);

// Seconds of forward + backward of each block on `input` (a micro-batch),
// the median of `repeats` runs after one warm-up. Gradients it makes are
// cleared; buffers (batch-norm statistics) are saved and restored.
std::vector<double> profile_blocks(const std::vector<models::Block>& blocks, const at::Tensor& input, int repeats = 3);
// Parameter count of each block.
std::vector<double> block_params(const std::vector<models::Block>& blocks);

struct StageOptions {
  ScheduleKind schedule = ScheduleKind::k1F1B;
  int stages = 1;
  int stage = 0;          // this rank's stage
  int micro_batches = 1;  // M; a batch of fewer rows uses one micro-batch per row
  int prev = -1, next = -1;  // ranks (in the communicator) of the neighbouring stages; -1 at the ends
  std::vector<int64_t> input_shape;  // one sample's input to this stage (read when stage > 0)
  int tag = 9000;  // p2p tags [tag, tag + 2 x M) are this pipeline's
  obs::Trace* trace = nullptr;
};

// What one step of a stage did.
struct StageStats {
  double loss = 0;     // last stage: the batch's mean loss over valid rows
  double correct = 0;  // last stage: correct predictions
  double count = 0;    // last stage: valid rows
  int micro_batches = 0;
  double span_s = 0;     // first op's start to the last op's end
  double busy_s = 0;     // forward and backward computing
  std::vector<double> op_s;  // each op's computing, in schedule order
  double wait_s = 0;     // waiting for activations or gradients
  int64_t peak_activation_bytes = 0;  // most bytes of inputs and block outputs held for backward
  int64_t bytes_sent = 0;             // activations and gradients sent to the neighbours
};

class Stage {
 public:
  // `blocks`: this stage's blocks, in order. Not collective.
  Stage(std::vector<models::Block> blocks, comm::CommunicatorPtr comm, StageOptions o);

  // One step on a batch of `rows` rows, split into micro-batches whose sizes
  // differ by at most one. The first stage reads `input`; the last reads
  // `target` (class indices) and `mask` (undefined: all rows valid). The
  // loss is the mean over the batch's valid rows, so the gradients that
  // accumulate in the parameters are those of the whole batch.
  // An `input` that requires grad has its gradient computed per micro-batch
  // (as later stages do) but not accumulated into `input`.
  // `before_backward(last)` runs before each backward op, `last` for the
  // final one (a data-parallel synchroniser turns its hooks on there).
  StageStats run(int64_t rows, const at::Tensor& input, const at::Tensor& target, const at::Tensor& mask,
                 const std::function<void(bool last)>& before_backward = {});

  const std::vector<at::Tensor>& parameters() const { return params_; }
  // The ops of a step with `micro` micro-batches (cached).
  const StageOps& ops(int micro);

 private:
  std::vector<models::Block> blocks_;
  std::vector<at::Tensor> params_;  // the blocks' parameters, in order
  comm::CommunicatorPtr comm_;
  StageOptions o_;
  std::map<int, StageOps> schedules_;
};

// A model's pipeline, for one rank of a world of D x K ranks: D data-parallel
// replicas of a K-stage pipeline. Rank r is stage r % K of replica r / K; the
// ranks of one stage form a data-parallel group (a sub-group of `comm`) that
// averages the stage's gradients with DDP or the ring after the step's last
// backward micro-batch.
struct PipelineOptions {
  int stages = 2;
  int micro_batches = 4;
  ScheduleKind schedule = ScheduleKind::k1F1B;
  std::string balance = "time";  // time (profiled forward + backward) | params
  std::string sync = "ddp";      // ddp | ring: a stage's data-parallel group (replicas > 1)
  sync::DdpOptions ddp;          // buckets, compression
  int64_t micro_rows = 16;       // rows of the micro-batch the profile runs
  obs::Trace* trace = nullptr;
  bool log = false;              // print the cut and the predicted stage times
  std::string name = "pp";       // of the stage groups: pipelines over one communicator need distinct names
};

class Pipeline {
 public:
  // Collective over `comm` (rank 0 profiles, everyone takes its cut; the
  // stage groups are built). `model` must be the same on every rank (same
  // seed or weights); its blocks are cut. `sample_shape`: one sample [C,H,W].
  // Throws tandem::Error when comm's size is not a multiple of stages, or the
  // model has fewer blocks than stages.
  Pipeline(models::Model model, comm::CommunicatorPtr comm, PipelineOptions o, std::vector<int64_t> sample_shape);
  ~Pipeline();

  // Clears this stage's gradients, runs the schedule on the batch, and
  // averages the gradients over the stage's replicas. The caller's
  // optimiser then steps parameters() (the others have no gradient).
  StageStats step(int64_t rows, const at::Tensor& input, const at::Tensor& target, const at::Tensor& mask);
  // Every rank gets every stage's parameters and buffers, from replica 0
  // (a collective): for evaluation, checkpoints and the saved model.
  void consolidate();
  // Same, for tensors that follow the parameters one to one (the
  // optimiser's momentum): `per_param[i]` belongs to model parameter i
  // (module->parameters() order); on ranks not owning it the tensor is
  // overwritten (it must have the parameter's shape).
  void broadcast_from_owners(std::vector<at::Tensor>& per_param);

  int stage() const { return stage_index_; }
  int replica() const { return replica_; }
  int replicas() const { return replicas_; }
  bool last_stage() const { return stage_index_ == o_.stages - 1; }
  const std::vector<int>& cut() const { return cut_; }                 // stages + 1 block boundaries
  const std::vector<double>& block_costs() const { return costs_; }    // seconds (time) or counts (params)
  std::vector<double> predicted_stage_costs() const;
  const models::Model& model() const { return model_; }
  const std::vector<at::Tensor>& parameters() const { return stage_->parameters(); }
  sync::GradientSync* gsync() { return gsync_.get(); }
  Stage& stage_executor() { return *stage_; }

 private:
  models::Model model_;
  comm::CommunicatorPtr comm_, group_;
  PipelineOptions o_;
  int stage_index_ = 0, replica_ = 0, replicas_ = 1;
  std::vector<int> cut_;
  std::vector<double> costs_;
  std::unique_ptr<Stage> stage_;
  std::shared_ptr<torch::nn::Module> stage_module_;  // the stage's parameters, for the synchroniser
  sync::GradientSyncPtr gsync_;
};

}  // namespace tandem::pp
