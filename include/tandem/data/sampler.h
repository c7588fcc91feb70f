#pragma once
// DistributedSampler: which sample indices rank r of n sees in an epoch.
//
// Per epoch, the indices 0..N-1 are shuffled with a generator seeded by
// (seed, epoch) (our own Fisher-Yates on a 64-bit Mersenne Twister, so the order
// is identical on every LibTorch version), then cut into n equal, disjoint,
// strided shards (rank r takes positions r, r+n, r+2n, ...).
//
// Note [Remainder]: when N is not divisible by n, every rank must still run
// the same number of steps (collectives are matched step by step), so the
// remainder is either dropped (kDrop: N mod n samples are skipped this epoch;
// which ones changes with the shuffle) or padded (kPad, the default, as in
// PyTorch: the first samples of the permutation are repeated, so every sample
// is seen at least once and a few twice). Evaluation uses kNone instead: uneven
// shards, no sample dropped or duplicated, and exact counts summed across ranks.
//
// Note [Resume position]: after s steps of batch B on n ranks, the ranks
// together consumed exactly the permutation's first p = s x B x n positions
// (rank r took r, r+n, ...). Resuming at p with n' ranks, the positions p..N-1
// are cut into n' strided shards and padded as above (kPad: with the first
// samples of the permutation). With n' = n this is exactly the remainder of
// the uninterrupted epoch, so a resumed run visits the same samples in the
// same order; with another n' every sample of the epoch is still visited.
//
// Note [Balanced shares]: with --balance auto the ranks take batches of
// different sizes b_r (sum B, the global batch). The epoch is then cut into
// steps of B consecutive permutation positions, ceil(N / B) of them, the last
// padded with the permutation's first samples as kPad does; in each step
// rank r takes the b_r positions from offset o_r = b_0 + ... + b_{r-1}.
// Every rank thus runs the same number of full steps, and a change of shares
// between steps keeps the cover: the steps before it used positions
// [0, s x B), those after it use the rest. A resume at position p (Note
// [Resume position]) cuts the rest of the epoch the same way from p.
#include <cstdint>
#include <vector>

namespace tandem::data {

enum class Remainder { kPad, kDrop, kNone };

class DistributedSampler {
 public:
  DistributedSampler(int64_t dataset_size, int rank, int world_size, bool shuffle = true, uint64_t seed = 0,
                     Remainder remainder = Remainder::kPad);
  void set_epoch(int64_t epoch) { epoch_ = epoch; }
  int64_t epoch() const { return epoch_; }
  // This rank's indices for the current epoch, in visiting order.
  std::vector<int64_t> indices() const { return indices(0); }
  // Number of indices this rank gets per epoch (same every epoch).
  int64_t shard_size() const { return shard_size(0); }
  // Resuming an epoch part-way (Note [Resume position]): the shard of the
  // permutation's positions from `start` on, for this world size.
  std::vector<int64_t> indices(int64_t start) const;
  int64_t shard_size(int64_t start) const;
  // Note [Balanced shares]: positions [offset, offset + count) of each step of
  // global_batch positions, the steps starting at position `start` (a
  // resumed or re-planned epoch) and running to the epoch's end.
  std::vector<int64_t> balanced_indices(int64_t global_batch, int64_t start, int64_t offset, int64_t count) const;
  static int64_t balanced_steps(int64_t dataset_size, int64_t start, int64_t global_batch) {
    return (std::max<int64_t>(0, dataset_size - start) + global_batch - 1) / global_batch;
  }

 private:
  std::vector<int64_t> permutation() const;
  int64_t n_;
  int rank_, world_;
  bool shuffle_;
  uint64_t seed_;
  Remainder remainder_;
  int64_t epoch_ = 0;
};

}  // namespace tandem::data
