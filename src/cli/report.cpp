// `tandem report DIR`: text report and charts comparing the runs in DIR.
#include "tandem/report/report.h"

#include <iostream>
#include <memory>

#include "commands.h"

namespace tandem::cli {

void register_report(CLI::App& app) {
  struct Args {
    std::string dir;
    bool no_plots = false;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand(
      "report",
      "Compare training runs: read every results JSON file in DIR (results_<method>.json, as `tandem train` "
      "writes them), print a report of throughput, time per epoch, best validation accuracy, speedup over DDP "
      "and communication time per step, save it as DIR/performance_report.txt and draw PNG charts into "
      "DIR/plots/ with gnuplot (throughput, epoch time, loss and accuracy curves, communication overhead, and "
      "the input-pipeline timeline when recorded). Files that are not valid results are skipped with a "
      "message.");
  cmd->add_option("DIR", args->dir, "Directory holding the results *.json files")
      ->required();  // a missing DIR is reported by the library, naming it
  cmd->add_flag("--no-plots", args->no_plots,
                "Only print and save the text report; do not run gnuplot (needed for the charts: "
                "`sudo apt-get install gnuplot-nox`)");
  cmd->callback([args] {
    report::ReportOptions options;
    options.plots = !args->no_plots;
    auto files = report::make_report(args->dir, options, std::cout, std::cerr);
    std::cout << "\nWrote " << files.text_report.string() << "\n";
    for (const auto& p : files.plots) std::cout << "Wrote " << p.string() << "\n";
  });
}

}  // namespace tandem::cli
