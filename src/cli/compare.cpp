// `tandem compare`: the seed-002 experiment. Trains the same model on the same
// data with each method in turn (same seed, same per-rank batch), each as its
// own local job, then runs the report over the results directory.
#include <algorithm>
#include <filesystem>
#include <cctype>
#include <cstdlib>
#include <iostream>
#include <set>
#include <memory>
#include <sstream>

#include "commands.h"
#include "tandem/report/report.h"
#include "tandem/train/trainer.h"
#include "tandem/util/check.h"
#include "tandem/util/parse.h"
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

// One entry of --methods: a method and what it changes ("ddp:powersgd:2",
// "localsgd:8", "ps:ssp:2", "ring:int8").
struct Variant {
  std::string name;      // as given
  std::string strategy;  // ddp | ring | ps
  std::vector<std::pair<std::string, std::string>> flags;  // extra `train` flags
  bool plain() const { return flags.empty(); }
  // results_<label>.json, model_<label>.pt: the method's name, then the variant.
  std::string label() const {
    if (name == "pp") return "pp";
    std::string l = name.rfind("pp:", 0) == 0 ? "pp" : train::method_name(strategy);
    if (plain()) return l;
    std::string rest = name.substr(name.find(':') == std::string::npos ? name.size() : name.find(':') + 1);
    if (name.rfind("localsgd", 0) == 0) rest = "localsgd" + rest;
    for (char& c : rest)
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.') c = '_';
    return l + "_" + rest;
  }
  void apply(train::TrainOptions& o) const {
    o.strategy = strategy;
    for (const auto& [flag, value] : flags) {
      if (flag == "--compress") o.compress = value;
      else if (flag == "--sync-every") o.sync_every = std::atoi(value.c_str());
      else if (flag == "--ps-mode") o.ps_mode = value;
      else if (flag == "--staleness") o.staleness = std::atoi(value.c_str());
      else if (flag == "--pp") o.pp = std::atoi(value.c_str());
    }
  }
};

constexpr const char* kMethodsHelp =
    "ddp, ring, ps; ddp:C or ring:C with a --compress value C (ddp:powersgd:2, ring:int8, ddp:topk:0.01); "
    "localsgd:H (ddp with --sync-every H); ps:sync, ps:async, ps:ssp:S, or ps:C (a compressed push); "
    "pp or pp:K (the model cut into K pipeline stages, default 2, with --micro-batches and --schedule; "
    "--nproc a multiple of K)";

Variant parse_variant(const std::string& m) {
  const auto colon = m.find(':');
  const std::string base = m.substr(0, colon);
  const std::string rest = colon == std::string::npos ? "" : m.substr(colon + 1);
  Variant v{m, base, {}};
  auto whole = [&](const std::string& x) {
    const auto n = parse_whole(x);
    TANDEM_CHECK(n && *n >= 1, "--methods: '", m, "': ", x, " is not a whole number >= 1");
    return x;
  };
  if (base == "ddp" || base == "ring") {
    if (!rest.empty()) v.flags.push_back({"--compress", rest});
  } else if (base == "localsgd") {
    TANDEM_CHECK(!rest.empty(), "--methods: '", m, "' needs the steps between averages, e.g. localsgd:8");
    v.strategy = "ddp";
    v.flags.push_back({"--sync-every", whole(rest)});
  } else if (base == "pp") {
    v.strategy = "ddp";  // between the replicas of a stage, when --nproc > K
    v.flags.push_back({"--pp", rest.empty() ? "2" : whole(rest)});
  } else if (base == "ps") {
    if (rest == "sync" || rest == "async" || rest == "ssp") {
      v.flags.push_back({"--ps-mode", rest});
    } else if (rest.rfind("ssp:", 0) == 0) {
      v.flags.push_back({"--ps-mode", "ssp"});
      v.flags.push_back({"--staleness", whole(rest.substr(4))});
    } else if (!rest.empty()) {
      v.flags.push_back({"--compress", rest});
    }
  } else {
    TANDEM_FAIL("--methods: unknown method '", m, "': choose ", kMethodsHelp);
  }
  return v;
}

