// `tandem launch`: start N copies of a command on this node, torchrun-style.
#include <cstdlib>
#include <iostream>
#include <memory>

#include "commands.h"
#include "tandem/launch/launcher.h"
#include "tandem/util/check.h"

namespace tandem::cli {

void register_launch(CLI::App& app) {
  auto* sub = app.add_subcommand(
      "launch",
      "Start one process per rank on this node and supervise them (like torchrun). Each gets RANK, WORLD_SIZE, "
      "LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a single-node job also gets TANDEM_STORE_PATH, "
      "so its ranks meet through a file in a private directory and open no port. If any rank fails, the others "
      "are stopped (SIGTERM, then SIGKILL) and tandem exits with that rank's code.");
  auto o = std::make_shared<launch::LaunchOptions>();
  auto env = std::make_shared<std::vector<std::string>>();
  sub->add_option("--nproc-per-node,--nproc_per_node", o->nproc_per_node, "Processes (ranks) to start on this node")
      ->capture_default_str();
  sub->add_option("--nnodes", o->nnodes, "Number of nodes in the job (run `tandem launch` once on each)")
      ->capture_default_str();
  sub->add_option("--node-rank,--node_rank", o->node_rank, "This node's index, 0..nnodes-1")->capture_default_str();
  sub->add_option("--master-addr,--master_addr", o->master_addr,
                  "Address of the node running rank 0 (multi-node jobs meet there)")
      ->capture_default_str();
  sub->add_option("--master-port,--master_port", o->master_port, "TCP port rank 0 listens on (multi-node jobs)")
      ->capture_default_str();
  sub->add_option("--grace,--grace-seconds,--grace_seconds", o->grace_seconds,
                  "Seconds between SIGTERM and SIGKILL when stopping the ranks")
      ->capture_default_str();
  sub->add_option("--max-restarts,--max_restarts", o->max_restarts,
                  "When a rank fails, stop the others and start the whole group again, up to N times (one node); "
                  "the ranks get TANDEM_RESTART_COUNT / TORCHELASTIC_RESTART_COUNT")
      ->capture_default_str();
  sub->add_option("--env", *env, "Extra KEY=VALUE for every rank (repeat the flag for more)")
      ->allow_extra_args(false);
  sub->add_option("command", o->command, "The command to run in every rank, with its arguments (after --)");
  sub->footer(
      "Examples:\n"
      "  tandem launch --nproc-per-node 4 -- tandem train --model mlp\n"
      "  tandem launch --nnodes 2 --node-rank 0 --master-addr host0 --nproc-per-node 8 -- ./my_trainer --lr 0.1\n"
      "Everything after -- is the command; its flags are not read by tandem.");
  sub->callback([o, env] {
    for (const auto& kv : *env) {
      auto eq = kv.find('=');
      TANDEM_CHECK(eq != std::string::npos && eq > 0, "tandem launch: --env wants KEY=VALUE (got '", kv, "')");
      o->extra_env[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    int code = launch::launch(*o, std::cerr);
    std::cout.flush();
    std::cerr.flush();
    if (code != 0) std::exit(code);
  });
}

}  // namespace tandem::cli
