#pragma once
// Dataset: random access to labelled samples. Implementations: IDX (in-memory
// Fashion-MNIST), image folders (decoded on demand), synthetic.
//
// Thread-safety: get() and get_batch() are const and may be called from several
// loader workers at once; implementations keep no mutable shared state (or lock it).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/Event.h>

namespace tandem::data {

struct Example {
  at::Tensor input;   // float, [C, H, W], normalised
  int64_t target = 0;
};

struct Batch {
  at::Tensor input;    // float [B, C, H, W]
  at::Tensor target;   // int64 [B]
  at::Tensor mask;     // bool [B]; undefined unless padded (--static-shapes)
  std::vector<int64_t> indices;  // dataset indices, in order
  // Set when a loader worker uploaded the batch to a CUDA data device on its own
  // stream: recorded after the upload; the consumer waits on it (data::make_ready).
  std::shared_ptr<c10::Event> ready;
  // Real (unpadded) rows. Padding never adds indices, so no device round trip.
  int64_t valid() const {
    if (!mask.defined()) return target.size(0);
    return indices.empty() ? mask.sum().item<int64_t>() : static_cast<int64_t>(indices.size());
  }
};

// Per-sample random augmentation is seeded per (epoch, index), so a sample
// decodes the same way whichever worker loads it.
struct LoadContext {
  int64_t epoch = 0;
  bool train = true;
  uint64_t seed = 0;
};

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual int64_t size() const = 0;
  virtual int64_t num_classes() const = 0;
  // Shape of one input sample, [C, H, W].
  virtual std::vector<int64_t> sample_shape() const = 0;
  virtual Example get(int64_t index, const LoadContext& ctx) const = 0;
  // Default: stacks get(). In-memory datasets override with one gather.
  virtual Batch get_batch(const std::vector<int64_t>& indices, const LoadContext& ctx) const;
  // Where sample `index` comes from (a file path and position), for errors.
  virtual std::string describe(int64_t index) const { return "sample " + std::to_string(index); }
};
using DatasetPtr = std::shared_ptr<Dataset>;

}  // namespace tandem::data