// `args` without the flags in `drop` (and their values).
std::vector<std::string> without_flags(const std::vector<std::string>& args, const std::set<std::string>& drop) {
  std::vector<std::string> out;
  for (size_t i = 0; i < args.size(); ++i) {
    const auto eq = args[i].find('=');
    if (drop.count(args[i])) {
      ++i;
      continue;
    }
    if (eq != std::string::npos && drop.count(args[i].substr(0, eq))) continue;
    out.push_back(args[i]);
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
  sub->add_option("--methods", *methods, std::string("Methods to run, in order, comma separated: ") + kMethodsHelp)
      ->capture_default_str();
  sub->add_option("--out", *out, "Results directory")->capture_default_str();
  sub->add_flag("--no-report", *no_report, "Only train; skip `tandem report`");
  sub->footer("Examples:\n  tandem compare --nproc 4 --epochs 3 --methods ddp,ring,ps --out results/\n"
              "  tandem compare --epochs 5 --methods ddp,ddp:powersgd:2,ddp:topk:0.01,ring:int8,localsgd:8,ps:ssp:2");
  sub->callback([f, methods, out, no_report, seed_layout] {
    finalize_train_flags(*f);
    TANDEM_CHECK(f->opts.checkpoint_dir.empty() && f->opts.resume.empty() && f->opts.save.empty(),
                 "tandem compare trains several methods into one directory: --checkpoint-dir, --resume and --save "
                 "belong to `tandem train` (compare saves each method's weights as model_<method>.pt in --out)");
    std::vector<Variant> list;
    for (const auto& m : split_csv(*methods)) list.push_back(parse_variant(m));
    TANDEM_CHECK(!list.empty(), "--methods is empty: give e.g. ddp,ring,ps");
    std::set<std::string> labels;
    for (const auto& v : list) {
      TANDEM_CHECK(labels.insert(v.label()).second, "--methods: '", v.name, "' is listed twice");
      // A flag only one method rejects fails now, not after the others trained.
      auto per_method = f->opts;
      v.apply(per_method);
      train::validate(per_method);
      TANDEM_CHECK(f->nproc % per_method.pp == 0, "--methods: '", v.name, "' cuts the model into ", per_method.pp,
                   " stages, which --nproc ", f->nproc, " is not a multiple of");
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
    for (const auto& v : list) {
      const std::string& m = v.strategy;
      // Same training workers for every method: the parameter server's
      // processes come on top, so the global batch and the steps per epoch
      // match DDP's and sync PS is the same SGD (docs/algorithms.md).
      const int ranks = m == "ps" && !*seed_layout ? f->nproc + f->opts.ps_servers : f->nproc;
      std::cerr << "[tandem compare] method " << v.name << " on " << ranks << " local ranks"
                << (ranks != f->nproc ? " (" + std::to_string(f->opts.ps_servers) + " server + " +
                                            std::to_string(f->nproc) + " workers)"
                                      : std::string())
                << "\n";
      std::vector<std::string> args{"train"};
      // The variant's own flags replace the user's of the same name.
      std::set<std::string> own;
      for (const auto& fv : v.flags) own.insert(fv.first);
      for (const auto& a : without_flags(base, own)) args.push_back(a);
      for (const auto& fv : v.flags) {
        args.push_back(fv.first);
        args.push_back(fv.second);
      }
      args.push_back("--strategy");
      args.push_back(m);
      args.push_back("--output");
      if (v.plain()) {
        args.push_back(*out);  // results_<method>.json, model_<method>.pt
      } else {
        args.push_back((std::filesystem::path(*out) / ("results_" + v.label() + ".json")).string());
        args.push_back("--save");
        args.push_back((std::filesystem::path(*out) / ("model_" + v.label() + ".pt")).string());
      }
      args.push_back("--nproc");
      args.push_back(std::to_string(ranks));
      args.push_back("--threads");
      args.push_back(std::to_string(threads));
      int code = relaunch_local(ranks, args, f->max_restarts);
      TANDEM_CHECK(code == 0, "tandem compare: method ", v.name, " failed (exit code ", code, "); see the messages above");
    }
    if (!*no_report) report::make_report(*out, report::ReportOptions{}, std::cout, std::cerr);
  });
}

}  // namespace tandem::cli
