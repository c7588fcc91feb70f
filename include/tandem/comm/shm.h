#pragma once
// Shared-memory and hierarchical communicators.
//
// make_shm: every rank of the group is on this host. Collectives and
// point-to-point go through one shared-memory segment (no sockets, no kernel
// copies): all-reduce is a reduce-scatter then all-gather over per-rank slots,
// pipelined in chunks with two buffers per rank, so the segment stays small
// (2 x chunk_bytes per rank plus the p2p rings) whatever the tensor size.
// Results are bit-identical on every rank (each element is reduced once, in
// rank order). Construction is collective over the group and rendezvous
// through `store` (give each group its own prefix). Asynchronous collectives
// run in order on the communicator's own thread; point-to-point on another
// (a progress engine, so that sends and receives in both directions never
// deadlock). The blocking collectives run on the caller's thread when nothing
// is queued. A peer that exits, closes or stops is noticed within a few ms
// while waiting (its pid is checked in /proc) and every waiting rank throws
// CommError naming it; a stopped peer, after the timeout.
//
// make_hybrid: ranks on several hosts. Inside a host, shared memory; across
// hosts, Gloo among one leader per host (reduce in the host, all-reduce among
// leaders, broadcast in the host). Point-to-point goes through a Gloo group
// over all ranks.
#include <string>
#include <vector>

#include "tandem/comm/communicator.h"

namespace tandem::comm {

struct ShmOptions {
  Milliseconds timeout = kDefaultTimeout;
  std::size_t chunk_bytes = std::size_t{1} << 19;    // collective pipeline unit (two per rank in the segment)
  std::size_t channel_bytes = std::size_t{1} << 18;  // p2p ring per ordered pair of ranks
  // Below this many bytes per chunk every rank reduces the whole chunk (one
  // synchronisation); above it, reduce-scatter + all-gather (two).
  std::size_t small_bytes = std::size_t{1} << 14;
  // How long a waiting rank spins before it sleeps on a futex; -1: 1 ms when
  // the host has a core for every local rank, else none (spinning would take
  // the core from the rank being waited for).
  std::int64_t spin_ns = -1;
  std::string job_id;              // in the segment's name; empty: TANDEM_JOB_ID, else random
  std::vector<int> rank_labels;    // rank numbers used in messages (hybrid: global ranks); empty: own
};

CommunicatorPtr make_shm(c10::intrusive_ptr<c10d::Store> store, int rank, int size, const ShmOptions& opts = {});

// Host of each rank, as told by `host_of`; ranks sharing a host use shared
// memory. `store` is shared by all ranks (prefixes are added inside).
CommunicatorPtr make_hybrid(c10::intrusive_ptr<c10d::Store> store, int rank, int size,
                            const std::vector<std::string>& host_of, const GlooOptions& gloo,
                            const ShmOptions& shm = {});

// This host's identity for grouping ranks: TANDEM_HOST_ID when set, else the
// host name.
std::string host_id();

// Every rank's host_id(), exchanged through `store` (collective).
std::vector<std::string> exchange_hosts(c10d::Store& store, int rank, int size, const std::string& prefix,
                                        Milliseconds timeout);

}  // namespace tandem::comm
