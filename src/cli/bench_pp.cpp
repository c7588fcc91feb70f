// `tandem bench pp`: a synthetic model of K equal pipeline stages, so that
// the measured bubble can be set against (K-1)/(M+K-1) without imbalance,
// and the schedules' peak activation memory against each other.
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <memory>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "commands.h"
#include "tandem/comm/rendezvous.h"
#include "tandem/launch/launcher.h"
#include "tandem/pp/pipeline.h"
#include "tandem/util/check.h"
#include "train_options.h"

namespace tandem::cli {
namespace {

struct BenchPpArgs {
  int stages = 2, micro_batches = 8, layers = 4, steps = 20, warmup = 3, repeats = 3;
  int64_t width = 1024, micro_rows = 32;
  std::string schedules = "gpipe,1f1b", comm = "auto", json, trace;
  double timeout_s = 300;
};

// K x L blocks of linear(width, width) + relu: every stage the same work.
models::Model synthetic_model(const BenchPpArgs& a) {
  auto seq = std::make_shared<torch::nn::Module>("BenchPipeline");
  models::Model m;
  m.module = seq;
  for (int i = 0; i < a.stages * a.layers; ++i) {
    auto lin = seq->register_module("fc" + std::to_string(i), torch::nn::Linear(a.width, a.width));
    m.blocks.push_back({"fc" + std::to_string(i), [l = lin](const at::Tensor& x) { return torch::relu(l->forward(x)); },
                        {lin}});
  }
  m.forward = [blocks = m.blocks](const at::Tensor& x) {
    at::Tensor y = x;
    for (const auto& b : blocks) y = b.forward(y);
    return y;
  };
  return m;
}

struct Measured {
  std::string schedule;
  pp::ScheduleKind kind;
  std::vector<double> busy, span;  // per stage, summed over timed steps and repeats (busy: from `ops`)
  std::vector<double> ops;         // this rank's op times, timed step after timed step
  std::vector<int64_t> peak;       // per stage
};

void run_bench_pp(const BenchPpArgs& a) {
  TANDEM_CHECK(a.stages >= 2, "--stages must be >= 2, got ", a.stages);
  TANDEM_CHECK(a.micro_batches >= 1, "--micro-batches must be >= 1, got ", a.micro_batches);
  TANDEM_CHECK(a.layers >= 1 && a.width >= 1 && a.micro_rows >= 1, "--layers, --width and --micro-rows must be >= 1");
  TANDEM_CHECK(a.steps >= 1 && a.warmup >= 0 && a.repeats >= 1, "--steps and --repeats must be >= 1, --warmup >= 0");
  std::vector<pp::ScheduleKind> kinds;
  {
    std::stringstream ss(a.schedules);
    std::string k;
    while (std::getline(ss, k, ','))
      if (!k.empty()) {
        const auto kind = pp::parse_schedule(k);
        TANDEM_CHECK(std::find(kinds.begin(), kinds.end(), kind) == kinds.end(), "--schedule: ", k, " is listed twice");
        kinds.push_back(kind);
      }
    TANDEM_CHECK(!kinds.empty(), "--schedule: give gpipe, 1f1b or both (gpipe,1f1b)");
  }
  if (!in_job()) {
    int code = relaunch_local(a.stages, original_args());
    if (code != 0) std::exit(code);
    return;
  }
  comm::RendezvousOptions ro;
  ro.timeout = comm::Milliseconds(static_cast<int64_t>(a.timeout_s * 1000));
  ro.comm = a.comm;
  ro.verbose = true;
  ro.shm_spin_ns = 0;  // as `train --pp` does
  auto comm = comm::init_from_env(ro);
  TANDEM_CHECK(comm->size() == a.stages, "bench pp: ", comm->size(), " ranks for --stages ", a.stages,
               "; start exactly one rank per stage");
  const int K = a.stages, rank = comm->rank();
  torch::set_num_threads(std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / K));
  torch::manual_seed(0);
  const int64_t rows = a.micro_rows * a.micro_batches;
  // The input asks for its gradient, so that stage 0's backward does the
  // same work as the others' (its first layer's input gradient too).
  auto x = torch::randn({rows, a.width}).requires_grad_(true);
  auto y = torch::randint(a.width, {rows}, torch::kLong);

