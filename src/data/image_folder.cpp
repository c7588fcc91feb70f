#include "tandem/data/image_folder.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <system_error>

#include <torch/nn/functional/upsampling.h>

#include "tandem/data/image_codec.h"
#include "tandem/util/check.h"

namespace tandem::data {
namespace fs = std::filesystem;
namespace {

const char* kLayout = "expected layout <root>/<split>/<class>/*.{jpg,jpeg,png}, e.g. D/train/cat/0001.jpg";

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Small deterministic generator, independent of the standard library's
// distribution implementations (so results match across platforms).
struct Rng {
  uint64_t state;
  uint64_t next() { return state = splitmix64(state); }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  double uniform(double a, double b) { return a + (b - a) * uniform(); }
  int64_t randint(int64_t lo, int64_t hi_exclusive) {  // [lo, hi)
    return lo + static_cast<int64_t>(next() % static_cast<uint64_t>(hi_exclusive - lo));
  }
};

// float [C,H,W] -> [C,h,w], bilinear, half-pixel centres, antialiased when shrinking.
at::Tensor resize(const at::Tensor& chw, int64_t h, int64_t w) {
  if (chw.size(1) == h && chw.size(2) == w) return chw;
  namespace F = torch::nn::functional;
  auto opts = F::InterpolateFuncOptions()
                  .size(std::vector<int64_t>{h, w})
                  .mode(torch::kBilinear)
                  .align_corners(false)
                  .antialias(true);
  return F::interpolate(chw.unsqueeze(0), opts).squeeze(0);
}

std::vector<double> resolve_stats(std::vector<double> v, int64_t channels, const std::vector<double>& rgb,
                                  double grey, const char* what) {
  if (v.empty()) return channels == 3 ? rgb : std::vector<double>{grey};
  if (v.size() == 1) return std::vector<double>(static_cast<size_t>(channels), v[0]);
  TANDEM_CHECK(static_cast<int64_t>(v.size()) == channels, "image folder: ", what, " has ", v.size(),
               " values but channels is ", channels, "; give one value or one per channel");
  return v;
}

}  // namespace

ImageFolderDataset::ImageFolderDataset(const std::string& root, const std::string& split,
                                       ImageFolderOptions options)
    : options_(std::move(options)) {
  TANDEM_CHECK(options_.channels == 1 || options_.channels == 3, "image folder: channels must be 1 or 3, got ",
               options_.channels);
  TANDEM_CHECK(options_.image_size >= 1, "image folder: image size must be >= 1, got ", options_.image_size);
  fs::path dir = split.empty() ? fs::path(root) : fs::path(root) / split;
  dir_ = dir.string();
  std::error_code ec;
  TANDEM_CHECK(fs::is_directory(dir, ec), "image folder: directory '", dir_, "' does not exist or is not a directory; ",
               kLayout);

  try {
    for (const auto& entry : fs::directory_iterator(dir)) {
      const std::string name = entry.path().filename().string();
      if (name.empty() || name[0] == '.') continue;
      if (fs::is_directory(entry.path())) classes_.push_back(name);
    }
    std::sort(classes_.begin(), classes_.end());
    TANDEM_CHECK(!classes_.empty(), "image folder: no class subdirectories in '", dir_, "'; ", kLayout);
    bool need_jpeg = false, need_png = false;
    for (size_t c = 0; c < classes_.size(); ++c) {
      std::vector<std::string> files;
      for (const auto& entry : fs::directory_iterator(dir / classes_[c])) {
        const std::string p = entry.path().string();
        const std::string name = entry.path().filename().string();
        if (name.empty() || name[0] == '.' || !is_image_file_name(p) || fs::is_directory(entry.path())) continue;
        files.push_back(p);
      }
      std::sort(files.begin(), files.end());
      for (auto& f : files) {
        std::string ext = f.substr(f.find_last_of('.') + 1);
        std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char ch) { return std::tolower(ch); });
        (ext == "png" ? need_png : need_jpeg) = true;
        paths_.push_back(std::move(f));
        targets_.push_back(static_cast<int64_t>(c));
      }
    }
    TANDEM_CHECK(!paths_.empty(), "image folder: no images (*.jpg, *.jpeg, *.png) under the ", classes_.size(),
                 " class directories of '", dir_, "'; ", kLayout);
    TANDEM_CHECK(!need_jpeg || have_jpeg_codec(), "image folder '", dir_,
                 "' holds JPEG files but tandem was built without libturbojpeg; install the libturbojpeg "
                 "development package and reconfigure");
    TANDEM_CHECK(!need_png || have_png_codec(), "image folder '", dir_,
                 "' holds PNG files but tandem was built without libpng; install the libpng development "
                 "package and reconfigure");
  } catch (const fs::filesystem_error& e) {
    TANDEM_FAIL("image folder: cannot list '", dir_, "': ", e.what());
  }

  const int64_t c = options_.channels;
  auto mean = resolve_stats(options_.mean, c, {0.485, 0.456, 0.406}, 0.449, "mean");
  auto stdv = resolve_stats(options_.stddev, c, {0.229, 0.224, 0.225}, 0.226, "std");
  for (double s : stdv) TANDEM_CHECK(s > 0, "image folder: std values must be > 0, got ", s);
  mean_ = at::tensor(std::vector<float>(mean.begin(), mean.end())).view({c, 1, 1});
  std_ = at::tensor(std::vector<float>(stdv.begin(), stdv.end())).view({c, 1, 1});

  if (options_.cache) {
    TANDEM_CHECK(options_.cache_max_gb > 0, "--cache-max-gb must be > 0, got ", options_.cache_max_gb);
    // Estimate from the first decodable images: mean decoded bytes x count.
    double bytes = 0;
    int seen = 0;
    for (size_t i = 0; i < paths_.size() && seen < 16; i += std::max<size_t>(1, paths_.size() / 16)) {
      try {
        bytes += static_cast<double>(decode_image_file(paths_[i], static_cast<int>(c)).nbytes());
        ++seen;
      } catch (const std::exception&) {
      }
    }
    cache_estimate_bytes_ = seen ? bytes / seen * static_cast<double>(paths_.size()) : 0;
    const double gb = cache_estimate_bytes_ / 1e9;
    TANDEM_CHECK(gb <= options_.cache_max_gb, "--cache: the decoded images of '", dir_, "' need about ", gb,
                 " GB (", paths_.size(), " images), more than --cache-max-gb ", options_.cache_max_gb,
                 "; raise --cache-max-gb (this machine must have the memory) or drop --cache");
    cache_.resize(paths_.size());
  }
}

