#include "tandem/comm/rendezvous.h"
#include "tandem/comm/checked.h"

#include <algorithm>
#include <cstdlib>
#include <map>

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <iostream>

#include "tandem/comm/bind_address.h"
#include "tandem/comm/env.h"
#include "tandem/comm/shm.h"
#include "tandem/config.h"
#include "tandem/util/check.h"

#if TANDEM_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

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

// A name of this rank's GPU that two ranks on one GPU share whatever
// CUDA_VISIBLE_DEVICES each of them sees: the host and the PCI bus id.
std::string gpu_name(int device) {
  std::string id = "cuda:" + std::to_string(device);
#if TANDEM_HAVE_CUDA
  char bus[64] = {0};
  if (cudaDeviceGetPCIBusId(bus, sizeof bus, device) == cudaSuccess)
    id = bus;
  else
    (void)cudaGetLastError();  // not the training's error
#endif
  return host_id() + "/" + id;
}

}  // namespace

const std::vector<std::string>& comm_kinds() {
  static const std::vector<std::string> kinds{"auto", "gloo", "shm", "hybrid", "nccl"};
  return kinds;
}

void validate_comm(const std::string& kind) {
  const auto& k = comm_kinds();
  std::string accepted;
  for (const auto& x : k) accepted += (accepted.empty() ? "" : ", ") + x;
  TANDEM_CHECK(std::find(k.begin(), k.end(), kind) != k.end(), "--comm: unknown communicator '", kind,
               "' (accepted: ", accepted, ")");
  TANDEM_CHECK(kind != "nccl" || nccl_available(),
               "--comm nccl: this build of tandem has no NCCL (its LibTorch has no CUDA or no c10d NCCL, or it was "
               "built without -DTANDEM_WITH_CUDA=ON); use --comm gloo or auto, or rebuild against a CUDA LibTorch "
               "(PyTorch's) with -DTANDEM_WITH_CUDA=ON");
}

