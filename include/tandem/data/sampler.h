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
  std::vector<int64_t> indices() const;
  // Number of indices this rank gets per epoch (same every epoch).
  int64_t shard_size() const;

 private:
  int64_t n_;
  int rank_, world_;
  bool shuffle_;
  uint64_t seed_;
  Remainder remainder_;
  int64_t epoch_ = 0;
};

}  // namespace tandem::data
