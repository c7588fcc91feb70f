#pragma once
// Export an in-memory image set (e.g. Fashion-MNIST from IDX files) as an
// image folder that ImageFolderDataset reads:
//   <out_dir>/<split>/<class name>/<index>.<jpg|png>
// <index> is the sample's position in `images`, zero-padded so that name order
// is index order. Every class directory is created, even if it gets no image.
#include <string>
#include <vector>

#include <ATen/ATen.h>

namespace tandem::data {

// t-shirt_top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle_boot
const std::vector<std::string>& fashion_mnist_class_names();

// images: uint8 [N,H,W] (or [N,H,W,C], C = 1 or 3); labels: integer [N] in
// [0, class_names.size()). format: "jpg" (or "jpeg") or "png"; quality 1..100
// for JPEG. class_names empty = fashion_mnist_class_names().
// Returns the number of files written. Throws tandem::Error on bad input or I/O.
int64_t export_fashion_mnist_images(const at::Tensor& images, const at::Tensor& labels, const std::string& out_dir,
                                    const std::string& split, const std::string& format, int quality = 95,
                                    const std::vector<std::string>& class_names = {});

}  // namespace tandem::data