std::string choose_comm(const std::string& kind, const std::vector<std::string>& host_of, std::string* why,
                        const GpuLayout& gpus) {
  validate_comm(kind);
  std::map<std::string, int> per_host;
  for (const auto& h : host_of) ++per_host[h];
  int most = 0;
  for (const auto& [h, n] : per_host) most = std::max(most, n);
  const int hosts = static_cast<int>(per_host.size()), ranks = static_cast<int>(host_of.size());
  std::string layout = std::to_string(ranks) + " ranks on " + std::to_string(hosts) + (hosts == 1 ? " host" : " hosts");
  const bool cuda = ranks > 0 && gpus.cuda_ranks == ranks, own_gpus = cuda && gpus.gpus == ranks;
  std::string chosen = kind, reason;
  if (kind == "auto" && own_gpus && nccl_available()) {
    chosen = "nccl", reason = "auto: " + layout + ", a GPU per rank, NCCL";
  } else if (kind == "auto") {
    if (hosts == 1) {
      chosen = "shm", reason = "auto: " + layout + " (" + host_of.front() + "), shared memory";
    } else if (most > 1) {
      chosen = "hybrid", reason = "auto: " + layout + ", shared memory inside each host, Gloo between hosts";
    } else {
      chosen = "gloo", reason = "auto: " + layout + ", one rank per host, Gloo";
    }
    if (cuda)
      reason += nccl_available() ? " (CUDA model, not NCCL: " + std::to_string(ranks) + " ranks share " +
                                       std::to_string(gpus.gpus) + (gpus.gpus == 1 ? " GPU)" : " GPUs)")
                                 : " (CUDA model, not NCCL: this build has none)";
  } else {
    reason = "asked for (" + layout + ")";
  }
  if (chosen == "shm")
    TANDEM_CHECK(hosts == 1, "--comm shm needs every rank on one host, but the ", layout, " (",
                 per_host.begin()->first, ", ", std::next(per_host.begin())->first,
                 ", ...): use --comm hybrid or auto (hosts are told apart by host name, or TANDEM_HOST_ID)");
  if (chosen == "nccl") {
    TANDEM_CHECK(cuda, "--comm nccl moves CUDA tensors, but ",
                 gpus.cuda_ranks == 0 ? std::string("the model is not on a GPU")
                                      : std::to_string(ranks - gpus.cuda_ranks) + " of " + std::to_string(ranks) +
                                            " ranks have their model off the GPU",
                 ": use --model-device cuda, or --comm auto");
    TANDEM_CHECK(own_gpus, "--comm nccl needs a GPU per rank, but the ", ranks, " ranks share ", gpus.gpus,
                 gpus.gpus == 1 ? " GPU" : " GPUs",
                 ": use --model-device cuda (GPU = local rank), fewer ranks, or --comm gloo");
  }
  if (why) *why = reason;
  return chosen;
}

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
  validate_comm(o.comm);
  // A world of one needs no peers; --comm nccl still builds NCCL (a check of it).
  if (w.world_size == 1 && o.comm != "nccl") return make_single();
  GlooOptions g;
  g.timeout = o.timeout;
  std::string bind = !o.bind_addr.empty() ? o.bind_addr : env_str(env::kBindAddr);
  c10::intrusive_ptr<c10d::Store> store;
  if (!w.store_path.empty()) {
    // Single host: a file in a private directory; Gloo on loopback.
    store = c10::make_intrusive<c10d::FileStore>(w.store_path, w.world_size);
    g.hostname = bind.empty() ? "127.0.0.1" : bind;
  } else if (w.world_size == 1 && w.master_addr.empty()) {
    store = c10::make_intrusive<c10d::HashStore>();  // NCCL's world of one meets nobody
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
    // The local end of the route towards the master (or what
    // TANDEM_BIND_ADDR / GLOO_SOCKET_IFNAME say), not what the host name
    // resolves to: that is often loopback, which other hosts cannot reach.
    BindChoice c = choose_bind_address(w.master_addr, bind);
    g.hostname = c.address;
    if (o.verbose) std::cerr << "tandem: rank " << w.rank << ": Gloo binds to " << c.address << ": " << c.reason << "\n";
  }
  if (!o.store_prefix.empty()) store = c10::make_intrusive<c10d::PrefixStore>(o.store_prefix, store);
  std::string kind = o.comm, why = "asked for";
  std::vector<std::string> hosts;
  if (kind != "gloo") {
    // GPU counts: added before the host exchange, which no rank leaves before
    // every rank entered it, so they are final (and the same) when read after.
    if (o.cuda_device >= 0) {
      store->add("tandem/rdzv/cuda", 1);
      if (store->add("tandem/rdzv/gpu/" + gpu_name(o.cuda_device), 1) == 1) store->add("tandem/rdzv/gpus", 1);
    }
    hosts = exchange_hosts(*store, w.rank, w.world_size, "tandem/rdzv/", o.timeout);
    GpuLayout gpus;
    gpus.cuda_ranks = static_cast<int>(store->add("tandem/rdzv/cuda", 0));
    gpus.gpus = static_cast<int>(store->add("tandem/rdzv/gpus", 0));
    kind = choose_comm(kind, hosts, &why, gpus);
  }
  if (o.verbose && w.rank == 0) std::cerr << "tandem: communicator " << kind << " (" << why << ")\n";
  ShmOptions so;
  so.timeout = o.timeout;
  // Tuning knobs for measurements (docs/benchmarks.md); the defaults are measured.
  if (auto v = env_int(env::kShmChunk)) so.chunk_bytes = static_cast<std::size_t>(*v);
  if (auto v = env_int(env::kShmSmall)) so.small_bytes = static_cast<std::size_t>(*v);
  if (o.shm_spin_ns) so.spin_ns = *o.shm_spin_ns;
  if (auto v = env_int(env::kShmSpinNs)) so.spin_ns = *v;
  CommunicatorPtr comm;
  if (kind == "shm")
    comm = make_shm(c10::make_intrusive<c10d::PrefixStore>("tandem/shm/", store), w.rank, w.world_size, so);
  else if (kind == "hybrid")
    comm = make_hybrid(store, w.rank, w.world_size, hosts, g, so);
  else if (kind == "nccl")
    comm = make_nccl(c10::make_intrusive<c10d::PrefixStore>("tandem/nccl/", store), w.rank, w.world_size,
                     NcclOptions{o.timeout, o.cuda_device});
  else
    comm = make_gloo(store, w.rank, w.world_size, g);
  if (o.stall_warn_s <= 0 && !o.check_collectives) return comm;
  CheckOptions co;
  co.fingerprints = o.check_collectives;
  co.stall_warn_s = o.stall_warn_s;
  return make_checked(comm, store, co);
}

}  // namespace tandem::comm
