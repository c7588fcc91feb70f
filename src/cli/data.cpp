// `tandem data export`: Fashion-MNIST written as an ImageNet-style image folder
// (D/train/<class>/*.jpg, D/val/<class>/*.jpg), so the JPEG pipeline and the
// ResNets run on real files.
#include <cstdio>
#include <memory>

#include "commands.h"
#include "tandem/data/export.h"
#include "tandem/data/idx.h"
#include "tandem/util/check.h"

namespace tandem::cli {

void register_data(CLI::App& app) {
  auto* data = app.add_subcommand("data", "Data set tools");
  data->require_subcommand(1);
  auto* exp = data->add_subcommand("export", "Write Fashion-MNIST as an image folder (train/ and val/ by class)");
  struct Flags {
    std::string dataset = "fashion-mnist", format = "jpg", out, data_dir = data::kFashionMnistDir;
    int quality = 95;
    int64_t limit = 0, val_limit = 0;
  };
  auto f = std::make_shared<Flags>();
  exp->add_option("--dataset", f->dataset, "Data set to export (fashion-mnist)")->capture_default_str();
  exp->add_option("--format", f->format, "jpg or png")->capture_default_str();
  exp->add_option("--out", f->out, "Output folder")->required();
  exp->add_option("--data-dir", f->data_dir, "Folder of the IDX files")->capture_default_str();
  exp->add_option("--quality", f->quality, "JPEG quality 1-100")->capture_default_str();
  exp->add_option("--limit", f->limit, "Export only the first N training images (0: all)")->capture_default_str();
  exp->add_option("--val-limit", f->val_limit, "Export only the first N test images (0: all)")->capture_default_str();
  exp->callback([f] {
    TANDEM_CHECK(f->dataset == "fashion-mnist", "--dataset ", f->dataset, ": only fashion-mnist can be exported");
    TANDEM_CHECK(f->format == "jpg" || f->format == "png", "--format ", f->format, ": choose jpg or png");
    TANDEM_CHECK(f->quality >= 1 && f->quality <= 100, "--quality must be in 1..100, got ", f->quality);
    for (bool train : {true, false}) {
      auto ds = data::load_fashion_mnist(f->data_dir, train, train ? f->limit : f->val_limit);
      auto n = data::export_fashion_mnist_images(ds->images().squeeze(1), ds->labels(), f->out,
                                                 train ? "train" : "val", f->format, f->quality);
      std::fprintf(stderr, "[tandem] wrote %lld %s images to %s/%s\n", static_cast<long long>(n), f->format.c_str(),
                   f->out.c_str(), train ? "train" : "val");
    }
  });
}

}  // namespace tandem::cli
