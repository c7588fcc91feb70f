// `tandem train`: one training run. With --nproc N (and not already a rank)
// it starts N local ranks of itself through the launcher.
#include <cstdlib>
#include <iostream>
#include <memory>

#include "commands.h"
#include "tandem/comm/env.h"
#include "train_options.h"

namespace tandem::cli {

void register_train(CLI::App& app) {
  auto* sub = app.add_subcommand("train", "Train a model data-parallel (default: cnn on Fashion-MNIST, DDP)");
  auto f = std::make_shared<TrainFlags>();
  add_train_flags(sub, *f, /*with_strategy=*/true);
  sub->footer(
      "Examples:\n"
      "  tandem train --nproc 2 --epochs 1                      # DDP on 2 local ranks\n"
      "  tandem train --nproc 4 --strategy ps --ps-mode ssp --staleness 2\n"
      "  tandem launch --nproc-per-node 2 -- tandem train      # the same, launched explicitly\n"
      "  mpirun -n 4 tandem train --master-addr host0 --master-port 29500");
  sub->callback([f] {
    finalize_train_flags(*f);
    if (!in_job() && f->nproc > 1) {
      int code = relaunch_local(f->nproc, original_args());
      if (code != 0) std::exit(code);
      return;
    }
    run_as_rank(f->opts, f->master_addr, f->master_port);
  });
}

}  // namespace tandem::cli
