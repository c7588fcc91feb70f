#include "tandem/data/idx.h"

#include <sys/stat.h>
#include <zlib.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include <torch/torch.h>

#include "tandem/util/check.h"

namespace tandem::data {
namespace {

constexpr uint32_t kImagesMagic = 0x00000803;
constexpr uint32_t kLabelsMagic = 0x00000801;

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Reads a whole IDX file (inflating it when gzip) into memory.
std::vector<uint8_t> read_file(const std::string& path) {
  struct stat st;
  TANDEM_CHECK(stat(path.c_str(), &st) == 0, path, ": no such file (set --data-dir to the folder holding the "
               "Fashion-MNIST IDX files, or install the Debian package dataset-fashion-mnist)");
  FILE* f = std::fopen(path.c_str(), "rb");
  TANDEM_CHECK(f, path, ": cannot open: ", std::strerror(errno));
  unsigned char sig[2] = {0, 0};
  size_t got = std::fread(sig, 1, 2, f);
  std::fclose(f);
  bool is_gzip = got == 2 && sig[0] == 0x1f && sig[1] == 0x8b;
  TANDEM_CHECK(is_gzip || !ends_with(path, ".gz"), path, ": not a gzip file (the name ends in .gz but the "
               "gzip signature 1f 8b is missing); re-download or decompress it correctly");
  gzFile gz = gzopen(path.c_str(), "rb");
  TANDEM_CHECK(gz, path, ": cannot open");
  std::vector<uint8_t> out;
  std::vector<uint8_t> chunk(1 << 16);
  for (;;) {
    int n = gzread(gz, chunk.data(), static_cast<unsigned>(chunk.size()));
    if (n < 0) {
      int errnum = 0;
      std::string msg = gzerror(gz, &errnum);
      gzclose(gz);
      TANDEM_FAIL(path, ": corrupt or truncated gzip stream after ", out.size(), " bytes (", msg, ")");
    }
    if (n == 0) break;
    out.insert(out.end(), chunk.begin(), chunk.begin() + n);
  }
  // zlib reports a gzip stream that stops early as a clean end of file;
  // gzclose_r tells the truth (Z_BUF_ERROR).
  int rc = gzclose(gz);
  TANDEM_CHECK(rc == Z_OK, path, ": truncated gzip stream (", out.size(), " bytes inflated before it ended)");
  return out;
}

uint32_t be32(const std::vector<uint8_t>& b, size_t off) {
  return (uint32_t(b[off]) << 24) | (uint32_t(b[off + 1]) << 16) | (uint32_t(b[off + 2]) << 8) | uint32_t(b[off + 3]);
}

}  // namespace

at::Tensor read_idx_images(const std::string& path) {
  auto b = read_file(path);
  TANDEM_CHECK(b.size() >= 16, path, ": truncated: ", b.size(), " bytes, an IDX image header needs 16");
  uint32_t magic = be32(b, 0);
  TANDEM_CHECK(magic == kImagesMagic, path, ": wrong magic number 0x", std::hex, magic, std::dec,
               " at byte 0 (expected 0x00000803 for IDX images; is this a labels file?)");
  int64_t n = be32(b, 4), rows = be32(b, 8), cols = be32(b, 12);
  // Each count is below 2^32, so rows * cols fits in 64 bits but n * rows * cols
  // may not: compare by division, so a product that wraps cannot pass.
  const uint64_t per_image = uint64_t(rows) * uint64_t(cols);
  TANDEM_CHECK(per_image == 0 || uint64_t(n) <= (b.size() - 16) / per_image, path, ": truncated: header declares ",
               n, " images of ", rows, "x", cols, " (", static_cast<long double>(n) * per_image,
               " bytes of pixels) but the file holds ", b.size() - 16, " after the header");
  const size_t need = 16 + size_t(n * per_image);
  auto t = torch::empty({n, rows, cols}, torch::kUInt8);
  if (need > 16) std::memcpy(t.data_ptr<uint8_t>(), b.data() + 16, need - 16);
  return t;
}

at::Tensor read_idx_labels(const std::string& path) {
  auto b = read_file(path);
  TANDEM_CHECK(b.size() >= 8, path, ": truncated: ", b.size(), " bytes, an IDX label header needs 8");
  uint32_t magic = be32(b, 0);
  TANDEM_CHECK(magic == kLabelsMagic, path, ": wrong magic number 0x", std::hex, magic, std::dec,
               " at byte 0 (expected 0x00000801 for IDX labels; is this an images file?)");
  int64_t n = be32(b, 4);
  TANDEM_CHECK(b.size() >= size_t(8 + n), path, ": truncated: header declares ", n, " labels but the file holds ",
               b.size() - 8);
  auto t = torch::empty({n}, torch::kUInt8);
  if (n > 0) std::memcpy(t.data_ptr<uint8_t>(), b.data() + 8, n);
  return t.to(torch::kInt64);
}

TensorDataset::TensorDataset(at::Tensor images, at::Tensor labels, double mean, double std, int64_t num_classes,
                             std::string origin)
    : images_(std::move(images)), labels_(std::move(labels)), mean_(mean), std_(std), num_classes_(num_classes),
      origin_(std::move(origin)) {
  TANDEM_CHECK(images_.size(0) == labels_.size(0), origin_, ": image/label count mismatch: ", images_.size(0),
               " images but ", labels_.size(0), " labels");
  if (images_.dim() == 3) images_ = images_.unsqueeze(1);
  TANDEM_CHECK(images_.dim() == 4, origin_, ": images must be [N,H,W] or [N,C,H,W]");
  images_ = images_.contiguous();
}

std::vector<int64_t> TensorDataset::sample_shape() const {
  return {images_.size(1), images_.size(2), images_.size(3)};
}

Example TensorDataset::get(int64_t index, const LoadContext&) const {
  auto x = images_[index].to(torch::kFloat32).div_(255.0).sub_(mean_).div_(std_);
  return {x, labels_[index].item<int64_t>()};
}

Batch TensorDataset::get_batch(const std::vector<int64_t>& indices, const LoadContext&) const {
  auto idx = torch::from_blob(const_cast<int64_t*>(indices.data()), {int64_t(indices.size())}, torch::kInt64);
  Batch b;
  b.input = images_.index_select(0, idx).to(torch::kFloat32).div_(255.0).sub_(mean_).div_(std_);
  b.target = labels_.index_select(0, idx);
  b.indices = indices;
  return b;
}

std::string TensorDataset::describe(int64_t index) const { return origin_ + " sample " + std::to_string(index); }

std::shared_ptr<TensorDataset> load_fashion_mnist(const std::string& dir, bool train, int64_t limit) {
  std::string prefix = dir + (train ? "/train" : "/t10k");
  std::string img = prefix + "-images-idx3-ubyte", lbl = prefix + "-labels-idx1-ubyte";
  struct stat st;
  if (stat((img + ".gz").c_str(), &st) == 0 || stat(img.c_str(), &st) != 0) img += ".gz";
  if (stat((lbl + ".gz").c_str(), &st) == 0 || stat(lbl.c_str(), &st) != 0) lbl += ".gz";
  auto images = read_idx_images(img);
  auto labels = read_idx_labels(lbl);
  TANDEM_CHECK(images.size(0) == labels.size(0), "image/label count mismatch: ", img, " holds ", images.size(0),
               " images but ", lbl, " holds ", labels.size(0), " labels");
  if (limit > 0 && limit < images.size(0)) {
    images = images.slice(0, 0, limit).clone();
    labels = labels.slice(0, 0, limit).clone();
  }
  return std::make_shared<TensorDataset>(images, labels, kFashionMnistMean, kFashionMnistStd, 10, img);
}

}  // namespace tandem::data
