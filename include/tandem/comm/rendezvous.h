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
};

// Reads the environment (through getenv) and applies the overrides.
WorldInfo resolve_world(const RendezvousOptions& overrides = {});

// Builds the store and the Gloo communicator described by resolve_world().
CommunicatorPtr init_from_env(const RendezvousOptions& overrides = {});

}  // namespace tandem::comm
