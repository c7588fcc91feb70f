#pragma once
// Every environment variable tandem reads or sets, named once.
namespace tandem::env {
// torchrun's contract (also set by `tandem launch`).
constexpr const char* kRank = "RANK";
constexpr const char* kWorldSize = "WORLD_SIZE";
constexpr const char* kLocalRank = "LOCAL_RANK";
constexpr const char* kLocalWorldSize = "LOCAL_WORLD_SIZE";
constexpr const char* kMasterAddr = "MASTER_ADDR";
constexpr const char* kMasterPort = "MASTER_PORT";
// OpenMPI (mpirun).
constexpr const char* kOmpiRank = "OMPI_COMM_WORLD_RANK";
constexpr const char* kOmpiSize = "OMPI_COMM_WORLD_SIZE";
constexpr const char* kOmpiLocalRank = "OMPI_COMM_WORLD_LOCAL_RANK";
constexpr const char* kOmpiLocalSize = "OMPI_COMM_WORLD_LOCAL_SIZE";
// Slurm (srun).
constexpr const char* kSlurmProcId = "SLURM_PROCID";
constexpr const char* kSlurmNTasks = "SLURM_NTASKS";
constexpr const char* kSlurmLocalId = "SLURM_LOCALID";
constexpr const char* kSlurmTasksPerNode = "SLURM_NTASKS_PER_NODE";
// tandem's own: a FileStore path for single-host jobs (set by `tandem launch`,
// inside a private 0700 directory), so no port is opened beyond loopback.
constexpr const char* kStorePath = "TANDEM_STORE_PATH";
// Address Gloo binds to on this host (default: 127.0.0.1 for a single-host
// or loopback job, else the local address of the route to MASTER_ADDR; see
// comm/bind_address.h).
constexpr const char* kBindAddr = "TANDEM_BIND_ADDR";
// Which host a rank is on, for grouping ranks that share memory (default: the
// host name). Tests give groups of ranks on one machine different ids.
constexpr const char* kHostId = "TANDEM_HOST_ID";
// Set by `tandem launch`: part of the job's shared-memory segment names, so
// that the launcher can remove what a killed job left.
constexpr const char* kJobId = "TANDEM_JOB_ID";
// Set by the launcher: which attempt this is (0 first; see --max-restarts).
constexpr const char* kRestartCount = "TANDEM_RESTART_COUNT";
constexpr const char* kTorchElasticRestartCount = "TORCHELASTIC_RESTART_COUNT";
constexpr const char* kTorchElasticMaxRestarts = "TORCHELASTIC_MAX_RESTARTS";
// Shared-memory tuning: the collective chunk and the size below which every
// rank reduces a whole chunk (bytes; see comm/shm.h ShmOptions).
constexpr const char* kShmChunk = "TANDEM_SHM_CHUNK";
constexpr const char* kShmSmall = "TANDEM_SHM_SMALL";
// How long a waiting rank spins before it sleeps (ns; default in ShmOptions).
constexpr const char* kShmSpinNs = "TANDEM_SHM_SPIN_NS";
constexpr const char* kGlooSocketIfname = "GLOO_SOCKET_IFNAME";  // PyTorch's: bind Gloo to this interface's IPv4 address
}  // namespace tandem::env
