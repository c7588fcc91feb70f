// `tandem report DIR` end to end: read, print and save the text report, draw
// the charts.
#include <ostream>

#include "gnuplot.h"
#include "tandem/report/report.h"

namespace tandem::report {
namespace fs = std::filesystem;

ReportFiles make_report(const fs::path& dir, const ReportOptions& options, std::ostream& out, std::ostream& log) {
  ReportFiles files;
  const auto runs = read_results(dir, log);
  for (const auto& r : runs) files.inputs.push_back(r.file);

  const std::string text = format_report(runs);
  out << text << std::flush;
  files.text_report = dir / "performance_report.txt";
  detail::write_file(files.text_report, text);

  if (!options.plots) return files;
  // Without gnuplot the text report still stands; the charts are optional.
  const auto gnuplot = find_gnuplot();
  if (!gnuplot) {
    files.gnuplot_missing = true;
    log << "gnuplot not found: install it with `sudo apt-get install gnuplot-nox` to get the plots\n";
    return files;
  }
  auto plots = write_plots(runs, dir / "plots", *gnuplot);
  files.plots = std::move(plots.pngs);
  files.plot_sources = std::move(plots.sources);
  return files;
}

}  // namespace tandem::report
