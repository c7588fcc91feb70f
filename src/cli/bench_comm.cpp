// `tandem bench comm`: all-reduce micro-benchmark (gloo, ring, ps), nccl-tests style.
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <sstream>

#include "commands.h"
#include "tandem/config.h"
#include "tandem/collectives/bench.h"
#include "tandem/comm/env.h"
#include "tandem/comm/rendezvous.h"
#include "tandem/launch/launcher.h"
#include "tandem/util/check.h"
#include "train_options.h"

namespace tandem::cli {
namespace {

struct BenchCommArgs {
  int nproc = 2;
  std::string min_bytes = "4K", max_bytes = "64M", algos = "native,ring,ps", json, ring_chunk = "default";
  std::string comm = "auto";
  int iters = 20, warmup = 5;
  double timeout_s = 300;
};

void run_bench_comm(const BenchCommArgs& a) {
  collectives::BenchOptions o;
  o.min_bytes = collectives::parse_bytes(a.min_bytes);
  o.max_bytes = collectives::parse_bytes(a.max_bytes);
  o.iters = a.iters;
  o.warmup = a.warmup;
  o.algos = collectives::parse_algos(a.algos);
  if (a.ring_chunk != "default") o.ring_chunk_bytes = static_cast<size_t>(collectives::parse_bytes(a.ring_chunk));
  collectives::validate(o);
  TANDEM_CHECK(a.timeout_s > 0, "--timeout must be > 0 seconds, got ", a.timeout_s);
  TANDEM_CHECK(a.nproc >= 1, "--nproc must be >= 1, got ", a.nproc);

  if (!in_job() && a.nproc > 1) {
    // Relaunch this executable as N ranks with the same arguments.
    int code = relaunch_local(a.nproc, original_args());
    if (code != 0) std::exit(code);
    return;
  }

  std::vector<std::string> kinds;
  {
    std::stringstream ss(a.comm);
    std::string k;
    while (std::getline(ss, k, ','))
      if (!k.empty()) {
        comm::validate_comm(k);
        kinds.push_back(k);
      }
    TANDEM_CHECK(!kinds.empty(), "--comm: empty list (accepted: auto, gloo, shm, hybrid, comma-separated)");
  }
  // Every communicator stays alive to the end: each has its own prefix in the
  // one store, and they are interleaved iteration by iteration.
  std::vector<comm::CommunicatorPtr> comms;
  std::vector<comm::Communicator*> raw;
  for (const auto& k : kinds) {
    comm::RendezvousOptions ro;
    ro.timeout = comm::Milliseconds(static_cast<int64_t>(a.timeout_s * 1000));
    ro.comm = k;
    ro.store_prefix = "bench/" + k + "/";
    ro.verbose = true;
    comms.push_back(comm::init_from_env(ro));
    raw.push_back(comms.back().get());
  }
  auto& c = comms.front();
  auto rows = collectives::bench_comm(raw, o);
  if (c->rank() == 0) {
    std::cout << collectives::format_table(rows, c->size(), o) << std::flush;
    if (!a.json.empty()) write_json_file(a.json, collectives::to_json(rows, c->size(), o));
  }
  for (auto& x : comms) x->barrier();  // no rank leaves while others still talk to it
  bool all_ok = true;
  for (const auto& r : rows) all_ok = all_ok && r.correct;
  TANDEM_CHECK(all_ok, "bench comm: a result differs from the expected sum (see the check column)");
}

}  // namespace

void register_bench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Micro-benchmarks");
  bench->require_subcommand(1);
#if TANDEM_HAVE_SERVE
  register_bench_serve(*bench);
#endif
  register_bench_pp(*bench);
  register_bench_infer(*bench);
  auto* sub = bench->add_subcommand(
      "comm",
      "Time all-reduce over message sizes: each communicator's own all-reduce (rows named gloo, shm, hybrid), "
      "tandem's ring (ring) and the parameter server's reduce + broadcast (ps), on every communicator of --comm, "
      "interleaved. Prints an nccl-tests style table (time, algbw, busbw, correctness check) and busbw ratios "
      "against gloo per size.");
  auto a = std::make_shared<BenchCommArgs>();
  sub->add_option("--nproc", a->nproc,
                  "Ranks to start on this host (ignored when already started as a rank, e.g. by tandem launch)")
      ->capture_default_str();
  sub->add_option("--min-bytes", a->min_bytes, "Smallest message (bytes; K/M/G suffixes: 4K, 64M)")
      ->capture_default_str();
  sub->add_option("--max-bytes", a->max_bytes, "Largest message; sizes double from --min-bytes")
      ->capture_default_str();
  sub->add_option("--iters", a->iters, "Timed iterations per size and algorithm")->capture_default_str();
  sub->add_option("--warmup", a->warmup, "Untimed iterations before timing")->capture_default_str();
  sub->add_option("--algos", a->algos,
                  "Comma-separated algorithms: native (the communicator's all-reduce; gloo/shm/hybrid name it too), "
                  "ring, ps")
      ->capture_default_str();
  sub->add_option("--comm", a->comm,
                  "Comma-separated communicators to compare: auto, gloo, shm (one host), hybrid (shared memory in a "
                  "host, Gloo across)")
      ->capture_default_str();
  sub->add_option("--ring-chunk", a->ring_chunk,
                  "ring: transfer unit within a step (bytes, K/M suffixes); default: ring_all_reduce's")
      ->capture_default_str();
  sub->add_option("--json", a->json, "Also write the rows as JSON to this file (rank 0)");
  sub->add_option("--timeout", a->timeout_s, "Seconds before a silent peer is an error")->capture_default_str();
  sub->footer("Examples:\n  tandem bench comm --nproc 2 --comm shm,gloo --algos native\n"
              "  tandem bench comm --nproc 4 --min-bytes 1M --max-bytes 256M --comm gloo --algos native,ring --json comm.json");
  sub->callback([a] { run_bench_comm(*a); });
}

}  // namespace tandem::cli