  // One pipeline per schedule, over the same model; runs interleaved by repeat.
  auto model = synthetic_model(a);
  obs::Trace trace(!a.trace.empty(), rank);
  std::vector<std::unique_ptr<pp::Pipeline>> pipes;
  std::vector<Measured> res;
  for (auto k : kinds) {
    pp::PipelineOptions po;
    po.stages = K;
    po.micro_batches = a.micro_batches;
    po.schedule = k;
    po.balance = "params";  // equal blocks: an equal cut
    po.name = std::string("bench.") + pp::schedule_name(k);
    po.trace = trace.enabled() ? &trace : nullptr;
    pipes.push_back(std::make_unique<pp::Pipeline>(model, comm, po, std::vector<int64_t>{a.width}));
    res.push_back({pp::schedule_name(k), k, std::vector<double>(K, 0.0), std::vector<double>(K, 0.0), {},
                   std::vector<int64_t>(K, 0)});
  }
  for (int r = 0; r < a.repeats; ++r)
    for (size_t i = 0; i < pipes.size(); ++i) {
      for (int s = 0; s < a.warmup + a.steps; ++s) {
        auto st = pipes[i]->step(rows, x, y, at::Tensor());
        if (s < a.warmup) continue;
        res[i].ops.insert(res[i].ops.end(), st.op_s.begin(), st.op_s.end());
        res[i].span[rank] += st.span_s;
        res[i].peak[rank] = std::max(res[i].peak[rank], st.peak_activation_bytes);
      }
      comm->barrier();  // the next schedule starts together
    }
  // Every stage's op times of every timed step, for the simulation below.
  const int64_t ops_per_step = 2 * static_cast<int64_t>(a.micro_batches);
  const int64_t timed = static_cast<int64_t>(a.steps) * a.repeats;
  std::vector<at::Tensor> all_ops;
  for (auto& m : res) {
    auto t = torch::zeros({2, K}, torch::kFloat64);
    t[0][rank] = m.span[rank];
    t[1][rank] = static_cast<double>(m.peak[rank]);
    comm->all_reduce(t);
    for (int s = 0; s < K; ++s) {
      m.span[s] = t[0][s].item<double>();
      m.peak[s] = static_cast<int64_t>(t[1][s].item<double>());
    }
    TANDEM_CHECK(static_cast<int64_t>(m.ops.size()) == timed * ops_per_step, "bench pp: ", m.ops.size(),
                 " op times for ", timed, " steps of ", ops_per_step, " ops");
    auto o = torch::zeros({K, timed, ops_per_step}, torch::kFloat64);
    o[rank].copy_(torch::from_blob(m.ops.data(), {timed, ops_per_step}, torch::kFloat64));
    comm->all_reduce(o);
    for (int s = 0; s < K; ++s) m.busy[s] = o[s].sum().item<double>();
    all_ops.push_back(o);
  }
  comm->barrier();
  if (trace.enabled()) {
    auto dot = a.trace.rfind(".json");
    trace.write((dot == std::string::npos ? a.trace : a.trace.substr(0, dot)) + ".rank" + std::to_string(rank) + ".json");
  }
  if (rank != 0) return;

