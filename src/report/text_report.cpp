// The text report: a training table and a communication table, columns
// aligned, plus the date range the runs cover.
#include <algorithm>
#include <cstdio>
#include <sstream>

#include "tandem/report/report.h"

namespace tandem::report {
namespace {

std::string fixed(double v, int decimals, const char* suffix = "") {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f%s", decimals, v, suffix);
  return buf;
}

// Milliseconds per step, or "-" where the method has no such communication.
std::string ms(const std::optional<double>& seconds) { return seconds ? fixed(*seconds * 1e3, 2) : "-"; }

// Plain text table: first column left-aligned, the rest right-aligned, a rule
// under the header.
class Table {
 public:
  explicit Table(std::vector<std::string> header) : rows_{std::move(header)} {}
  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }

  void print(std::ostream& os) const {
    std::vector<size_t> width(rows_[0].size(), 0);
    for (const auto& r : rows_)
      for (size_t c = 0; c < r.size(); ++c) width[c] = std::max(width[c], r[c].size());
    size_t total = 0;
    for (size_t w : width) total += w + 2;
    for (size_t i = 0; i < rows_.size(); ++i) {
      std::string line;
      for (size_t c = 0; c < rows_[i].size(); ++c) {
        const std::string& cell = rows_[i][c];
        std::string pad(width[c] - cell.size(), ' ');
        line += c == 0 ? cell + pad : "  " + pad + cell;
      }
      os << line << "\n";
      if (i == 0) os << std::string(total - 2, '-') << "\n";
    }
  }

 private:
  std::vector<std::vector<std::string>> rows_;
};

// Ranks that train: a parameter server's servers do not.
int training_workers(const Run& r) { return r.result.num_workers > 0 ? r.result.num_workers : r.result.world_size; }

// The DDP run that `run` is compared with: same number of training workers if
// there is one, else the first DDP run; nullptr without any DDP run.
const Run* ddp_reference(const std::vector<Run>& runs, const Run& run) {
  const Run* first = nullptr;
  for (const auto& r : runs) {
    if (r.result.method != "baseline_ddp") continue;
    if (training_workers(r) == training_workers(run)) return &r;
    if (!first) first = &r;
  }
  return first;
}

std::string date_range(const std::vector<Run>& runs) {
  // ISO-8601 strings of one writer sort in time order.
  std::string first, last;
  for (const auto& r : runs) {
    if (!r.result.start_time.empty() && (first.empty() || r.result.start_time < first)) first = r.result.start_time;
    if (!r.result.end_time.empty() && r.result.end_time > last) last = r.result.end_time;
  }
  if (first.empty() && last.empty()) return "dates not recorded";
  return (first.empty() ? "?" : first) + " to " + (last.empty() ? "?" : last);
}

}  // namespace

std::string format_report(const std::vector<Run>& runs) {
  const auto labels = run_labels(runs);
  std::ostringstream os;
  os << "Performance report: " << runs.size() << (runs.size() == 1 ? " run, " : " runs, ") << date_range(runs)
     << "\n\n";

  os << "Training\n";
  Table train({"Method", "World size", "Workers", "Throughput (img/s)", "Time/epoch (s)", "Best val acc (%)",
               "Speedup vs DDP"});
  bool have_ddp = false;
  for (size_t i = 0; i < runs.size(); ++i) {
    const Run& r = runs[i];
    const Run* ddp = ddp_reference(runs, r);
    have_ddp = have_ddp || ddp;
    std::string speedup =
        ddp && ddp->avg_train_throughput > 0 ? fixed(r.avg_train_throughput / ddp->avg_train_throughput, 2, "x") : "-";
    train.add({labels[i], std::to_string(r.result.world_size), std::to_string(training_workers(r)),
               fixed(r.avg_train_throughput, 1),
               fixed(r.avg_train_time_per_epoch, 2), fixed(r.best_val_accuracy * accuracy_scale(r), 2), speedup});
  }
  train.print(os);
  os << (have_ddp ? "Speedup: average training throughput over that of DDP (baseline) with as many training\n"
                    "workers, or of the first DDP run when none has as many.\n"
                  : "Speedup: no DDP (baseline) results (method baseline_ddp) to compare with.\n");

  os << "\nCommunication per step (ms)\n";
  Table comm({"Method", "Pull", "Push", "All-reduce", "Total"});
  for (size_t i = 0; i < runs.size(); ++i) {
    const Run& r = runs[i];
    std::optional<double> total;
    for (const auto& part : {r.comm_pull, r.comm_push, r.comm_all_reduce})
      if (part) total = total.value_or(0) + *part;
    comm.add({labels[i], ms(r.comm_pull), ms(r.comm_push), ms(r.comm_all_reduce), ms(total)});
  }
  comm.print(os);
  // Accuracy against bytes: what each way of communicating less costs.
  const Run* base = nullptr;
  for (const auto& r : runs)
    if (r.comm_bytes && *r.comm_bytes > 0 && r.result.method == "baseline_ddp" && variant_suffix(r).empty()) {
      base = &r;
      break;
    }
  bool any_bytes = false;
  for (const auto& r : runs) any_bytes = any_bytes || r.comm_bytes.has_value();
  if (any_bytes) {
    os << "\nAccuracy versus bytes sent\n";
    Table acc({"Method", "Best val acc (%)", "Sent per step (KiB)", "Fewer bytes than DDP", "Throughput (img/s)"});
    for (size_t i = 0; i < runs.size(); ++i) {
      const Run& r = runs[i];
      const bool known = r.comm_bytes.has_value();
      acc.add({labels[i], fixed(r.best_val_accuracy * accuracy_scale(r), 2),
               known ? fixed(*r.comm_bytes / 1024, 1) : "-",
               known && base && *r.comm_bytes > 0 ? fixed(*base->comm_bytes / *r.comm_bytes, 1, "x") : "-",
               fixed(r.avg_train_throughput, 1)});
    }
    acc.print(os);
    os << "Sent per step: bytes one training rank sends per step, as a ring moves them (an all-reduce of b bytes\n"
          "sends 2(N-1)/N x b, an all-gather (N-1) x b); compare with the uncompressed DDP run.\n";
  }
  os << "\nSources:\n";
  for (size_t i = 0; i < runs.size(); ++i) os << "  " << labels[i] << ": " << runs[i].file.string() << "\n";
  return os.str();
}

}  // namespace tandem::report
