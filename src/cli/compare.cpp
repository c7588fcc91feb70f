// `tandem compare`: the seed-002 experiment. Trains the same model on the same
// data with each method in turn (same seed, same per-rank batch), each as its
// own local job, then runs the report over the results directory.
#include <algorithm>
#include <iostream>
#include <memory>
#include <sstream>

#include "commands.h"
#include "tandem/report/report.h"
#include "tandem/util/check.h"
#include "train_options.h"

namespace tandem::cli {
namespace {

std::vector<std::string> split_csv(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

// The user's flags for `compare`, turned into flags for `train`: drop the
// ones compare owns (--methods, --out, --strategy, --output) and the subcommand name.
std::vector<std::string> forwarded_flags() {
  std::vector<std::string> out;
  const auto& args = original_args();
  bool seen_sub = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (!seen_sub) {
      if (a == "compare") seen_sub = true;
      continue;
    }
    bool owned = false;
    for (const char* f : {"--methods", "--out", "--strategy", "--output", "-o", "--no-report", "--ps-seed-layout"}) {
      std::string flag(f);
      if (a == flag) {
        owned = true;
        if (flag != "--no-report" && flag != "--ps-seed-layout") ++i;  // skip its value
      } else if (a.rfind(flag + "=", 0) == 0) {
        owned = true;
      }
    }
    if (!owned) out.push_back(a);
  }
  return out;
}

}  // namespace

void register_compare(CLI::App& app) {
  auto* sub = app.add_subcommand(
      "compare",
      "Train the same model with DDP, the ring all-reduce and the parameter server, one after another, "
      "then write the comparison report (seed 002's experiment)");
  auto f = std::make_shared<TrainFlags>();
  f->nproc = 2;
  auto methods = std::make_shared<std::string>("ddp,ring,ps");
  auto out = std::make_shared<std::string>("results");
  auto no_report = std::make_shared<bool>(false);
  auto seed_layout = std::make_shared<bool>(false);
  add_train_flags(sub, *f, /*with_strategy=*/false);
  sub->add_flag("--ps-seed-layout", *seed_layout,
                "Run ps on the same --nproc ranks as the others (servers among them, as in seed 002) instead of "
                "adding --ps-servers server processes so that every method trains with --nproc workers");
  sub->add_option("--methods", *methods, "Methods to run, in order: ddp, ring, ps (comma separated)")
      ->capture_default_str();
  sub->add_option("--out", *out, "Results directory")->capture_default_str();
  sub->add_flag("--no-report", *no_report, "Only train; skip `tandem report`");
  sub->footer("Example:\n  tandem compare --nproc 4 --epochs 3 --methods ddp,ring,ps --out results/");
  sub->callback([f, methods, out, no_report, seed_layout] {
    finalize_train_flags(*f);
    TANDEM_CHECK(f->opts.checkpoint_dir.empty() && f->opts.resume.empty() && f->opts.save.empty(),
                 "tandem compare trains several methods into one directory: --checkpoint-dir, --resume and --save "
                 "belong to `tandem train` (compare saves each method's weights as model_<method>.pt in --out)");
    auto list = split_csv(*methods);
    TANDEM_CHECK(!list.empty(), "--methods is empty: give e.g. ddp,ring,ps");
    for (const auto& m : list) {
      TANDEM_CHECK(m == "ddp" || m == "ring" || m == "ps", "--methods: unknown method '", m,
                   "': choose from ddp, ring, ps");
      // A flag only one method rejects fails now, not after the others trained.
      auto per_method = f->opts;
      per_method.strategy = m;
      train::validate(per_method);
    }
    // Every flag but --nproc and --threads goes to each method's `tandem train`
    // as given; those two are set per method below.
    std::vector<std::string> base;
    {
      auto all = forwarded_flags();
      for (size_t i = 0; i < all.size(); ++i) {
        if (all[i] == "--nproc" || all[i] == "--threads") { ++i; continue; }
        if (all[i].rfind("--nproc=", 0) == 0 || all[i].rfind("--threads=", 0) == 0) continue;
        base.push_back(all[i]);
      }
    }
    // Same compute per worker: the automatic thread count would otherwise
    // count the parameter server's extra processes.
    const int threads = f->opts.threads > 0 ? f->opts.threads : train::default_threads(f->nproc);
    for (const auto& m : list) {
      // Same training workers for every method: the parameter server's
      // processes come on top, so the global batch and the steps per epoch
      // match DDP's and sync PS is the same SGD (docs/algorithms.md).
      const int ranks = m == "ps" && !*seed_layout ? f->nproc + f->opts.ps_servers : f->nproc;
      std::cerr << "[tandem compare] method " << m << " on " << ranks << " local ranks"
                << (ranks != f->nproc ? " (" + std::to_string(f->opts.ps_servers) + " server + " +
                                            std::to_string(f->nproc) + " workers)"
                                      : std::string())
                << "\n";
      std::vector<std::string> args{"train"};
      args.insert(args.end(), base.begin(), base.end());
      for (const std::string& extra : {std::string("--strategy"), m, std::string("--output"), *out})
        args.push_back(extra);
      args.push_back("--nproc");
      args.push_back(std::to_string(ranks));
      args.push_back("--threads");
      args.push_back(std::to_string(threads));
      int code = relaunch_local(ranks, args, f->max_restarts);
      TANDEM_CHECK(code == 0, "tandem compare: method ", m, " failed (exit code ", code, "); see the messages above");
    }
    if (!*no_report) report::make_report(*out, report::ReportOptions{}, std::cout, std::cerr);
  });
}

}  // namespace tandem::cli
