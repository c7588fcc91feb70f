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
      "  tandem train --nproc 2 --epochs 5 --checkpoint-dir ckpt --max-restarts 3   # survives a dead rank\n"
      "  tandem train --checkpoint-dir ckpt --resume --epochs 10     # train further from the newest checkpoint\n"
      "  tandem launch --nproc-per-node 2 -- tandem train      # the same, launched explicitly\n"
      "  mpirun -n 4 tandem train --master-addr host0 --master-port 29500");
  sub->callback([f] {
    finalize_train_flags(*f);
    // Several ranks, or restarts (which a process cannot do for itself),
    // go through the launcher.
    if (!in_job() && (f->nproc > 1 || f->max_restarts > 0)) {
      int code = relaunch_local(f->nproc, original_args(), f->max_restarts);
      if (code != 0) std::exit(code);
      return;
    }
    run_as_rank(*f);
  });
}

}  // namespace tandem::cli
