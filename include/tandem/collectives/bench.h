#pragma once
// Communication micro-benchmark (`tandem bench comm`), nccl-tests style.
//
// For every size from min_bytes to max_bytes (doubling), each rank runs
// `warmup` untimed then `iters` timed rounds on float32 buffers; a round runs
// every algorithm once (in reversed order every other round), each operation
// started by a barrier and timed alone (interleaving makes a change of load
// on a shared host hit all algorithms alike). time_us is the median over the iterations, maximum over ranks.
// Several communicators (gloo, shm, ...) may be given: every algorithm runs on
// each, interleaved the same way.
//  - native: Communicator::all_reduce of the backend (c10d ProcessGroupGloo,
//    tandem's shared memory, ...); its rows are named after the backend
//    ("gloo", "shm", "hybrid"), which --algos also accepts for it.
//  - ring: collectives::ring_all_reduce (tandem's ring on send/recv).
//  - ps:   Communicator::reduce to rank 0 then broadcast from rank 0: the
//          gradient push and parameter pull of the parameter server's
//          collective transport (rank 0 as the server).
// Bandwidths (GB/s = 1e9 bytes/s): algbw = bytes / time. busbw = algbw *
// factor, the per-link traffic an ideal implementation needs:
//  - all-reduce (gloo, ring): 2(n-1)/n, as nccl-tests;
//  - ps: 2, because nccl-tests counts reduce and broadcast with factor 1
//    each, and ps is one of each. A star-shaped PS moves 2(n-1) buffers
//    through the server's link, so its busbw falls as n grows: that is the
//    bottleneck the benchmark shows.
// Correctness: after timing, one more operation on a buffer holding
// rank+1+(i%7) at element i must give n(n+1)/2 + n(i%7) on every rank
// (exact in float32); `correct` is true only if it holds on all ranks.
#include <cstdint>
#include <string>
#include <vector>

#include "tandem/collectives/ring_allreduce.h"
#include "tandem/comm/communicator.h"

namespace tandem::collectives {

struct BenchOptions {
  int64_t min_bytes = 4 << 10;
  int64_t max_bytes = 64 << 20;
  int iters = 20;
  int warmup = 5;
  std::vector<std::string> algos{"native", "ring", "ps"};
  size_t ring_chunk_bytes = RingOptions{}.chunk_bytes;  // ring: transfer unit
};

struct BenchRow {
  std::string algo;  // the backend's name for native all-reduce, else ring / ps
  std::string comm;  // the communicator's backend
  int64_t bytes = 0;
  double time_us = 0;     // median over iterations, max over ranks
  double algbw_gbps = 0;  // bytes / time
  double busbw_gbps = 0;  // algbw * busbw_factor
  double busbw_factor = 0;
  bool correct = false;
};

// "native", "ring", "ps".
const std::vector<std::string>& bench_algorithms();
// Comma-separated list of algorithms; tandem::Error naming the unknown one.
std::vector<std::string> parse_algos(const std::string& list);
// "4096", "4K", "64M", "1G" (binary multiples, case-insensitive, optional
// trailing B/iB); tandem::Error otherwise.
int64_t parse_bytes(const std::string& s);
// tandem::Error for min_bytes < 4 or > max_bytes, iters < 1, warmup < 0, no
// algorithm or an unknown one.
void validate(const BenchOptions& o);
// The sizes benchmarked: min_bytes, doubling, up to max_bytes, rounded down to
// whole float32 elements.
std::vector<int64_t> bench_sizes(const BenchOptions& o);
double busbw_factor(const std::string& algo, int world_size);

// Collective: every rank calls it with the same options and communicators
// (same order); every rank gets the same rows (sizes outer, then
// communicators, then algorithms).
std::vector<BenchRow> bench_comm(const std::vector<comm::Communicator*>& comms, const BenchOptions& o);
inline std::vector<BenchRow> bench_comm(comm::Communicator& comm, const BenchOptions& o) {
  return bench_comm(std::vector<comm::Communicator*>{&comm}, o);
}

// The table rank 0 prints: one block per algorithm and communicator, then
// busbw ratios per size against gloo's all-reduce when it ran.
std::string format_table(const std::vector<BenchRow>& rows, int world_size, const BenchOptions& o);
// JSON document: {"world_size", "iters", "warmup", "rows": [...]}.
std::string to_json(const std::vector<BenchRow>& rows, int world_size, const BenchOptions& o);

}  // namespace tandem::collectives
