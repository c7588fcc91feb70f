#pragma once
// Rendezvous: who am I, how many are we, and how do we meet.
//
// Sources, first match wins: explicit options (command-line flags), then
// torchrun's variables (also what `tandem launch` sets), then OpenMPI's, then
// Slurm's. With none of them the world is a single rank.
// Meeting point: a FileStore at TANDEM_STORE_PATH when set (single host,
// loopback only); else a TCPStore at MASTER_ADDR:MASTER_PORT, served by rank 0.
#include <optional>
#include <string>
#include <vector>

#include "tandem/comm/communicator.h"

namespace tandem::comm {

struct WorldInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr;  // empty: not given
  int master_port = 0;
  std::string store_path;   // FileStore, when given
  std::string source = "default";  // "flags", "torchrun", "openmpi", "slurm", "default"
};

struct RendezvousOptions {
  std::optional<int> rank, world_size, local_rank, local_world_size;
  std::string master_addr;
  int master_port = 0;
  std::string store_path;
  std::string bind_addr;  // Gloo device address; default chosen from the store kind
  Milliseconds timeout = kDefaultTimeout;
  // Keys of this communicator in the job's store start with this (several
  // communicators over one store need distinct prefixes).
  std::string store_prefix;
  // auto | gloo | shm | hybrid | nccl (see choose_comm).
  std::string comm = "auto";
  // This rank's model device when it is a GPU (its CUDA index); -1: the model
  // is not on a GPU. auto picks NCCL when every rank has its own GPU.
  int cuda_device = -1;
  // Shared memory: how long a waiting rank spins before it sleeps (ns);
  // unset: ShmOptions' default. TANDEM_SHM_SPIN_NS overrides both. Pipeline
  // stages use 0: they compute with receives posted, and a spinning engine
  // thread would take the core.
  std::optional<std::int64_t> shm_spin_ns;
  // Rank 0 writes one line to stderr saying which communicator was chosen and why.
  bool verbose = false;
  // Checks (comm/checked.h): rank 0 names the ranks that have not reached a
  // collective that waited this long (0: off); and every collective's
  // fingerprint compared across ranks before it runs.
  double stall_warn_s = 0;
  bool check_collectives = false;
};

// The accepted --comm values, for messages and validation.
const std::vector<std::string>& comm_kinds();
// Throws tandem::Error naming the flag for a value not in comm_kinds(), and
// for nccl in a build without it (naming the fix).
void validate_comm(const std::string& kind);

// Where the ranks' models are, for choose_comm: how many ranks train on a
// GPU, and how many distinct GPUs those are (NCCL needs one GPU per rank).
struct GpuLayout {
  int cuda_ranks = 0;
  int gpus = 0;
};

// What `kind` becomes for ranks on the hosts `host_of` (one entry per rank):
// auto is nccl when every rank's model is on a GPU of its own and this build
// has NCCL (nccl_available()); else shm when all ranks share a host, hybrid
// when several hosts and some host has more than one rank, gloo otherwise.
// Throws tandem::Error when shm is asked for ranks on several hosts, or nccl
// for models not each on a GPU of their own (or in a build without NCCL).
// `why` gets a one-line reason.
std::string choose_comm(const std::string& kind, const std::vector<std::string>& host_of, std::string* why = nullptr,
                        const GpuLayout& gpus = {});

// Reads the environment (through getenv) and applies the overrides.
WorldInfo resolve_world(const RendezvousOptions& overrides = {});

// Builds the store and the communicator described by resolve_world() and
// overrides.comm.
CommunicatorPtr init_from_env(const RendezvousOptions& overrides = {});

}  // namespace tandem::comm
