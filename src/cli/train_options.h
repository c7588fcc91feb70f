#pragma once
// Flags shared by `tandem train` and `tandem compare`.
#include <CLI/CLI.hpp>

#include "tandem/train/trainer.h"

namespace tandem::cli {

struct TrainFlags {
  train::TrainOptions opts;
  int nproc = 1;
  std::string buffer_size = "50";
  std::string master_addr;
  int master_port = 0;
  int data_gpu = -1, model_gpu = -1;
  CLI::Option* resume_opt = nullptr;  // --resume with no value means "latest"
  int max_restarts = 0;
  double stall_warn_s = 60;
  bool check_collectives = false;
};

// Adds every training flag to `sub`. `with_strategy`: compare picks methods itself.
void add_train_flags(CLI::App* sub, TrainFlags& f, bool with_strategy);
// Resolves aliases (--data-gpu) and `auto`; validates.
void finalize_train_flags(TrainFlags& f);
// argv of this process after the program name, for relaunching.
std::vector<std::string>& original_args();

// Runs this process as one rank of a job (rendezvous from the environment).
train::RunResult run_as_rank(const TrainFlags& f);

// Starts `nproc` local copies of this executable with `args` (torchrun-style)
// and returns the launcher's exit code.
int relaunch_local(int nproc, const std::vector<std::string>& args, int max_restarts = 0);
// True when this process is already one rank of a job (tandem launch /
// torchrun, mpirun or srun set its variables), so it must not relaunch itself.
bool in_job();

}  // namespace tandem::cli
