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
    j["comm_bytes"] = e.comm_bytes;
    if (!e.shares.empty()) j["shares"] = e.shares;
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
  out["restarts"] = r.restarts;
  out["steps_redone"] = r.steps_redone;
  if (!r.pp.is_null()) out["pp"] = r.pp;
  out["precision"] = r.precision;
  if (!r.loss_scale.is_null()) out["loss_scale"] = r.loss_scale;
  return out;
}

RunResult from_json(const nlohmann::json& j) {
  RunResult r;
  r.method = j.at("method").get<std::string>();
  r.world_size = j.at("world_size").get<int>();
  r.num_workers = j.value("num_workers", 0);
  r.batch_size = j.at("batch_size").get<int>();
  r.start_time = j.value("start_time", "");
  r.end_time = j.value("end_time", "");
  r.config = j.value("config", nlohmann::json::object());
  r.restarts = j.value("restarts", 0);
  r.steps_redone = j.value("steps_redone", int64_t{0});
  r.pp = j.value("pp", nlohmann::json());
  r.precision = j.value("precision", "fp32");
  r.loss_scale = j.value("loss_scale", nlohmann::json());
  for (const auto& e : j.at("epochs")) {
    EpochResult x;
    x.epoch = e.at("epoch").get<int>();
    x.train_loss = e.at("train_loss").get<double>();
    x.train_accuracy = e.at("train_accuracy").get<double>();
    x.train_time = e.at("train_time").get<double>();
    x.train_throughput = e.at("train_throughput").get<double>();
    x.avg_batch_time = e.at("avg_batch_time").get<double>();
    x.val_loss = e.at("val_loss").get<double>();
    x.val_accuracy = e.at("val_accuracy").get<double>();
    x.avg_comm_time = e.value("avg_comm_time", 0.0);
    x.avg_comm_wait = e.value("avg_comm_wait", 0.0);
    x.avg_comm_time_pull = e.value("avg_comm_time_pull", 0.0);
    x.avg_comm_time_push = e.value("avg_comm_time_push", 0.0);
    x.comm_bytes = e.value("comm_bytes", 0.0);
    x.shares = e.value("shares", std::vector<double>{});
    const auto& p = e.at("pipeline");
    x.pipeline.stall_fraction = p.at("stall_fraction").get<double>();
    x.pipeline.data_busy_pct = p.at("data_busy_pct").get<double>();
    x.pipeline.model_busy_pct = p.at("model_busy_pct").get<double>();
    x.pipeline.mean_buffer_fill = p.at("mean_buffer_fill").get<double>();
    x.pipeline.bad_samples = p.at("bad_samples").get<int64_t>();
    r.epochs.push_back(x);
  }
  r.all_losses = j.at("all_losses").get<std::vector<double>>();
  for (const auto& p : j.at("timeline"))
    r.timeline.push_back({p.at("t").get<double>(), p.at("buffer_fill").get<double>(), p.at("data_busy").get<double>(),
                          p.at("model_busy").get<double>()});
  return r;
}

}  // namespace tandem::train
