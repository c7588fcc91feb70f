#pragma once
// `tandem report DIR`: compare the training runs whose results JSON files
// (schema: tandem/train/results.h) lie in DIR.
//
//  - read_results() loads every DIR/*.json that carries the required fields;
//    the others are skipped with a line on `log` naming the file and the field.
//  - format_report() renders the text report: one table of throughput, epoch
//    time, accuracy and speedup over DDP, one of communication time per step.
//  - write_plots() draws PNG charts with gnuplot into DIR/plots/.
//  - make_report() does all three and writes DIR/performance_report.txt.
#include <filesystem>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "tandem/train/results.h"

namespace tandem::report {

// One usable results file. Accuracies are kept as written; accuracy_scale()
// says how to show them in percent.
struct Run {
  std::filesystem::path file;
  train::RunResult result;  // method, sizes, times, epochs, losses, timeline
  // "summary" block. Communication times are seconds per step and absent
  // when the file (summary and epochs) has none of that kind.
  double avg_train_throughput = 0;      // img/s
  double avg_train_time_per_epoch = 0;  // s
  double best_val_accuracy = 0;
  std::optional<double> comm_all_reduce;  // avg_comm_time (ddp, ring)
  std::optional<double> comm_pull;        // avg_comm_time_pull (ps)
  std::optional<double> comm_push;        // avg_comm_time_push (ps)
  std::optional<double> comm_bytes;       // bytes sent per rank per step, mean over epochs (absent in older files)
};

// Display name of a method: "DDP (baseline)", "Ring all-reduce",
// "Parameter server"; any other method is shown as written.
std::string display_name(const std::string& method);

// Report order: baseline_ddp, all_reduce, ps, then other methods
// alphabetically; ties by world size, then file name.
bool report_order(const Run& a, const Run& b);

// What a run changed from its method's plain form, from its config:
// " powersgd:2", " local SGD H=8", " ssp:2", " balanced"; "" for none.
std::string variant_suffix(const Run& run);
// Label of each run in tables and legends, parallel to `runs`: the display
// name and its variant_suffix; runs that share that get " (N=<world size>)"
// when that tells them apart, else " (<file name>)".
std::vector<std::string> run_labels(const std::vector<Run>& runs);

// Factor that turns this run's accuracies into percent: 100 when every
// accuracy in the file is within [0, 1] (a fraction), else 1 (already %).
double accuracy_scale(const Run& run);

// Parses one results document. Throws tandem::Error naming the missing or
// ill-typed field (e.g. "epochs[2].val_loss"); `file` is only recorded.
Run parse_run(const nlohmann::json& doc, const std::filesystem::path& file);

// Loads DIR/*.json (not recursive), in report_order(). Unreadable, malformed
// or partial files are skipped with one line on `log` naming file and field.
// Throws tandem::Error naming DIR when it is missing, not a directory, or no
// usable file remains.
std::vector<Run> read_results(const std::filesystem::path& dir, std::ostream& log);

// The text report for `runs` (in the order given; see report_order).
std::string format_report(const std::vector<Run>& runs);

// Absolute path of the gnuplot executable found on PATH, if any.
std::optional<std::filesystem::path> find_gnuplot();

// Writes the data files and one gnuplot script per chart into `plots_dir`
// (created if needed) and runs `gnuplot` on each script with `plots_dir` as
// the working directory, so the scripts can be rerun or edited by hand there.
// Charts: throughput_comparison, training_time_comparison, loss_curves,
// accuracy_curves, communication_overhead, and utilization_timeline when some
// run has a non-empty timeline. Throws tandem::Error when gnuplot exits
// non-zero (with its stderr) or leaves a PNG missing or empty.
struct PlotFiles {
  std::vector<std::filesystem::path> pngs;     // the charts
  std::vector<std::filesystem::path> sources;  // data files and .gp scripts
};
PlotFiles write_plots(const std::vector<Run>& runs, const std::filesystem::path& plots_dir,
                      const std::filesystem::path& gnuplot);

struct ReportOptions {
  bool plots = true;
};

struct ReportFiles {
  std::filesystem::path text_report;                // DIR/performance_report.txt
  std::vector<std::filesystem::path> plots;         // PNGs written into DIR/plots/
  std::vector<std::filesystem::path> plot_sources;  // their data files and scripts
  std::vector<std::filesystem::path> inputs;        // results files used
  bool gnuplot_missing = false;                     // plots wanted, gnuplot not on PATH
};

// The whole `tandem report DIR`: prints the text report on `out`, writes it to
// DIR/performance_report.txt and, unless options.plots is false, the charts
// into DIR/plots/. Skipped inputs and the "gnuplot not found" hint go to `log`.
ReportFiles make_report(const std::filesystem::path& dir, const ReportOptions& options, std::ostream& out,
                        std::ostream& log);

}  // namespace tandem::report
