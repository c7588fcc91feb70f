#include "tandem/data/export.h"

#include <filesystem>
#include <system_error>

#include "tandem/data/image_codec.h"
#include "tandem/util/check.h"

namespace tandem::data {
namespace fs = std::filesystem;

const std::vector<std::string>& fashion_mnist_class_names() {
  static const std::vector<std::string> names{"t-shirt_top", "trouser", "pullover", "dress", "coat",
                                              "sandal",      "shirt",   "sneaker",  "bag",   "ankle_boot"};
  return names;
}

int64_t export_fashion_mnist_images(const at::Tensor& images, const at::Tensor& labels, const std::string& out_dir,
                                    const std::string& split, const std::string& format, int quality,
                                    const std::vector<std::string>& class_names) {
  const auto& names = class_names.empty() ? fashion_mnist_class_names() : class_names;
  TANDEM_CHECK(split == "train" || split == "val", "export: split must be 'train' or 'val', got '", split, "'");
  const bool jpeg = format == "jpg" || format == "jpeg";
  TANDEM_CHECK(jpeg || format == "png", "export: format must be 'jpg' or 'png', got '", format, "'");
  TANDEM_CHECK(!jpeg || (quality >= 1 && quality <= 100), "export: JPEG quality must be in 1..100, got ", quality);
  TANDEM_CHECK(jpeg ? have_jpeg_codec() : have_png_codec(), "export: tandem was built without ",
               jpeg ? "libturbojpeg" : "libpng", "; install its development package and reconfigure, or export as ",
               jpeg ? "png" : "jpg");
  TANDEM_CHECK(images.defined() && images.scalar_type() == at::kByte &&
                   (images.dim() == 3 || (images.dim() == 4 && (images.size(3) == 1 || images.size(3) == 3))),
               "export: images must be uint8 [N,H,W] or [N,H,W,C] with C = 1 or 3, got ",
               images.defined() ? images.sizes() : at::IntArrayRef{}, " ",
               images.defined() ? c10::toString(images.scalar_type()) : "undefined");
  TANDEM_CHECK(labels.defined() && labels.dim() == 1 && labels.size(0) == images.size(0) &&
                   at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
               "export: labels must be an integer tensor [N] with N = ", images.size(0), " images");
  for (const auto& n : names)
    TANDEM_CHECK(!n.empty() && n != "." && n != ".." && n.find('/') == std::string::npos,
                 "export: class name '", n, "' is not a valid directory name");

  const int64_t n = images.size(0);
  auto imgs = images.cpu().contiguous();
  auto labs = labels.cpu().to(at::kLong).contiguous();
  const int64_t* lab = labs.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TANDEM_CHECK(lab[i] >= 0 && lab[i] < static_cast<int64_t>(names.size()), "export: label ", lab[i],
                 " of image ", i, " is outside [0, ", names.size(), ")");

  const fs::path base = fs::path(out_dir) / split;
  for (const auto& name : names) {
    std::error_code ec;
    fs::create_directories(base / name, ec);
    TANDEM_CHECK(!ec && fs::is_directory(base / name), "export: cannot create directory '", (base / name).string(),
                 "': ", ec.message());
  }
  const int width = std::max<int>(5, static_cast<int>(std::to_string(std::max<int64_t>(n - 1, 0)).size()));
  const std::string ext = jpeg ? ".jpg" : ".png";
  for (int64_t i = 0; i < n; ++i) {
    std::string idx = std::to_string(i);
    if (static_cast<int>(idx.size()) < width) idx.insert(0, static_cast<size_t>(width) - idx.size(), '0');
    const std::string file = (base / names[static_cast<size_t>(lab[i])] / (idx + ext)).string();
    if (jpeg)
      write_jpeg_file(imgs[i], file, quality);
    else
      write_png_file(imgs[i], file);
  }
  return n;
}

}  // namespace tandem::data
