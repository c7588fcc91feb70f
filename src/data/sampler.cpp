#include "tandem/data/sampler.h"

#include <algorithm>
#include <numeric>
#include <random>

#include "tandem/util/check.h"

namespace tandem::data {

DistributedSampler::DistributedSampler(int64_t dataset_size, int rank, int world_size, bool shuffle, uint64_t seed,
                                       Remainder remainder)
    : n_(dataset_size), rank_(rank), world_(world_size), shuffle_(shuffle), seed_(seed), remainder_(remainder) {
  TANDEM_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "sampler: rank ", rank, " outside world size ",
               world_size);
  TANDEM_CHECK(dataset_size >= 0, "sampler: negative dataset size");
  TANDEM_CHECK(remainder != Remainder::kDrop || dataset_size >= world_size, "the data set has ", dataset_size,
               " samples, fewer than the ", world_size, " ranks: use more data or fewer ranks");
}

int64_t DistributedSampler::shard_size(int64_t start) const {
  TANDEM_CHECK(start >= 0, "sampler: negative start position ", start);
  const int64_t n = std::max<int64_t>(0, n_ - start);
  switch (remainder_) {
    case Remainder::kPad: return (n + world_ - 1) / world_;
    case Remainder::kDrop: return n / world_;
    case Remainder::kNone: return n / world_ + (rank_ < n % world_ ? 1 : 0);
  }
  return 0;
}

std::vector<int64_t> DistributedSampler::permutation() const {
  std::vector<int64_t> perm(n_);
  std::iota(perm.begin(), perm.end(), 0);
  if (shuffle_ && n_ > 1) {
    std::mt19937_64 gen(seed_ * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(epoch_) + 1);
    for (int64_t i = n_ - 1; i > 0; --i) {
      std::uniform_int_distribution<int64_t> pick(0, i);
      std::swap(perm[i], perm[pick(gen)]);
    }
  }
  return perm;
}

std::vector<int64_t> DistributedSampler::balanced_indices(int64_t global_batch, int64_t start, int64_t offset,
                                                          int64_t count) const {
  TANDEM_CHECK(global_batch >= 1 && offset >= 0 && count >= 0 && offset + count <= global_batch,
               "sampler: share [", offset, ", ", offset + count, ") outside the global batch of ", global_batch);
  std::vector<int64_t> out;
  if (n_ == 0) return out;
  const auto perm = permutation();
  const int64_t steps = balanced_steps(n_, start, global_batch);
  out.reserve(static_cast<size_t>(steps * count));
  // Note [Balanced shares]: positions past N wrap to the permutation's start (padding).
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t first = start + s * global_batch + offset;
    for (int64_t i = first; i < first + count; ++i) out.push_back(perm[i % n_]);
  }
  return out;
}

std::vector<int64_t> DistributedSampler::indices(int64_t start) const {
  auto perm = permutation();
  const int64_t first = std::min(start, n_);  // Note [Resume position]
  const int64_t total = first + (remainder_ == Remainder::kNone ? n_ - first : shard_size(start) * world_);
  if (remainder_ == Remainder::kPad && n_ > 0) {
    for (int64_t i = n_; i < total; ++i) perm.push_back(perm[(i - n_) % n_]);
  }
  std::vector<int64_t> out;
  out.reserve(shard_size(start));
  for (int64_t i = first + rank_; i < total; i += world_) out.push_back(perm[i]);
  return out;
}

}  // namespace tandem::data