  const double theory = pp::theory_bubble(K, a.micro_batches);
  nlohmann::json out{{"stages", K},       {"micro_batches", a.micro_batches}, {"micro_rows", a.micro_rows},
                     {"width", a.width},  {"layers_per_stage", a.layers},     {"steps", a.steps * a.repeats},
                     {"comm", comm->backend()}, {"theory_bubble", theory},    {"schedules", nlohmann::json::array()}};
  std::printf("# bench pp: %d stages x %d linear(%lld) layers, M = %d micro-batches of %lld rows, %d steps x %d, %s\n",
              K, a.layers, static_cast<long long>(a.width), a.micro_batches, static_cast<long long>(a.micro_rows),
              a.steps, a.repeats, comm->backend().c_str());
  std::printf("# free-message bubble: the schedule simulated at the measured op times, averaged (stage speeds) and\n"
              "# step by step (op times); the measured bubble's excess over the latter is messaging\n");
  std::printf("%-8s %10s %10s %10s %14s %13s %13s %12s  %s\n", "schedule", "bubble", "theory", "rel.diff", "slowest stage",
              "stage speeds", "op times", "step ms", "peak activations per stage (MiB)");
  for (const auto& m : res) {
    double bubble = 0, span = 0, slowest_busy = -1, slowest_bubble = 0;
    // The schedule with free messages at the measured op times: each op at
    // its mean over the steps (the stages' unequal speeds), and each step
    // at its own (their variation too). What the measured bubble has above
    // the second is messaging: transfers and wake-ups.
    const auto sched = pp::make_schedule(m.kind, K, a.micro_batches);
    const auto& o = all_ops[static_cast<size_t>(&m - res.data())];
    auto mean_bubble = [&](const at::Tensor& per_op) {  // [K, ops_per_step]
      std::vector<std::vector<double>> op_s(K);
      for (int s = 0; s < K; ++s) {
        auto row = per_op[s].contiguous();
        op_s[s].assign(row.data_ptr<double>(), row.data_ptr<double>() + ops_per_step);
      }
      double mean = 0;
      for (double e : pp::simulate_bubble(sched, op_s)) mean += e / K;
      return mean;
    };
    const double at_speeds = mean_bubble(o.mean(1));
    double at_op_times = 0;
    for (int64_t i = 0; i < timed; ++i) at_op_times += mean_bubble(o.select(1, i)) / static_cast<double>(timed);
    nlohmann::json per = nlohmann::json::array();
    std::string peaks;
    for (int s = 0; s < K; ++s) {
      const double b = 1.0 - m.busy[s] / m.span[s];
      bubble += b / K;
      span = std::max(span, m.span[s]);
      // Identical stages still run at different speeds on a noisy host; the
      // slowest sets the step, and its idle is the schedule's own.
      if (m.busy[s] > slowest_busy) {
        slowest_busy = m.busy[s];
        slowest_bubble = b;
      }
      per.push_back({{"stage", s}, {"bubble_fraction", b}, {"peak_activation_bytes", m.peak[s]},
                     {"busy_per_step_s", m.busy[s] / (a.steps * a.repeats)}});
      char buf[32];
      std::snprintf(buf, sizeof buf, "%s%.2f", s ? " " : "", m.peak[s] / 1048576.0);
      peaks += buf;
    }
    const double rel = (bubble - theory) / theory;
    std::printf("%-8s %10.4f %10.4f %+9.1f%% %8.4f %+4.0f%% %13.4f %13.4f %12.2f  %s\n", m.schedule.c_str(), bubble,
                theory, 100 * rel, slowest_bubble, 100 * (slowest_bubble - theory) / theory, at_speeds, at_op_times,
                1e3 * span / (a.steps * a.repeats), peaks.c_str());
    out["schedules"].push_back({{"schedule", m.schedule}, {"bubble_fraction", bubble}, {"relative_to_theory", rel},
                                {"slowest_stage_bubble", slowest_bubble}, {"free_message_bubble_at_stage_speeds", at_speeds},
                                {"free_message_bubble_at_op_times", at_op_times},
                                {"step_s", span / (a.steps * a.repeats)}, {"per_stage", per}});
  }
  if (res.size() == 2) {
    // 1F1B holds at most K micro-batches where GPipe holds M.
    const auto& g = res[0].schedule == "gpipe" ? res[0] : res[1];
    const auto& f = res[0].schedule == "gpipe" ? res[1] : res[0];
    double worst = 0;
    for (int s = 0; s < K; ++s)
      worst = std::max(worst, static_cast<double>(f.peak[s]) / static_cast<double>(std::max<int64_t>(1, g.peak[s])));
    const double bound = static_cast<double>(K) / a.micro_batches;
    std::printf("peak activations 1f1b / gpipe: %.3f at most over the stages (K/M = %.3f)\n", worst, bound);
    out["peak_ratio"] = worst;
    out["peak_ratio_bound_k_over_m"] = bound;
  }
  if (!a.json.empty()) write_json_file(a.json, out.dump(2));
}

}  // namespace

void register_bench_pp(CLI::App& bench) {
  auto* sub = bench.add_subcommand(
      "pp",
      "Pipeline stages on a synthetic model of K equal stages (linear layers): the measured bubble (idle / step "
      "time per stage) beside theory (K-1)/(M+K-1), and each schedule's peak activation memory per stage; the "
      "schedules run interleaved");
  auto a = std::make_shared<BenchPpArgs>();
  sub->add_option("--stages", a->stages, "K: stages, one rank each (started on this host)")->capture_default_str();
  sub->add_option("--micro-batches", a->micro_batches, "M: micro-batches per step")->capture_default_str();
  sub->add_option("--schedule", a->schedules, "gpipe, 1f1b, or both comma separated")->capture_default_str();
  sub->add_option("--micro-rows", a->micro_rows, "Rows per micro-batch")->capture_default_str();
  sub->add_option("--width", a->width, "Features of each linear layer")->capture_default_str();
  sub->add_option("--layers", a->layers, "Linear layers per stage")->capture_default_str();
  sub->add_option("--steps", a->steps, "Timed steps per schedule and repeat")->capture_default_str();
  sub->add_option("--warmup", a->warmup, "Untimed steps before each timed run")->capture_default_str();
  sub->add_option("--repeats", a->repeats, "Interleaved repeats of every schedule")->capture_default_str();
  sub->add_option("--comm", a->comm, "How the stages talk: auto, gloo, shm")->capture_default_str();
  sub->add_option("--json", a->json, "Also write the results as JSON to this file");
  sub->add_option("--trace", a->trace, "Chrome trace of every stage's ops and waits (PATH.rank<r>.json per rank)");
  sub->add_option("--timeout", a->timeout_s, "Seconds before a silent peer is an error")->capture_default_str();
  sub->footer("Example:\n  tandem bench pp --stages 2 --micro-batches 8 --json pp.json");
  sub->callback([a] { run_bench_pp(*a); });
}

}  // namespace tandem::cli
