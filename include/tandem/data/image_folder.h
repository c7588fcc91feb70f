#pragma once
// ImageFolderDataset: images on disk in the torchvision ImageFolder layout,
//   <root>/<split>/<class>/*.{jpg,jpeg,png}
// Classes are the sorted subdirectory names of <root>/<split>; files within a
// class are sorted by name. Images are decoded on demand (JPEG via libturbojpeg,
// PNG via libpng) and transformed as torchvision's ImageNet recipe:
//  - train (options.train && ctx.train): RandomResizedCrop(image_size, scale
//    0.08-1, ratio 3/4-4/3, centre-crop fallback) + horizontal flip p = 0.5;
//  - otherwise: resize the shorter side to round(image_size * 256 / 224), then
//    centre-crop image_size. An image that is already image_size x image_size
//    is used as is (no resize), e.g. 28x28 Fashion-MNIST exports at size 28.
// then scaled to [0,1] and normalised with per-channel mean/std.
// Augmentation randomness is a pure function of (ctx.seed, ctx.epoch, index).
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "tandem/data/dataset.h"

namespace tandem::data {

struct ImageFolderOptions {
  int64_t image_size = 224;
  int64_t channels = 3;  // 1 (luma) or 3 (RGB)
  bool train = true;     // random augmentation (also requires LoadContext::train)
  // Per-channel normalisation (mean, stddev); empty = ImageNet defaults (0.485,0.456,0.406 /
  // 0.229,0.224,0.225) for 3 channels, their average (0.449 / 0.226) for 1.
  // A single value is broadcast to every channel.
  std::vector<double> mean;
  std::vector<double> stddev;
  // Replace an undecodable file by the next good sample (counted in bad_samples())
  // instead of throwing.
  bool skip_bad_samples = false;
  // --cache: keep every decoded image (uint8 HWC, before augmentation) in memory
  // after its first load, so later epochs skip reading and decoding; the random
  // crop/flip still differ per epoch. Refused at construction when the estimated
  // decoded size exceeds cache_max_gb.
  bool cache = false;
  double cache_max_gb = 8.0;
};

class ImageFolderDataset : public Dataset {
 public:
  // split: subdirectory of root ("train" / "val"); empty uses root itself.
  ImageFolderDataset(const std::string& root, const std::string& split, ImageFolderOptions options = {});

  int64_t size() const override { return static_cast<int64_t>(paths_.size()); }
  int64_t num_classes() const override { return static_cast<int64_t>(classes_.size()); }
  std::vector<int64_t> sample_shape() const override;
  Example get(int64_t index, const LoadContext& ctx) const override;
  std::string describe(int64_t index) const override;

  const std::vector<std::string>& classes() const { return classes_; }
  const std::string& path(int64_t index) const;
  int64_t target(int64_t index) const;
  const std::string& directory() const { return dir_; }
  const ImageFolderOptions& options() const { return options_; }
  // Number of undecodable files replaced so far (skip_bad_samples).
  int64_t bad_samples() const { return bad_samples_.load(); }
  // --cache: loads served from memory, and the estimated size of the full cache.
  int64_t cache_hits() const { return cache_hits_.load(); }
  double cache_estimate_bytes() const { return cache_estimate_bytes_; }

  // Decode + transform one file (throws tandem::Error naming it on failure).
  at::Tensor load(int64_t index, const LoadContext& ctx) const;

 private:
  std::string dir_;
  ImageFolderOptions options_;
  std::vector<std::string> classes_;
  std::vector<std::string> paths_;
  std::vector<int64_t> targets_;
  at::Tensor mean_, std_;  // float [C,1,1]
  mutable std::atomic<int64_t> bad_samples_{0};
  at::Tensor decoded(int64_t index) const;  // through the cache when enabled
  mutable std::mutex cache_mu_;
  mutable std::vector<at::Tensor> cache_;
  mutable std::atomic<int64_t> cache_hits_{0};
  double cache_estimate_bytes_ = 0;
};

}  // namespace tandem::data
