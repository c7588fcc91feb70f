#include "tandem/train/results.h"

#include <ctime>

namespace tandem::train {

std::string results_file_name(const std::string& method) { return "results_" + method + ".json"; }

std::string iso_time_now() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", std::localtime(&t));
  return buf;
}

nlohmann::json to_json(const RunResult& r) {
  using nlohmann::json;
  const bool ps = r.method == "ps";
  json epochs = json::array();
  double thr = 0, time = 0, best = 0, comm = 0, pull = 0, push = 0;
  for (const auto& e : r.epochs) {
    json j{{"epoch", e.epoch},
           {"train_loss", e.train_loss},
           {"train_accuracy", e.train_accuracy},
           {"train_time", e.train_time},
           {"train_throughput", e.train_throughput},
           {"avg_batch_time", e.avg_batch_time},
           {"val_loss", e.val_loss},
           {"val_accuracy", e.val_accuracy},
           {"pipeline",
            {{"stall_fraction", e.pipeline.stall_fraction},
             {"data_busy_pct", e.pipeline.data_busy_pct},
             {"model_busy_pct", e.pipeline.model_busy_pct},
             {"mean_buffer_fill", e.pipeline.mean_buffer_fill},
             {"bad_samples", e.pipeline.bad_samples}}}};
    if (ps) {
      j["avg_comm_time_pull"] = e.avg_comm_time_pull;
      j["avg_comm_time_push"] = e.avg_comm_time_push;
    } else {
      j["avg_comm_time"] = e.avg_comm_time;
      j["avg_comm_wait"] = e.avg_comm_wait;
    }
    epochs.push_back(j);
    thr += e.train_throughput;
    time += e.train_time;
    best = std::max(best, e.val_accuracy);
    comm += e.avg_comm_time;
    pull += e.avg_comm_time_pull;
    push += e.avg_comm_time_push;
  }
  const double n = r.epochs.empty() ? 1.0 : static_cast<double>(r.epochs.size());
  json summary{{"avg_train_throughput", thr / n}, {"avg_train_time_per_epoch", time / n}, {"best_val_accuracy", best}};
  if (ps) {
    summary["avg_comm_time_pull"] = pull / n;
    summary["avg_comm_time_push"] = push / n;
  } else {
    summary["avg_comm_time"] = comm / n;
  }
  json timeline = json::array();
  for (const auto& p : r.timeline)
    timeline.push_back({{"t", p.t}, {"buffer_fill", p.buffer_fill}, {"data_busy", p.data_busy}, {"model_busy", p.model_busy}});
  json out{{"method", r.method},     {"world_size", r.world_size}, {"batch_size", r.batch_size},
           {"start_time", r.start_time}, {"end_time", r.end_time}, {"config", r.config},
           {"epochs", epochs},       {"summary", summary},         {"all_losses", r.all_losses},
           {"timeline", timeline}};
  if (ps) out["num_workers"] = r.num_workers;
  return out;
}

}  // namespace tandem::train
