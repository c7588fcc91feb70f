#pragma once
// IDX files (the MNIST / Fashion-MNIST format), gzip-compressed or raw.
// Every malformed input is a tandem::Error naming the file and what is wrong:
// missing file, not gzip (a .gz name without the gzip signature), truncated,
// wrong magic number, image/label count mismatch.
#include <string>

#include <ATen/ATen.h>

#include "tandem/data/dataset.h"

namespace tandem::data {

constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";
constexpr double kFashionMnistMean = 0.2860;
constexpr double kFashionMnistStd = 0.3530;

// uint8 [N, rows, cols]; magic 0x00000803.
at::Tensor read_idx_images(const std::string& path);
// int64 [N]; magic 0x00000801.
at::Tensor read_idx_labels(const std::string& path);

// In-memory images (uint8 [N,H,W] or [N,C,H,W]) with labels, normalised on
// access with (x/255 - mean) / std. Batches are one gather, no copies per sample.
class TensorDataset : public Dataset {
 public:
  TensorDataset(at::Tensor images, at::Tensor labels, double mean, double std, int64_t num_classes,
                std::string origin);
  int64_t size() const override { return labels_.size(0); }
  int64_t num_classes() const override { return num_classes_; }
  std::vector<int64_t> sample_shape() const override;
  Example get(int64_t index, const LoadContext& ctx) const override;
  Batch get_batch(const std::vector<int64_t>& indices, const LoadContext& ctx) const override;
  std::string describe(int64_t index) const override;
  const at::Tensor& images() const { return images_; }
  const at::Tensor& labels() const { return labels_; }

 private:
  at::Tensor images_, labels_;
  double mean_, std_;
  int64_t num_classes_;
  std::string origin_;
};

// Fashion-MNIST from `dir` (train-*/t10k-* IDX .gz files). `limit` > 0 keeps
// only the first `limit` samples (for quick runs and tests).
std::shared_ptr<TensorDataset> load_fashion_mnist(const std::string& dir, bool train, int64_t limit = 0);

}  // namespace tandem::data
