#pragma once
// Helpers shared by the test suites: a scratch directory, the message of a
// tandem::Error, and the Fashion-MNIST batches + reference cnn that the
// synchroniser tests (DDP, ring, parameter server) train against.
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "tandem/data/idx.h"
#include "tandem/models/models.h"
#include "tandem/util/check.h"

namespace tandem::test {

// A fresh directory under the system temp dir, removed with everything in it.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "tandem_test") {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            (prefix + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string str() const { return path_.string(); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// What `fn` threw as tandem::Error, or a marker that no error came.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const tandem::Error& e) {
    return e.what();
  }
  return "<no tandem::Error thrown>";
}

// kSteps global batches of 64 real Fashion-MNIST samples, and the initial
// parameters of a cnn built with seed 0, shared by every test of a suite.
constexpr int kSteps = 5;
constexpr int64_t kGlobalBatch = 64;

struct SgdFixture {
  at::Tensor x, y;               // kSteps * kGlobalBatch samples
  std::vector<at::Tensor> init;  // reference initial parameters (cnn)
};

inline const SgdFixture& sgd_fixture() {
  static SgdFixture f = [] {
    SgdFixture f;
    auto ds = data::load_fashion_mnist(data::kFashionMnistDir, true, kSteps * kGlobalBatch);
    std::vector<int64_t> idx(kSteps * kGlobalBatch);
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int64_t>(i);
    auto b = ds->get_batch(idx, {});
    f.x = b.input;
    f.y = b.target;
    torch::manual_seed(0);
    auto m = models::make_model({"cnn"});
    for (auto& p : m.module->parameters()) f.init.push_back(p.detach().clone());
    return f;
  }();
  return f;
}

// A cnn; with load_reference its parameters are the fixture's initial ones.
inline models::Model fresh_cnn(bool load_reference) {
  auto m = models::make_model({"cnn"});
  if (load_reference) {
    torch::NoGradGuard g;
    auto ps = m.module->parameters();
    for (size_t i = 0; i < ps.size(); ++i) ps[i].copy_(sgd_fixture().init[i]);
  }
  return m;
}

}  // namespace tandem::test
