#pragma once
// The results JSON of one training run, in the schema of seed 002
// (results_baseline_ddp.json, results_all_reduce.json, results_ps.json):
//
// { "method": "baseline_ddp" | "all_reduce" | "ps", "world_size": N,
//   "num_workers": W (ps only), "batch_size": per-rank batch,
//   "start_time": ISO-8601, "end_time": ISO-8601,
//   "config": {...flags...},
//   "epochs": [ { "epoch", "train_loss", "train_accuracy", "train_time" (s),
//                 "train_throughput" (img/s, all ranks), "avg_batch_time" (s),
//                 "avg_comm_time" (s per step; ddp and ring: first bucket launch to last
//                 completion, mostly hidden behind backward), "avg_comm_wait" (s per step
//                 the step was blocked on communication after backward),
//                 "avg_comm_time_pull", "avg_comm_time_push" (s per step; ps),
//                 "val_loss", "val_accuracy",
//                 "pipeline": { "stall_fraction", "data_busy_pct",
//                               "model_busy_pct", "mean_buffer_fill", "bad_samples" } } ],
//   "summary": { "avg_train_throughput", "avg_train_time_per_epoch",
//                "best_val_accuracy", "avg_comm_time" | "avg_comm_time_pull" +
//                "avg_comm_time_push" },
//   "all_losses": [ per-step training loss, averaged over training ranks ],
//   "timeline": [ { "t" (s since start), "buffer_fill", "data_busy", "model_busy" } ],
//   "precision": "fp32" | "bf16" | "fp16" (--precision),
//   "loss_scale": --loss-scale only: { "scale" (at the end), "skipped_steps", "good_run",
//                 "dynamic", "init_scale", "growth_interval" },
//   "restarts": times the job was restarted after a failure (launcher --max-restarts),
//   "steps_redone": steps trained again because they came after the checkpoint resumed from }
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace tandem::train {

struct PipelineStats {
  double stall_fraction = 0;   // share of train time the step waited for data
  double data_busy_pct = 0;    // loader workers busy / (workers x wall)
  double model_busy_pct = 0;   // compute + comm / wall
  double mean_buffer_fill = 0; // batches
  int64_t bad_samples = 0;      // --skip-bad-samples: undecodable images replaced so far (all ranks)
};

struct EpochResult {
  int epoch = 0;
  double train_loss = 0, train_accuracy = 0, train_time = 0, train_throughput = 0, avg_batch_time = 0;
  double avg_comm_time = 0, avg_comm_time_pull = 0, avg_comm_time_push = 0;
  double avg_comm_wait = 0;
  double comm_bytes = 0;  // bytes sent per training rank per step (as a ring sends them; docs/algorithms.md)
  std::vector<double> shares;  // --balance auto: each training rank's share of the global batch at the epoch's end
  double val_loss = 0, val_accuracy = 0;
  PipelineStats pipeline;
};

struct TimelinePoint {
  double t = 0, buffer_fill = 0, data_busy = 0, model_busy = 0;
};

struct RunResult {
  std::string method;  // baseline_ddp, all_reduce, ps
  int world_size = 1;
  int num_workers = 0;  // ps: training ranks
  int batch_size = 0;
  std::string start_time, end_time;
  nlohmann::json config = nlohmann::json::object();
  std::vector<EpochResult> epochs;
  std::vector<double> all_losses;
  std::vector<TimelinePoint> timeline;
  int restarts = 0;
  int64_t steps_redone = 0;
  nlohmann::json pp;  // --pp: stages, cut, stage times, bubble (null otherwise)
  std::string precision = "fp32";
  nlohmann::json loss_scale;  // LossScaler::state() (null without a scaler)
};

nlohmann::json to_json(const RunResult& r);
// The inverse of to_json (checkpoints keep the results so far); throws
// nlohmann::json::exception on a missing or mistyped field.
RunResult from_json(const nlohmann::json& j);
// File name for a method, as in seed 002: results_<method>.json.
std::string results_file_name(const std::string& method);
std::string iso_time_now();

}  // namespace tandem::train
