// Charts of a report: data files plus one gnuplot script per PNG, all in
// DIR/plots/ so that a user can rerun or restyle them by hand.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "gnuplot.h"
#include "tandem/report/report.h"
#include "tandem/util/check.h"

namespace tandem::report {
namespace fs = std::filesystem;
using detail::gp_quote;

namespace {

const char* const kColors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};
std::string color(size_t i) { return kColors[i % (sizeof kColors / sizeof kColors[0])]; }
// The same colour, mostly transparent (pngcairo reads #AARRGGBB, AA = transparency).
std::string faint(size_t i) { return "#B0" + color(i).substr(1); }

std::string num(double v) {
  if (std::isnan(v)) return "NaN";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

// A round tic step (1, 2 or 5 times a power of ten) for about 6 tics up to max.
double nice_step(double max) {
  const double raw = max / 6, p = std::pow(10.0, std::floor(std::log10(raw))), m = raw / p;
  return p * (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10);
}

// Common preamble: 1000x600 PNG, no enhanced-text markup, so that method
// names with '_' or '^' print as written.
std::string preamble(const std::string& png, const std::string& title) {
  return "set terminal pngcairo noenhanced size 1000,600 font 'sans,11'\n"
         "set output " +
         gp_quote(png) +
         "\n"
         "set title " +
         gp_quote(title) +
         " font 'sans,14'\n"
         "set grid ytics lc rgb '#d0d0d0'\n"
         "set border 3\nset tics nomirror\n";
}

// Bars stand at x = 0..n-1 and are labelled with the run labels.
std::string method_axis(const std::vector<std::string>& labels) {
  std::string s = "set xrange [-0.6:" + num(labels.size() - 0.4) + "]\nset xtics (";
  for (size_t i = 0; i < labels.size(); ++i) s += (i ? ", " : "") + gp_quote(labels[i]) + " " + std::to_string(i);
  s += ")\n";
  if (labels.size() > 5) s += "set xtics rotate by 25 right\n";
  return s + "set xlabel 'method'\n";
}

// y range from 0 with headroom above the tallest bar for its value label and
// for the legend, which sits in one row at the top; tics stop at the data.
std::string bar_yrange(double max) {
  if (max <= 0) return "set yrange [0:1]\n";
  return "set yrange [0:" + num(max * 1.3) + "]\nset ytics 0, " + num(nice_step(max)) + ", " + num(max * 1.05) +
         "\nset key top center horizontal\n";
}

// summary.dat, one line per run: index, throughput (img/s), time per epoch
// (s), pull, push, all-reduce (ms per step; 0 where not applicable), and 1 if
// any communication time was recorded, else 0.
std::string summary_data(const std::vector<Run>& runs, const std::vector<std::string>& labels) {
  std::string s = "# index throughput_img_s time_per_epoch_s pull_ms push_ms all_reduce_ms has_comm  # label\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    const Run& r = runs[i];
    s += std::to_string(i) + " " + num(r.avg_train_throughput) + " " + num(r.avg_train_time_per_epoch) + " " +
         num(r.comm_pull.value_or(0) * 1e3) + " " + num(r.comm_push.value_or(0) * 1e3) + " " +
         num(r.comm_all_reduce.value_or(0) * 1e3) + " " +
         (r.comm_pull || r.comm_push || r.comm_all_reduce ? "1" : "0") + "  # " + labels[i] + "\n";
  }
  return s;
}

// One bar per run, in the run's colour and with its own legend entry, value
// printed on top with `fmt`.
std::string bar_chart(const std::vector<std::string>& labels, int column, double max, const std::string& fmt) {
  std::string s = method_axis(labels) + bar_yrange(max) +
                  "set style fill solid 0.85 border rgb '#404040'\nset boxwidth 0.6\n"
                  "plot \\\n";
  for (size_t i = 0; i < labels.size(); ++i) {
    s += "  'summary.dat' every ::" + std::to_string(i) + "::" + std::to_string(i) +
         " using 1:" + std::to_string(column) + " with boxes lc rgb '" + color(i) + "' title " + gp_quote(labels[i]) +
         ", \\\n";
  }
  return s + "  'summary.dat' using 1:" + std::to_string(column) + ":(sprintf(" + gp_quote(fmt) + ", $" +
         std::to_string(column) + ")) with labels offset 0,0.8 notitle\n";
}

std::string comm_chart(const std::vector<Run>& runs, const std::vector<std::string>& labels) {
  double max = 0;
  for (const auto& r : runs)
    max = std::max(max, (r.comm_pull.value_or(0) + r.comm_push.value_or(0) + r.comm_all_reduce.value_or(0)) * 1e3);
  std::string s = method_axis(labels) + bar_yrange(max) + "set ylabel 'communication time (ms per step)'\n";
  if (max <= 0) s += "set label 'no communication times recorded' at graph 0.5, 0.5 center\n";
  // Stacked by hand: pull from 0, push on top of pull, all-reduce on top of both.
  s += "set style fill solid 0.85 border rgb '#404040'\nw = 0.3\nplot \\\n"
       "  'summary.dat' using 1:($4/2):($1-w):($1+w):(0):($4) with boxxyerror lc rgb '#2ca02c' title 'Pull (PS)', \\\n"
       "  'summary.dat' using 1:($4+$5/2):($1-w):($1+w):($4):($4+$5) with boxxyerror lc rgb '#9467bd' "
       "title 'Push (PS)', \\\n"
       "  'summary.dat' using 1:($4+$5+$6/2):($1-w):($1+w):($4+$5):($4+$5+$6) with boxxyerror lc rgb '#1f77b4' "
       "title 'All-reduce (DDP, ring)', \\\n"
       "  'summary.dat' using 1:($4+$5+$6):($7 > 0 ? sprintf('%.2f ms', $4+$5+$6) : 'not recorded') with labels offset "
       "0,0.8 "
       "notitle\n";
  return s;
}

// Moving-average window for a loss curve of n steps: about 1/50 of the run.
size_t smoothing_window(size_t n) { return std::clamp<size_t>(n / 50, 1, 200); }

std::string loss_data(const std::vector<double>& losses) {
  const size_t w = smoothing_window(losses.size());
  std::string s = "# step loss moving_average_" + std::to_string(w) + "\n";
  double sum = 0;
  size_t count = 0;
  for (size_t i = 0; i < losses.size(); ++i) {
    if (!std::isnan(losses[i])) sum += losses[i], ++count;
    if (i >= w && !std::isnan(losses[i - w])) sum -= losses[i - w], --count;
    s += std::to_string(i + 1) + " " + num(losses[i]) + " " + num(count ? sum / count : NAN) + "\n";
  }
  return s;
}

std::string accuracy_data(const Run& r) {
  const double k = accuracy_scale(r);
  std::string s = "# epoch train_accuracy_pct val_accuracy_pct\n";
  for (const auto& e : r.result.epochs)
    s += std::to_string(e.epoch) + " " + num(e.train_accuracy * k) + " " + num(e.val_accuracy * k) + "\n";
  return s;
}

std::string timeline_data(const Run& r) {
  std::string s = "# t_s buffer_fill data_busy model_busy\n";
  for (const auto& p : r.result.timeline)
    s += num(p.t) + " " + num(p.buffer_fill) + " " + num(p.data_busy) + " " + num(p.model_busy) + "\n";
  return s;
}

// Two panels over a shared time axis: prefetch buffer fill on top, the busy
// share of model and data loaders below. Colour tells the run (legend on top),
// line style the kind of work (legend below); the legends sit in headroom
// above the curves, and the tics stop at the data.
std::string timeline_chart(const std::vector<Run>& runs, const std::vector<std::string>& labels,
                           const std::vector<size_t>& with_tl) {
  double max_fill = 0, max_busy = 0;
  for (size_t i : with_tl) {
    for (const auto& p : runs[i].result.timeline) {
      max_fill = std::max(max_fill, p.buffer_fill);
      max_busy = std::max({max_busy, p.data_busy, p.model_busy});
    }
  }
  if (max_fill <= 0) max_fill = 1;
  const double top = max_busy > 1 ? 100 : 1;            // shares written as percent or as fractions
  const double rows = std::ceil(with_tl.size() / 3.0);  // legend rows of the top panel
  std::string s = preamble("utilization_timeline.png", "") +
                  "unset title\nset multiplot layout 2,1 title 'Input pipeline utilization over time' font 'sans,14'\n"
                  "set lmargin 12\nset rmargin 4\nset key top center horizontal maxcols 3\nset xlabel ''\n"
                  "set ylabel 'prefetch buffer fill (batches)'\nset yrange [0:" +
                  num(max_fill * (1.2 + 0.13 * rows)) + "]\nset ytics 0, " + num(nice_step(max_fill)) + ", " +
                  num(max_fill * 1.05) + "\nplot \\\n";
  for (size_t k = 0; k < with_tl.size(); ++k) {
    const size_t i = with_tl[k];
    s += std::string(k ? ", \\\n" : "") + "  'timeline_" + std::to_string(i) +
         ".dat' using 1:2 with lines lw 2 lc rgb '" + color(i) + "' title " + gp_quote(labels[i]);
  }
  s += "\nset xlabel 'time since start (s)'\nset ylabel " +
       gp_quote(top > 1 ? "busy (% of time)" : "busy (fraction of time)") + "\nset yrange [0:" + num(top * 1.3) +
       "]\nset ytics 0, " + num(top / 5) + ", " + num(top) + "\nplot \\\n" +
       "  NaN with lines lw 2 lc rgb 'black' title 'model busy', \\\n"
       "  NaN with lines lw 2 dt 2 lc rgb 'black' title 'data loaders busy'";
  for (size_t i : with_tl) {
    const std::string f = "'timeline_" + std::to_string(i) + ".dat'";
    s += ", \\\n  " + f + " using 1:4 with lines lw 2 lc rgb '" + color(i) + "' notitle, \\\n  " + f +
         " using 1:3 with lines lw 2 dt 2 lc rgb '" + color(i) + "' notitle";
  }
  return s + "\nunset multiplot\n";
}

}  // namespace