at::Tensor ImageFolderDataset::decoded(int64_t index) const {
  const std::string& file = path(index);
  if (!options_.cache) return decode_image_file(file, static_cast<int>(options_.channels));
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    const at::Tensor& hit = cache_[static_cast<size_t>(index)];
    if (hit.defined()) {
      cache_hits_.fetch_add(1);
      return hit;
    }
  }
  at::Tensor hwc = decode_image_file(file, static_cast<int>(options_.channels));
  std::lock_guard<std::mutex> lock(cache_mu_);
  cache_[static_cast<size_t>(index)] = hwc;
  return hwc;
}

std::vector<int64_t> ImageFolderDataset::sample_shape() const {
  return {options_.channels, options_.image_size, options_.image_size};
}

const std::string& ImageFolderDataset::path(int64_t index) const {
  TANDEM_CHECK(index >= 0 && index < size(), "image folder '", dir_, "': index ", index, " out of range [0, ",
               size(), ")");
  return paths_[static_cast<size_t>(index)];
}

int64_t ImageFolderDataset::target(int64_t index) const {
  path(index);  // range check
  return targets_[static_cast<size_t>(index)];
}

std::string ImageFolderDataset::describe(int64_t index) const {
  if (index < 0 || index >= size()) return "sample " + std::to_string(index) + " of image folder '" + dir_ + "'";
  return paths_[static_cast<size_t>(index)];
}

