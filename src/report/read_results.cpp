// Reading results JSON files into report::Run, with a field-precise message
// for each file that cannot be used.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <set>

#include "tandem/report/report.h"
#include "tandem/util/check.h"

namespace tandem::report {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Field access that names the field by its full path ("epochs[2].val_loss")
// in the tandem::Error it throws, so the skip message can point at it.
const json& require(const json& obj, const char* key, const std::string& path) {
  auto it = obj.find(key);
  TANDEM_CHECK(it != obj.end(), "missing field '", path, key, "'");
  return *it;
}

double as_number(const json& v, const std::string& name) {
  TANDEM_CHECK(v.is_number(), "field '", name, "' is ", v.type_name(), ", expected a number");
  return v.get<double>();
}

int as_int(const json& v, const std::string& name) {
  TANDEM_CHECK(v.is_number_integer(), "field '", name, "' is ", v.type_name(), ", expected an integer");
  return v.get<int>();
}

double number(const json& obj, const char* key, const std::string& path) {
  return as_number(require(obj, key, path), path + key);
}

int integer(const json& obj, const char* key, const std::string& path) {
  return as_int(require(obj, key, path), path + key);
}

std::string string_field(const json& obj, const char* key, const std::string& path) {
  const json& v = require(obj, key, path);
  TANDEM_CHECK(v.is_string(), "field '", path, key, "' is ", v.type_name(), ", expected a string");
  return v.get<std::string>();
}

// Optional fields: absent or null (how nlohmann writes NaN) means "not there";
// present with another type makes the file unusable like a required one.
std::optional<double> opt_number(const json& obj, const char* key, const std::string& path) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::nullopt;
  return as_number(*it, path + key);
}

const json* opt_object(const json& obj, const char* key, const std::string& path) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  TANDEM_CHECK(it->is_object(), "field '", path, key, "' is ", it->type_name(), ", expected an object");
  return &*it;
}

const json* opt_array(const json& obj, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  TANDEM_CHECK(it->is_array(), "field '", key, "' is ", it->type_name(), ", expected an array");
  return &*it;
}

train::EpochResult parse_epoch(const json& e, const std::string& path) {
  TANDEM_CHECK(e.is_object(), "field '", path, "' is ", e.type_name(), ", expected an object");
  const std::string p = path + ".";
  train::EpochResult r;
  r.epoch = integer(e, "epoch", p);
  r.train_loss = number(e, "train_loss", p);
  r.train_accuracy = number(e, "train_accuracy", p);
  r.train_time = number(e, "train_time", p);
  r.train_throughput = number(e, "train_throughput", p);
  r.val_loss = number(e, "val_loss", p);
  r.val_accuracy = number(e, "val_accuracy", p);
  r.avg_batch_time = opt_number(e, "avg_batch_time", p).value_or(0);
  if (const json* pl = opt_object(e, "pipeline", p)) {
    const std::string pp = p + "pipeline.";
    r.pipeline.stall_fraction = opt_number(*pl, "stall_fraction", pp).value_or(0);
    r.pipeline.data_busy_pct = opt_number(*pl, "data_busy_pct", pp).value_or(0);
    r.pipeline.model_busy_pct = opt_number(*pl, "model_busy_pct", pp).value_or(0);
    r.pipeline.mean_buffer_fill = opt_number(*pl, "mean_buffer_fill", pp).value_or(0);
  }
  return r;
}

// A communication time per step: the summary's value, else the mean over the
// epochs that carry it (older files put it only per epoch), else absent.
std::optional<double> comm_time(const json& doc, const json& summary, const char* key) {
  if (auto v = opt_number(summary, key, "summary.")) return v;
  const json& epochs = doc.at("epochs");
  double sum = 0;
  int n = 0;
  for (size_t i = 0; i < epochs.size(); ++i) {
    if (auto v = opt_number(epochs[i], key, "epochs[" + std::to_string(i) + "].")) {
      sum += *v;
      ++n;
    }
  }
  if (n == 0) return std::nullopt;
  return sum / n;
}

