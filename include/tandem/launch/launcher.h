#pragma once
// A torchrun-like launcher: start one process per local rank, supervise them,
// and tear the whole job down when any of them fails.
//
// Every child gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
// LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; see comm/env.h). A single-node
// job (nnodes == 1) also gets TANDEM_STORE_PATH, a FileStore inside a private
// 0700 directory made for the job and removed when it ends, so that ranks meet
// without opening a port.
//
// Each child runs in its own process group; stopping a rank signals its whole
// group, so grandchildren (e.g. `sh -c` pipelines) die with it.
#include <map>
#include <ostream>
#include <string>
#include <vector>

namespace tandem::launch {

struct LaunchOptions {
  int nproc_per_node = 1;
  int nnodes = 1;
  int node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::vector<std::string> command;  // argv of every rank; command[0] searched in PATH
  double grace_seconds = 3.0;        // between SIGTERM and SIGKILL at shutdown
  std::map<std::string, std::string> extra_env;  // set last: overrides the above
  // When a rank fails (exits non-zero or is killed), stop the others and
  // start the whole group again, up to this many times (single node only).
  // Each attempt gets a fresh rendezvous (store, job id) and
  // TANDEM_RESTART_COUNT = TORCHELASTIC_RESTART_COUNT = the attempt's index.
  int max_restarts = 0;
};

// Throws tandem::Error for invalid options (with the flag to fix).
void validate(const LaunchOptions& opts);

// Runs the job to completion (restarting it up to max_restarts times after a
// rank failure) and returns the exit code to use: 0 when every rank of the
// last attempt exited 0; otherwise the code of the first rank that failed (128+signal
// when it was killed by a signal), or 128+signal when the launcher itself got
// SIGINT/SIGTERM (forwarded to every rank). Progress and failures are written
// to `log`. Throws tandem::Error for invalid options or when a rank cannot be
// started (the ranks already started are stopped first).
//
// While it runs, launch() installs SIGINT/SIGTERM handlers (restored on
// return) and reaps only its own children.
int launch(const LaunchOptions& opts, std::ostream& log);

// Absolute path of the running executable (/proc/self/exe), for relaunching
// oneself (`tandem train --nproc N`). Throws tandem::Error when unavailable.
std::string self_executable();

// "SIGKILL" for 9, ..., "signal N" for those without a short name.
std::string signal_name(int sig);

}  // namespace tandem::launch
