// Image codec, Fashion-MNIST image export and ImageFolderDataset, on real
// files written to a temporary directory.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>
#include <unistd.h>

#include "tandem/data/export.h"
#include "tandem/data/image_codec.h"
#include "tandem/data/image_folder.h"
#include "tandem/util/check.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace tandem::data;

namespace {

using tandem::test::error_of;
using tandem::test::TempDir;

// Smooth synthetic 28x28 images (gradient + a Gaussian blob), so JPEG error is small.
at::Tensor smooth_images(int64_t n, int64_t size = 28) {
  auto out = torch::empty({n, size, size}, torch::kUInt8);
  auto a = out.accessor<uint8_t, 3>();
  for (int64_t k = 0; k < n; ++k) {
    const double cx = 6 + (k * 5) % 16, cy = 8 + (k * 3) % 12;
    for (int64_t y = 0; y < size; ++y)
      for (int64_t x = 0; x < size; ++x) {
        double v = 20 + 4.0 * x + 2.0 * y + 10.0 * (k % 5) +
                   90.0 * std::exp(-((x - cx) * (x - cx) + (y - cy) * (y - cy)) / 50.0);
        a[k][y][x] = static_cast<uint8_t>(std::lround(std::clamp(v, 0.0, 255.0)));
      }
  }
  return out;
}

at::Tensor labels_for(int64_t n) { return torch::arange(n, torch::kInt64).remainder(3); }

// Original index from an exported file name (<index>.<ext>).
int64_t index_of(const std::string& path) { return std::stoll(fs::path(path).stem().string()); }

ImageFolderOptions raw_grey(int64_t size = 28) {
  ImageFolderOptions o;
  o.image_size = size;
  o.channels = 1;
  o.train = false;
  o.mean = {0.0};
  o.stddev = {1.0};
  return o;
}

void write_bytes(const fs::path& p, const std::vector<uint8_t>& bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

TEST(ImageCodec, BuiltWithBothCodecs) {
  EXPECT_TRUE(have_jpeg_codec());
  EXPECT_TRUE(have_png_codec());
}

TEST(ImageCodec, PngRoundTripIsExactGreyAndColour) {
  TempDir dir;
  auto grey = smooth_images(1)[0];
  write_png_file(grey, (dir.path() / "g.png").string());
  auto g = decode_image_file((dir.path() / "g.png").string());
  ASSERT_EQ(g.sizes(), (std::vector<int64_t>{28, 28, 1}));
  EXPECT_TRUE(torch::equal(g.squeeze(2), grey));

  auto rgb = torch::stack({grey, grey.flip({1}), 255 - grey}, 2).contiguous();
  write_png_file(rgb, (dir.path() / "c.png").string());
  auto c = decode_image_file((dir.path() / "c.png").string());
  EXPECT_TRUE(torch::equal(c, rgb));
  // Grey -> RGB replicates; RGB -> grey is PIL's luma.
  auto g3 = decode_image_file((dir.path() / "g.png").string(), 3);
  EXPECT_TRUE(torch::equal(g3, grey.unsqueeze(2).expand({28, 28, 3})));
  auto luma = decode_image_file((dir.path() / "c.png").string(), 1).to(torch::kInt).squeeze(2);
  auto r = rgb.to(torch::kInt);
  auto want = (r.select(2, 0) * 19595 + r.select(2, 1) * 38470 + r.select(2, 2) * 7471 + 32768).div(65536, "floor");
  EXPECT_TRUE(torch::equal(luma, want));
}

TEST(ImageCodec, JpegColourRoundTripIsClose) {
  auto grey = smooth_images(1)[0];
  auto rgb = torch::stack({grey, grey.flip({1}), 255 - grey}, 2).contiguous();
  auto bytes = encode_jpeg(rgb, 95);
  auto back = decode_image(bytes.data(), bytes.size(), "mem.jpg");
  ASSERT_EQ(back.sizes(), rgb.sizes());
  auto err = (back.to(torch::kFloat) - rgb.to(torch::kFloat)).abs();
  EXPECT_LT(err.mean().item<float>(), 2.0f);
  EXPECT_LE(err.max().item<float>(), 16.0f);
}

TEST(ImageCodec, CorruptAndTruncatedFilesNameTheFile) {
  TempDir dir;
  std::mt19937 gen(1);
  std::vector<uint8_t> junk(500);
  for (auto& b : junk) b = static_cast<uint8_t>(gen());
  junk[0] = 0xFF, junk[1] = 0xD8, junk[2] = 0xFF;  // JPEG magic, garbage body
  write_bytes(dir.path() / "junk.jpg", junk);
  auto msg = error_of([&] { decode_image_file((dir.path() / "junk.jpg").string()); });
  EXPECT_NE(msg.find("junk.jpg"), std::string::npos) << msg;

  auto good = encode_jpeg(smooth_images(1)[0], 90);
  good.resize(good.size() / 2);
  write_bytes(dir.path() / "cut.jpg", good);
  msg = error_of([&] { decode_image_file((dir.path() / "cut.jpg").string()); });
  EXPECT_NE(msg.find("cut.jpg"), std::string::npos) << msg;

  auto png = encode_png(smooth_images(1)[0]);
  png.resize(png.size() - 20);
  write_bytes(dir.path() / "cut.png", png);
  msg = error_of([&] { decode_image_file((dir.path() / "cut.png").string()); });
  EXPECT_NE(msg.find("cut.png"), std::string::npos) << msg;

  msg = error_of([&] { decode_image_file((dir.path() / "absent.png").string()); });
  EXPECT_NE(msg.find("absent.png"), std::string::npos) << msg;
}

TEST(Export, WritesClassDirectoriesAndFiles) {
  TempDir dir;
  auto images = smooth_images(7);
  auto labels = torch::tensor({0, 1, 9, 0, 4, 9, 1}, torch::kInt64);
  EXPECT_EQ(export_fashion_mnist_images(images, labels, dir.str(), "train", "png"), 7);
  for (auto& name : fashion_mnist_class_names()) EXPECT_TRUE(fs::is_directory(dir.path() / "train" / name)) << name;
  EXPECT_TRUE(fs::exists(dir.path() / "train" / "ankle_boot" / "00002.png"));
  EXPECT_TRUE(fs::exists(dir.path() / "train" / "t-shirt_top" / "00003.png"));
  auto back = decode_image_file((dir.path() / "train" / "coat" / "00004.png").string());
  EXPECT_TRUE(torch::equal(back.squeeze(2), images[4]));

  auto msg = error_of([&] { export_fashion_mnist_images(images, labels, dir.str(), "test", "png"); });
  EXPECT_NE(msg.find("split"), std::string::npos) << msg;
  msg = error_of([&] { export_fashion_mnist_images(images, labels, dir.str(), "val", "gif"); });
  EXPECT_NE(msg.find("format"), std::string::npos) << msg;
  msg = error_of([&] {
    export_fashion_mnist_images(images, torch::full({7}, 10, torch::kInt64), dir.str(), "val", "png");
  });
  EXPECT_NE(msg.find("label 10"), std::string::npos) << msg;
}

TEST(ImageFolder, JpegExportLoadsBackWithinJpegTolerance) {
  TempDir dir;
  const int64_t n = 12;
  auto images = smooth_images(n);
  auto labels = labels_for(n);
  export_fashion_mnist_images(images, labels, dir.str(), "val", "jpg", 95);

  ImageFolderDataset ds(dir.str(), "val", raw_grey());
  ASSERT_EQ(ds.size(), n);
  ASSERT_EQ(ds.num_classes(), 10);  // every class directory exists, sorted by name
  EXPECT_EQ(ds.classes().front(), "ankle_boot");
  EXPECT_EQ(ds.sample_shape(), (std::vector<int64_t>{1, 28, 28}));
  const auto& names = fashion_mnist_class_names();
  double total_err = 0;
  float max_err = 0;
  for (int64_t i = 0; i < ds.size(); ++i) {
    const int64_t k = index_of(ds.path(i));
    EXPECT_EQ(ds.describe(i), ds.path(i));
    auto ex = ds.get(i, {});
    ASSERT_EQ(ex.input.sizes(), (std::vector<int64_t>{1, 28, 28}));
    EXPECT_EQ(ds.classes()[static_cast<size_t>(ex.target)], names[static_cast<size_t>(labels[k].item<int64_t>())]);
    auto err = (ex.input[0] * 255.0 - images[k].to(torch::kFloat)).abs();
    total_err += err.mean().item<double>();
    max_err = std::max(max_err, err.max().item<float>());
  }
  EXPECT_LT(total_err / n, 1.5) << "mean abs error in 0..255 units";
  EXPECT_LE(max_err, 8.0f);
}

TEST(ImageFolder, PngExportLoadsBackExactly) {
  TempDir dir;
  const int64_t n = 9;
  auto images = smooth_images(n);
  export_fashion_mnist_images(images, labels_for(n), dir.str(), "train", "png");
  ImageFolderDataset ds(dir.str(), "train", raw_grey());
  ASSERT_EQ(ds.size(), n);
  for (int64_t i = 0; i < n; ++i) {
    auto x = ds.get(i, {}).input;
    EXPECT_TRUE(torch::equal(torch::round(x[0] * 255.0).to(torch::kUInt8), images[index_of(ds.path(i))])) << i;
  }
  // Batches through the default Dataset::get_batch.
  auto b = ds.get_batch({0, 3, 5}, {});
  EXPECT_EQ(b.input.sizes(), (std::vector<int64_t>{3, 1, 28, 28}));
  EXPECT_EQ(b.target[1].item<int64_t>(), ds.target(3));

  // Three channels and ImageNet normalisation by default.
  ImageFolderOptions rgb;
  rgb.image_size = 28;
  rgb.train = false;
  ImageFolderDataset ds3(dir.str(), "train", rgb);
  auto x3 = ds3.get(0, {}).input;
  ASSERT_EQ(x3.sizes(), (std::vector<int64_t>{3, 28, 28}));
  auto raw = images[index_of(ds3.path(0))].to(torch::kFloat) / 255.0;
  EXPECT_TRUE(torch::allclose(x3[0], (raw - 0.485) / 0.229, 1e-4, 1e-4));
  EXPECT_TRUE(torch::allclose(x3[2], (raw - 0.406) / 0.225, 1e-4, 1e-4));
}

TEST(ImageFolder, ValResizesAndCentreCrops) {
  TempDir dir;
  // 40x60 colour image: a horizontal ramp.
  auto ramp = torch::linspace(0, 255, 60).round().to(torch::kUInt8).expand({40, 60});
  auto rgb = torch::stack({ramp, ramp, ramp}, 2).contiguous();
  fs::create_directories(dir.path() / "val" / "a");
  write_png_file(rgb, (dir.path() / "val" / "a" / "x.png").string());
  ImageFolderOptions o;
  o.image_size = 32;
  o.train = false;
  o.mean = {0.0};
  o.stddev = {1.0};
  ImageFolderDataset ds(dir.str(), "val", o);
  auto x = ds.get(0, {}).input;
  ASSERT_EQ(x.sizes(), (std::vector<int64_t>{3, 32, 32}));
  // Shorter side 40 -> round(32*256/224) = 37, longer 60 -> 55; crop keeps the middle of the ramp.
  auto row = x[0][16];
  EXPECT_GT(row[31].item<float>(), row[0].item<float>());
  EXPECT_NEAR(row.mean().item<float>(), 0.5f, 0.03f);
  EXPECT_GE(x.min().item<float>(), 0.0f);
  EXPECT_LE(x.max().item<float>(), 1.0f + 1e-5f);
}

TEST(ImageFolder, TrainAugmentationIsDeterministicPerSeedEpochIndex) {
  TempDir dir;
  export_fashion_mnist_images(smooth_images(6), labels_for(6), dir.str(), "train", "png");
  ImageFolderOptions o = raw_grey(24);
  o.train = true;
  ImageFolderDataset ds(dir.str(), "train", o);
  LoadContext c0{/*epoch=*/0, /*train=*/true, /*seed=*/42};
  LoadContext c1{/*epoch=*/1, /*train=*/true, /*seed=*/42};
  int differ = 0;
  for (int64_t i = 0; i < ds.size(); ++i) {
    auto a = ds.get(i, c0).input;
    ASSERT_EQ(a.sizes(), (std::vector<int64_t>{1, 24, 24}));
    // Same (seed, epoch, index) from another thread gives the same sample.
    at::Tensor b;
    std::thread t([&] { b = ds.get(i, c0).input; });
    t.join();
    EXPECT_TRUE(torch::equal(a, b)) << i;
    differ += !torch::equal(a, ds.get(i, c1).input);
  }
  EXPECT_GE(differ, 4);
  // ctx.train = false turns augmentation off: resize+crop path, deterministic.
  LoadContext eval{0, false, 42};
  EXPECT_TRUE(torch::equal(ds.get(0, eval).input, ds.get(0, LoadContext{5, false, 7}).input));
}

TEST(ImageFolder, CacheServesLaterEpochsFromMemoryWithFreshAugmentation) {
  TempDir dir;
  export_fashion_mnist_images(smooth_images(6), labels_for(6), dir.str(), "train", "jpg");
  ImageFolderOptions o = raw_grey(24);
  o.train = true;
  ImageFolderDataset plain(dir.str(), "train", o);
  o.cache = true;
  ImageFolderDataset cached(dir.str(), "train", o);
  EXPECT_NEAR(cached.cache_estimate_bytes(), 6.0 * 28 * 28, 1.0);  // decoded uint8 28x28x1
  int differ = 0;
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    LoadContext ctx{epoch, true, 42};
    for (int64_t i = 0; i < cached.size(); ++i) {
      auto a = cached.get(i, ctx).input;
      EXPECT_TRUE(torch::equal(a, plain.get(i, ctx).input)) << "epoch " << epoch << " sample " << i;
      if (epoch > 0) differ += !torch::equal(a, cached.get(i, LoadContext{epoch - 1, true, 42}).input);
    }
  }
  // Epoch 0 decodes (6 misses); epochs 1 and 2 load each image twice, all hits.
  EXPECT_EQ(cached.cache_hits(), 2 * 12);
  EXPECT_GE(differ, 8);  // augmentation still changes per epoch
  // The files are no longer needed once cached.
  fs::remove_all(dir.path() / "train");
  EXPECT_NO_THROW(cached.get(0, LoadContext{7, true, 42}));
  EXPECT_THROW(plain.get(0, LoadContext{7, true, 42}), tandem::Error);
}

TEST(ImageFolder, CacheLargerThanTheLimitIsRefused) {
  TempDir dir;
  export_fashion_mnist_images(smooth_images(4), labels_for(4), dir.str(), "train", "png");
  ImageFolderOptions o = raw_grey(24);
  o.cache = true;
  o.cache_max_gb = 1e-9;  // 1 byte
  auto msg = error_of([&] { ImageFolderDataset ds(dir.str(), "train", o); });
  EXPECT_NE(msg.find("--cache-max-gb"), std::string::npos) << msg;
  EXPECT_NE(msg.find("4 images"), std::string::npos) << msg;
}

TEST(ImageFolder, BadFileNamesPathOrIsSkippedAndCounted) {
  TempDir dir;
  export_fashion_mnist_images(smooth_images(4), labels_for(4), dir.str(), "val", "jpg");
  std::mt19937 gen(7);
  std::vector<uint8_t> junk(300);
  for (auto& b : junk) b = static_cast<uint8_t>(gen());
  // Sorts first within t-shirt_top (class 8 of the sorted names).
  write_bytes(dir.path() / "val" / "t-shirt_top" / "00000_corrupt.jpg", junk);

  ImageFolderDataset strict(dir.str(), "val", raw_grey());
  ASSERT_EQ(strict.size(), 5);
  int64_t bad = -1;
  for (int64_t i = 0; i < strict.size(); ++i)
    if (strict.path(i).find("corrupt") != std::string::npos) bad = i;
  ASSERT_GE(bad, 0);
  auto msg = error_of([&] { strict.get(bad, {}); });
  EXPECT_NE(msg.find("00000_corrupt.jpg"), std::string::npos) << msg;

  ImageFolderOptions o = raw_grey();
  o.skip_bad_samples = true;
  ImageFolderDataset lenient(dir.str(), "val", o);
  EXPECT_EQ(lenient.bad_samples(), 0);
  auto ex = lenient.get(bad, {});
  EXPECT_EQ(lenient.bad_samples(), 1);
  const int64_t next = (bad + 1) % lenient.size();
  EXPECT_TRUE(torch::equal(ex.input, lenient.get(next, {}).input));
  EXPECT_EQ(ex.target, lenient.target(next));
  for (int64_t i = 0; i < lenient.size(); ++i) lenient.get(i, {});
  EXPECT_EQ(lenient.bad_samples(), 2);
}

TEST(ImageFolder, LayoutErrorsNameTheDirectory) {
  TempDir dir;
  auto msg = error_of([&] { ImageFolderDataset(dir.str(), "train", raw_grey()); });
  EXPECT_NE(msg.find((dir.path() / "train").string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("<class>"), std::string::npos) << msg;

  fs::create_directories(dir.path() / "train");
  msg = error_of([&] { ImageFolderDataset(dir.str(), "train", raw_grey()); });
  EXPECT_NE(msg.find("no class"), std::string::npos) << msg;

  fs::create_directories(dir.path() / "train" / "cat");
  write_bytes(dir.path() / "train" / "cat" / "notes.txt", {'h', 'i'});
  msg = error_of([&] { ImageFolderDataset(dir.str(), "train", raw_grey()); });
  EXPECT_NE(msg.find("no images"), std::string::npos) << msg;

  ImageFolderOptions o = raw_grey();
  o.channels = 2;
  msg = error_of([&] { ImageFolderDataset(dir.str(), "train", o); });
  EXPECT_NE(msg.find("channels"), std::string::npos) << msg;
}