int method_rank(const std::string& m) {
  if (m == "baseline_ddp") return 0;
  if (m == "all_reduce") return 1;
  if (m == "ps") return 2;
  if (m == "pp") return 3;
  return 4;
}

}  // namespace

std::string display_name(const std::string& method) {
  if (method == "baseline_ddp") return "DDP (baseline)";
  if (method == "all_reduce") return "Ring all-reduce";
  if (method == "ps") return "Parameter server";
  if (method == "pp") return "Pipeline stages";
  // Any other name is shown as written, on one line (tables, chart labels).
  std::string name = method;
  for (char& c : name)
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  return name;
}

bool report_order(const Run& a, const Run& b) {
  const auto& ra = a.result;
  const auto& rb = b.result;
  return std::make_tuple(method_rank(ra.method), ra.method, ra.world_size, a.file.filename().string()) <
         std::make_tuple(method_rank(rb.method), rb.method, rb.world_size, b.file.filename().string());
}

std::string variant_suffix(const Run& run) {
  const auto& c = run.result.config;
  if (!c.is_object()) return "";
  auto str = [&](const char* k) { return c.contains(k) && c[k].is_string() ? c[k].get<std::string>() : std::string(); };
  auto num = [&](const char* k) { return c.contains(k) && c[k].is_number() ? c[k].get<double>() : 0.0; };
  std::string s;
  if (const auto comp = str("compress"); !comp.empty() && comp != "none") s += " " + comp;
  if (num("sync_every") > 1) s += " local SGD H=" + std::to_string(static_cast<int64_t>(num("sync_every")));
  if (const auto mode = str("ps_mode"); !mode.empty() && mode != "sync")
    s += " " + mode + (mode == "ssp" ? ":" + std::to_string(static_cast<int64_t>(num("staleness"))) : "");
  if (str("balance") == "auto") s += " balanced";
  if (num("pp") > 1)
    s += " " + std::to_string(static_cast<int64_t>(num("pp"))) + " stages " + str("schedule") + " M=" +
         std::to_string(static_cast<int64_t>(num("micro_batches")));
  return s;
}

std::vector<std::string> run_labels(const std::vector<Run>& runs) {
  // Runs sharing a display name are told apart by world size when that is
  // unique among them, else by file name.
  std::map<std::string, std::vector<size_t>> groups;
  for (size_t i = 0; i < runs.size(); ++i)
    groups[display_name(runs[i].result.method) + variant_suffix(runs[i])].push_back(i);
  std::vector<std::string> labels(runs.size());
  for (const auto& [name, members] : groups) {
    std::set<int> worlds;
    for (size_t i : members) worlds.insert(runs[i].result.world_size);
    for (size_t i : members) {
      labels[i] = name;
      if (members.size() < 2) continue;
      labels[i] += worlds.size() == members.size() ? " (N=" + std::to_string(runs[i].result.world_size) + ")"
                                                   : " (" + runs[i].file.filename().string() + ")";
    }
  }
  return labels;
}

double accuracy_scale(const Run& run) {
  auto fraction = [](double a) { return a >= 0 && a <= 1; };
  bool all = fraction(run.best_val_accuracy);
  for (const auto& e : run.result.epochs) all = all && fraction(e.train_accuracy) && fraction(e.val_accuracy);
  return all ? 100.0 : 1.0;
}