at::Tensor ImageFolderDataset::load(int64_t index, const LoadContext& ctx) const {
  at::Tensor hwc = decoded(index);
  const int64_t H = hwc.size(0), W = hwc.size(1), S = options_.image_size;
  at::Tensor x;
  if (options_.train && ctx.train) {
    Rng rng{splitmix64(splitmix64(splitmix64(ctx.seed) ^ static_cast<uint64_t>(ctx.epoch)) ^
                       static_cast<uint64_t>(index))};
    // torchvision RandomResizedCrop.get_params, scale (0.08, 1), ratio (3/4, 4/3).
    const double area = static_cast<double>(H) * static_cast<double>(W);
    const double log_lo = std::log(3.0 / 4.0), log_hi = std::log(4.0 / 3.0);
    int64_t top = 0, left = 0, h = 0, w = 0;
    bool found = false;
    for (int attempt = 0; attempt < 10 && !found; ++attempt) {
      const double target_area = area * rng.uniform(0.08, 1.0);
      const double aspect = std::exp(rng.uniform(log_lo, log_hi));
      w = static_cast<int64_t>(std::llround(std::sqrt(target_area * aspect)));
      h = static_cast<int64_t>(std::llround(std::sqrt(target_area / aspect)));
      if (w > 0 && w <= W && h > 0 && h <= H) {
        top = rng.randint(0, H - h + 1);
        left = rng.randint(0, W - w + 1);
        found = true;
      }
    }
    if (!found) {  // centre crop at the nearest allowed aspect ratio
      const double in_ratio = static_cast<double>(W) / static_cast<double>(H);
      if (in_ratio < 3.0 / 4.0) {
        w = W;
        h = std::max<int64_t>(1, std::llround(w / (3.0 / 4.0)));
      } else if (in_ratio > 4.0 / 3.0) {
        h = H;
        w = std::max<int64_t>(1, std::llround(h * (4.0 / 3.0)));
      } else {
        w = W;
        h = H;
      }
      h = std::min(h, H);
      w = std::min(w, W);
      top = (H - h) / 2;
      left = (W - w) / 2;
    }
    const bool flip = rng.uniform() < 0.5;
    x = hwc.narrow(0, top, h).narrow(1, left, w).permute({2, 0, 1}).to(at::kFloat);
    x = resize(x, S, S);
    if (flip) x = x.flip({2});
  } else if (H == S && W == S) {
    x = hwc.permute({2, 0, 1}).to(at::kFloat);
  } else {
    // Resize(round(S*256/224)) on the shorter side, then CenterCrop(S).
    const int64_t short_target = std::max<int64_t>(S, std::llround(S * 256.0 / 224.0));
    int64_t nh, nw;
    if (H <= W) {
      nh = short_target;
      nw = std::max<int64_t>(S, static_cast<int64_t>(static_cast<double>(short_target) * W / H));
    } else {
      nw = short_target;
      nh = std::max<int64_t>(S, static_cast<int64_t>(static_cast<double>(short_target) * H / W));
    }
    const int64_t top = std::llround((nh - S) / 2.0), left = std::llround((nw - S) / 2.0);
    x = resize(hwc.permute({2, 0, 1}).to(at::kFloat), nh, nw).narrow(1, top, S).narrow(2, left, S);
  }
  return ((x.div(255.0f) - mean_) / std_).contiguous();
}

Example ImageFolderDataset::get(int64_t index, const LoadContext& ctx) const {
  const int64_t n = size();
  TANDEM_CHECK(index >= 0 && index < n, "image folder '", dir_, "': index ", index, " out of range [0, ", n, ")");
  std::string first_error;
  for (int64_t attempt = 0; attempt < n; ++attempt) {
    const int64_t i = (index + attempt) % n;
    try {
      return Example{load(i, ctx), targets_[static_cast<size_t>(i)]};
    } catch (const Error& e) {
      if (!options_.skip_bad_samples)
        TANDEM_FAIL("image folder '", dir_, "', sample ", i, ": ", e.what(),
                    " (fix or delete the file, or pass --skip-bad-samples to replace bad files and count them)");
      bad_samples_.fetch_add(1);
      if (first_error.empty()) first_error = e.what();
    }
  }
  TANDEM_FAIL("image folder '", dir_, "': no decodable image found (all ", n, " files failed); first error: ",
              first_error);
}

}  // namespace tandem::data