PlotFiles write_plots(const std::vector<Run>& runs, const fs::path& plots_dir, const fs::path& gnuplot) {
  std::error_code ec;
  fs::create_directories(plots_dir, ec);
  TANDEM_CHECK(!ec, "cannot create plot directory '", plots_dir.string(), "': ", ec.message());
  const auto labels = run_labels(runs);
  PlotFiles files;
  auto data = [&](const std::string& name, const std::string& text) {
    detail::write_file(plots_dir / name, text);
    files.sources.push_back(plots_dir / name);
  };
  // (png, script text) in drawing order.
  std::vector<std::pair<std::string, std::string>> charts;
  data("summary.dat", summary_data(runs, labels));

  double max_tp = 0, max_time = 0;
  for (const auto& r : runs) max_tp = std::max(max_tp, r.avg_train_throughput);
  for (const auto& r : runs) max_time = std::max(max_time, r.avg_train_time_per_epoch);
  charts.emplace_back("throughput_comparison.png",
                      preamble("throughput_comparison.png", "Average training throughput per method") +
                          "set ylabel 'throughput (img/s, all ranks)'\n" + bar_chart(labels, 2, max_tp, "%.1f img/s"));
  charts.emplace_back("training_time_comparison.png",
                      preamble("training_time_comparison.png", "Average training time per epoch") +
                          "set ylabel 'time per epoch (s)'\n" + bar_chart(labels, 3, max_time, "%.2f s"));
  // Accuracy against bytes sent per step (runs that record bytes, log scale).
  {
    std::string d = "# KiB_per_step best_val_acc_pct index  # label\n";
    int points = 0;
    for (size_t i = 0; i < runs.size(); ++i) {
      const auto& r = runs[i];
      if (!r.comm_bytes || *r.comm_bytes <= 0) continue;
      d += num(*r.comm_bytes / 1024) + " " + num(r.best_val_accuracy * accuracy_scale(r)) + " " + std::to_string(i) +
           "  # " + labels[i] + "\n";
      ++points;
    }
    if (points > 0) {
      data("accuracy_bytes.dat", d);
      std::string plot = preamble("accuracy_vs_bytes.png", "Best validation accuracy against bytes sent per step") +
                         "set logscale x\nset xlabel 'sent per training rank per step (KiB, log scale)'\n"
                         "set ylabel 'best validation accuracy (%)'\nset key bottom right\nset offsets graph 0.1, graph 0.1, graph 0.1, graph 0.1\nplot ";
      bool first = true;
      for (size_t i = 0; i < runs.size(); ++i) {
        if (!runs[i].comm_bytes || *runs[i].comm_bytes <= 0) continue;
        plot += std::string(first ? "" : ", ") + "'accuracy_bytes.dat' using 1:($3 == " + std::to_string(i) +
                " ? $2 : 1/0) with points pt 7 ps 2 lc rgb '" + color(i) + "' title " + gp_quote(labels[i]);
        first = false;
      }
      charts.emplace_back("accuracy_vs_bytes.png", plot + "\n");
    }
  }
  charts.emplace_back(
      "communication_overhead.png",
      preamble("communication_overhead.png", "Communication time per training step") + comm_chart(runs, labels));

  // Loss: raw per-step loss faint, its moving average bold on top (long runs).
  std::vector<std::string> loss_plots;
  bool smoothed = false;
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& l = runs[i].result.all_losses;
    if (l.empty()) continue;
    const std::string f = "loss_" + std::to_string(i) + ".dat";
    data(f, loss_data(l));
    if (smoothing_window(l.size()) == 1) {
      loss_plots.push_back(gp_quote(f) + " using 1:2 with lines lw 2 lc rgb '" + color(i) + "' title " +
                           gp_quote(labels[i]));
    } else {
      smoothed = true;
      loss_plots.push_back(gp_quote(f) + " using 1:2 with lines lw 1 lc rgb '" + faint(i) + "' notitle");
      loss_plots.push_back(gp_quote(f) + " using 1:3 with lines lw 2.5 lc rgb '" + color(i) + "' title " +
                           gp_quote(labels[i]));
    }
  }
  std::string loss =
      preamble("loss_curves.png", smoothed ? "Training loss per step (faint: each step; bold: moving average)"
                                           : "Training loss per step") +
      "set xlabel 'training step'\nset ylabel 'training loss (mean over ranks)'\nset key top right opaque\n";
  if (loss_plots.empty()) {
    // An empty frame: gnuplot refuses a plot whose points are all undefined.
    loss +=
        "set label 'no per-step losses (all_losses) recorded' at graph 0.5, 0.5 center\n"
        "set xrange [0:1]\nset yrange [0:1]\n";
    loss_plots.push_back("-1 notitle");
  }
  std::string joined;
  for (size_t i = 0; i < loss_plots.size(); ++i) joined += (i ? ", \\\n  " : "  ") + loss_plots[i];
  charts.emplace_back("loss_curves.png", loss + "plot \\\n" + joined + "\n");

  // Accuracy: validation solid, training dashed (the title says so), one
  // colour per run. Accuracy rises over epochs, so the bottom right corner is
  // the emptiest for the key.
  size_t max_epoch = 0;
  for (const auto& r : runs) max_epoch = std::max(max_epoch, r.result.epochs.size());
  std::string acc = preamble("accuracy_curves.png",
                             "Accuracy per epoch (validation: solid, filled dots; training: dashed, open circles)") +
                    "set xlabel 'epoch'\nset ylabel 'accuracy (%)'\nset key bottom right opaque\n" +
                    (max_epoch <= 20 ? "set xtics 1\n" : "") +
                    "set offsets graph 0.02, graph 0.02, graph 0.05, graph 0.05\nplot \\\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    const std::string f = "accuracy_" + std::to_string(i) + ".dat";
    data(f, accuracy_data(runs[i]));
    acc += std::string(i ? ", \\\n" : "") + "  " + gp_quote(f) + " using 1:3 with linespoints lw 2 pt 7 lc rgb '" +
           color(i) + "' title " + gp_quote(labels[i]) + ", \\\n  " + gp_quote(f) +
           " using 1:2 with linespoints lw 2 dt 2 pt 6 lc rgb '" + color(i) + "' notitle";
  }
  charts.emplace_back("accuracy_curves.png", acc + "\n");

  // Utilization: buffer fill on top, data/model busy below, shared time axis.
  std::vector<size_t> with_tl;
  for (size_t i = 0; i < runs.size(); ++i) {
    if (runs[i].result.timeline.empty()) continue;
    with_tl.push_back(i);
    data("timeline_" + std::to_string(i) + ".dat", timeline_data(runs[i]));
  }
  if (!with_tl.empty()) charts.emplace_back("utilization_timeline.png", timeline_chart(runs, labels, with_tl));

  for (const auto& [png, script] : charts) {
    const std::string gp = fs::path(png).replace_extension(".gp").string();
    data(gp, script);
    fs::remove(plots_dir / png, ec);  // so a stale chart cannot pass for a new one
    detail::run_gnuplot(gnuplot, plots_dir, gp);
    TANDEM_CHECK(fs::file_size(plots_dir / png, ec) > 0 && !ec, "gnuplot ran ", (plots_dir / gp).string(),
                 " but wrote no ", (plots_dir / png).string());
    files.pngs.push_back(plots_dir / png);
  }
  return files;
}

}  // namespace tandem::report