Run parse_run(const json& doc, const fs::path& file) {
  TANDEM_CHECK(doc.is_object(), "top level is ", doc.type_name(), ", expected an object");
  Run run;
  run.file = file;
  auto& r = run.result;
  r.method = string_field(doc, "method", "");
  TANDEM_CHECK(!r.method.empty(), "field 'method' is empty");
  r.world_size = integer(doc, "world_size", "");
  TANDEM_CHECK(r.world_size >= 1, "field 'world_size' is ", r.world_size, ", expected >= 1");
  r.batch_size = integer(doc, "batch_size", "");
  TANDEM_CHECK(r.batch_size >= 1, "field 'batch_size' is ", r.batch_size, ", expected >= 1");
  if (auto it = doc.find("num_workers"); it != doc.end() && !it->is_null()) r.num_workers = as_int(*it, "num_workers");
  for (auto [key, out] : {std::pair{"start_time", &r.start_time}, std::pair{"end_time", &r.end_time}}) {
    if (auto it = doc.find(key); it != doc.end() && !it->is_null()) *out = string_field(doc, key, "");
  }

  const json& epochs = require(doc, "epochs", "");
  TANDEM_CHECK(epochs.is_array(), "field 'epochs' is ", epochs.type_name(), ", expected an array");
  TANDEM_CHECK(!epochs.empty(), "field 'epochs' is empty");
  for (size_t i = 0; i < epochs.size(); ++i)
    r.epochs.push_back(parse_epoch(epochs[i], "epochs[" + std::to_string(i) + "]"));

  const json& summary = require(doc, "summary", "");
  TANDEM_CHECK(summary.is_object(), "field 'summary' is ", summary.type_name(), ", expected an object");
  run.avg_train_throughput = number(summary, "avg_train_throughput", "summary.");
  run.avg_train_time_per_epoch = number(summary, "avg_train_time_per_epoch", "summary.");
  run.best_val_accuracy = number(summary, "best_val_accuracy", "summary.");
  run.comm_all_reduce = comm_time(doc, summary, "avg_comm_time");
  run.comm_pull = comm_time(doc, summary, "avg_comm_time_pull");
  run.comm_push = comm_time(doc, summary, "avg_comm_time_push");
  if (auto it = doc.find("config"); it != doc.end() && it->is_object()) r.config = *it;
  {
    double sum = 0;
    int n = 0;
    for (size_t i = 0; i < epochs.size(); ++i)
      if (auto v = opt_number(epochs[i], "comm_bytes", "epochs[" + std::to_string(i) + "].")) sum += *v, ++n;
    if (n > 0) run.comm_bytes = sum / n;
  }

  if (const json* losses = opt_array(doc, "all_losses")) {
    for (size_t i = 0; i < losses->size(); ++i) {
      const json& v = (*losses)[i];
      // A diverged step is written as null (NaN); keep its place in the curve.
      r.all_losses.push_back(v.is_null() ? std::nan("") : as_number(v, "all_losses[" + std::to_string(i) + "]"));
    }
  }
  if (const json* timeline = opt_array(doc, "timeline")) {
    for (size_t i = 0; i < timeline->size(); ++i) {
      const std::string p = "timeline[" + std::to_string(i) + "].";
      const json& t = (*timeline)[i];
      TANDEM_CHECK(t.is_object(), "field '", p.substr(0, p.size() - 1), "' is ", t.type_name(), ", expected an object");
      r.timeline.push_back(
          {number(t, "t", p), number(t, "buffer_fill", p), number(t, "data_busy", p), number(t, "model_busy", p)});
    }
  }
  return run;
}

std::vector<Run> read_results(const fs::path& dir, std::ostream& log) {
  std::error_code ec;
  TANDEM_CHECK(fs::exists(dir, ec), "results directory '", dir.string(), "' does not exist");
  TANDEM_CHECK(fs::is_directory(dir, ec), "results path '", dir.string(), "' is not a directory");

  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.is_regular_file() && entry.path().extension() == ".json") files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());

  std::vector<Run> runs;
  for (const auto& f : files) {
    try {
      std::ifstream in(f);
      TANDEM_CHECK(in, "cannot be opened");
      json doc;
      try {
        doc = json::parse(in);
      } catch (const json::exception& e) {
        TANDEM_FAIL("not valid JSON (", e.what(), ")");
      }
      runs.push_back(parse_run(doc, f));
    } catch (const Error& e) {
      log << "tandem report: skipping " << f.string() << ": " << e.what() << "\n";
    }
  }
  TANDEM_CHECK(!runs.empty(), "no usable results file in '", dir.string(), "': ",
               files.empty() ? "it holds no *.json file"
                             : "all " + std::to_string(files.size()) + " *.json files were skipped (reasons above)",
               "; point `tandem report` at the directory the trainer wrote results_<method>.json into");
  std::sort(runs.begin(), runs.end(), report_order);
  return runs;
}

}  // namespace tandem::report
