#include "tandem/comm/rendezvous.h"

#include <cstdlib>

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "tandem/comm/env.h"
#include "tandem/util/check.h"

namespace tandem::comm {
namespace {

std::optional<int> env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  TANDEM_CHECK(end && *end == '\0' && x >= 0 && x < (1L << 30), "environment variable ", name, "='", v,
               "' is not a non-negative integer");
  return static_cast<int>(x);
}

std::string env_str(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

}  // namespace

WorldInfo resolve_world(const RendezvousOptions& o) {
  WorldInfo w;
  struct Source {
    const char* name;
    const char* rank;
    const char* size;
    const char* local_rank;
    const char* local_size;
  };
  const Source sources[] = {
      {"torchrun", env::kRank, env::kWorldSize, env::kLocalRank, env::kLocalWorldSize},
      {"openmpi", env::kOmpiRank, env::kOmpiSize, env::kOmpiLocalRank, env::kOmpiLocalSize},
      {"slurm", env::kSlurmProcId, env::kSlurmNTasks, env::kSlurmLocalId, env::kSlurmTasksPerNode},
  };
  for (const auto& s : sources) {
    auto r = env_int(s.rank);
    auto n = env_int(s.size);
    if (r && n) {
      w.source = s.name;
      w.rank = *r;
      w.world_size = *n;
      w.local_rank = env_int(s.local_rank).value_or(w.rank);
      w.local_world_size = env_int(s.local_size).value_or(w.world_size);
      break;
    }
  }
  if (o.rank || o.world_size) w.source = "flags";
  if (o.rank) w.rank = *o.rank;
  if (o.world_size) w.world_size = *o.world_size;
  if (o.local_rank) w.local_rank = *o.local_rank;
  if (o.local_world_size) w.local_world_size = *o.local_world_size;
  w.master_addr = !o.master_addr.empty() ? o.master_addr : env_str(env::kMasterAddr);
  w.master_port = o.master_port ? o.master_port : env_int(env::kMasterPort).value_or(0);
  w.store_path = !o.store_path.empty() ? o.store_path : env_str(env::kStorePath);
  TANDEM_CHECK(w.world_size >= 1, "world size must be >= 1, got ", w.world_size);
  TANDEM_CHECK(w.rank >= 0 && w.rank < w.world_size, "rank ", w.rank, " is outside world size ", w.world_size,
               " (source: ", w.source, ")");
  return w;
}

CommunicatorPtr init_from_env(const RendezvousOptions& o) {
  WorldInfo w = resolve_world(o);
  if (w.world_size == 1) return make_single();
  GlooOptions g;
  g.timeout = o.timeout;
  std::string bind = !o.bind_addr.empty() ? o.bind_addr : env_str(env::kBindAddr);
  c10::intrusive_ptr<c10d::Store> store;
  if (!w.store_path.empty()) {
    // Single host: a file in a private directory; Gloo on loopback.
    store = c10::make_intrusive<c10d::FileStore>(w.store_path, w.world_size);
    g.hostname = bind.empty() ? "127.0.0.1" : bind;
  } else {
    TANDEM_CHECK(!w.master_addr.empty() && w.master_port > 0,
                 "rank ", w.rank, " of ", w.world_size, " (from ", w.source,
                 ") has no meeting point: set MASTER_ADDR and MASTER_PORT (or --master-addr/--master-port), "
                 "or start the ranks with `tandem launch`");
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(w.master_port);
    so.isServer = w.rank == 0;
    so.numWorkers = w.world_size;
    so.waitWorkers = false;
    so.timeout = o.timeout;
    try {
      store = c10::make_intrusive<c10d::TCPStore>(w.master_addr, so);
    } catch (const std::exception& e) {
      throw CommError("rank " + std::to_string(w.rank) + ": cannot reach the store at " + w.master_addr + ":" +
                      std::to_string(w.master_port) + ": " + e.what());
    }
    bool loopback = w.master_addr == "127.0.0.1" || w.master_addr == "localhost";
    g.hostname = !bind.empty() ? bind : (loopback ? "127.0.0.1" : "");
  }
  return make_gloo(store, w.rank, w.world_size, g);
}

}  // namespace tandem::comm
