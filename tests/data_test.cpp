// IDX reader errors, the distributed sampler, and the loader's pipeline contract.
#include <gtest/gtest.h>
#include <zlib.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <set>

#include <torch/torch.h>

#include "tandem/data/idx.h"
#include "tandem/data/loader.h"
#include "tandem/data/sampler.h"
#include "tandem/train/pipeline_plan.h"
#include "tandem/util/check.h"
#include "test_util.h"

using namespace tandem;
namespace fs = std::filesystem;

namespace {

using tandem::test::error_of;

fs::path temp_dir() {
  auto d = fs::temp_directory_path() / ("tandem_data_test_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}

void write_raw(const fs::path& p, const std::vector<uint8_t>& bytes) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

void write_gz(const fs::path& p, const std::vector<uint8_t>& bytes) {
  gzFile g = gzopen(p.c_str(), "wb");
  gzwrite(g, bytes.data(), bytes.size());
  gzclose(g);
}

std::vector<uint8_t> idx_images(uint32_t n, uint32_t rows, uint32_t cols, uint32_t magic = 0x803) {
  std::vector<uint8_t> b;
  for (uint32_t v : {magic, n, rows, cols})
    for (int s = 24; s >= 0; s -= 8) b.push_back((v >> s) & 0xff);
  for (uint32_t i = 0; i < n * rows * cols; ++i) b.push_back(i % 251);
  return b;
}

}  // namespace

TEST(Idx, ReadsTheRealFashionMnist) {
  auto train = data::load_fashion_mnist(data::kFashionMnistDir, true);
  EXPECT_EQ(train->size(), 60000);
  EXPECT_EQ(train->sample_shape(), (std::vector<int64_t>{1, 28, 28}));
  auto test = data::load_fashion_mnist(data::kFashionMnistDir, false);
  EXPECT_EQ(test->size(), 10000);
  EXPECT_EQ(train->labels().max().item<int64_t>(), 9);
  // Normalised with the documented mean/std: the data set's mean maps near 0.
  auto b = train->get_batch({0, 1, 2, 3}, {});
  EXPECT_EQ(b.input.sizes(), (std::vector<int64_t>{4, 1, 28, 28}));
  auto mean = train->images().to(torch::kFloat32).div(255).mean().item<double>();
  EXPECT_NEAR(mean, data::kFashionMnistMean, 1e-3);
}

TEST(Idx, EachBadInputNamesFileAndProblem) {
  auto d = temp_dir();
  auto missing = (d / "nope-images-idx3-ubyte.gz").string();
  auto e = error_of([&] { data::read_idx_images(missing); });
  EXPECT_NE(e.find(missing), std::string::npos) << e;
  EXPECT_NE(e.find("no such file"), std::string::npos) << e;

  auto notgz = d / "plain-images-idx3-ubyte.gz";
  write_raw(notgz, idx_images(2, 4, 4));
  e = error_of([&] { data::read_idx_images(notgz.string()); });
  EXPECT_NE(e.find("not a gzip file"), std::string::npos) << e;

  auto trunc_gz = d / "trunc-gz-images-idx3-ubyte.gz";
  write_gz(d / "full.gz", idx_images(50, 28, 28));
  {
    std::ifstream f(d / "full.gz", std::ios::binary);
    std::vector<uint8_t> all((std::istreambuf_iterator<char>(f)), {});
    all.resize(all.size() / 2);
    write_raw(trunc_gz, all);
  }
  e = error_of([&] { data::read_idx_images(trunc_gz.string()); });
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;

  auto short_body = d / "short-images-idx3-ubyte.gz";
  auto bytes = idx_images(10, 4, 4);
  bytes.resize(bytes.size() - 5);
  write_gz(short_body, bytes);
  e = error_of([&] { data::read_idx_images(short_body.string()); });
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;
  EXPECT_NE(e.find("10 images"), std::string::npos) << e;

  auto magic = d / "magic-images-idx3-ubyte.gz";
  write_gz(magic, idx_images(2, 4, 4, 0x801));
  e = error_of([&] { data::read_idx_images(magic.string()); });
  EXPECT_NE(e.find("wrong magic number"), std::string::npos) << e;
  EXPECT_NE(e.find(magic.string()), std::string::npos) << e;

  // Count mismatch: 3 images, 2 labels, in the layout load_fashion_mnist expects.
  auto set = d / "mismatch";
  fs::create_directories(set);
  write_gz(set / "train-images-idx3-ubyte.gz", idx_images(3, 28, 28));
  std::vector<uint8_t> labels{0, 0, 8, 1, 0, 0, 0, 2, 4, 5};
  write_gz(set / "train-labels-idx1-ubyte.gz", labels);
  e = error_of([&] { data::load_fashion_mnist(set.string(), true); });
  EXPECT_NE(e.find("count mismatch"), std::string::npos) << e;
  EXPECT_NE(e.find("3 images"), std::string::npos) << e;
  fs::remove_all(d);
}

class SamplerTest : public ::testing::TestWithParam<std::tuple<int64_t, int, data::Remainder>> {};

TEST_P(SamplerTest, ShardsAreDisjointCoverAndReshuffle) {
  auto [n, world, rem] = GetParam();
  std::multiset<int64_t> seen;
  std::vector<std::vector<int64_t>> shards;
  for (int r = 0; r < world; ++r) {
    data::DistributedSampler s(n, r, world, true, 7, rem);
    s.set_epoch(3);
    shards.push_back(s.indices());
    EXPECT_EQ(static_cast<int64_t>(shards.back().size()), s.shard_size());
    seen.insert(shards.back().begin(), shards.back().end());
    // Same seed and epoch: identical on every run.
    data::DistributedSampler again(n, r, world, true, 7, rem);
    again.set_epoch(3);
    EXPECT_EQ(again.indices(), shards.back());
    // Another epoch: another order.
    again.set_epoch(4);
    if (n > 10) {
      EXPECT_NE(again.indices(), shards.back());
    }
  }
  std::set<int64_t> distinct(seen.begin(), seen.end());
  if (rem == data::Remainder::kDrop) {
    EXPECT_EQ(static_cast<int64_t>(seen.size()), n / world * world);
    EXPECT_EQ(distinct.size(), seen.size());  // disjoint
  } else {
    EXPECT_EQ(static_cast<int64_t>(distinct.size()), n);  // covers the epoch
    if (rem == data::Remainder::kNone) {
      EXPECT_EQ(static_cast<int64_t>(seen.size()), n);  // disjoint
    }
    if (rem == data::Remainder::kPad) {
      EXPECT_EQ(static_cast<int64_t>(seen.size()), (n + world - 1) / world * world);
      for (auto& s : shards) EXPECT_EQ(s.size(), shards[0].size());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(SizesWorldsModes, SamplerTest,
                         ::testing::Combine(::testing::Values<int64_t>(1000, 1001, 7),
                                            ::testing::Values(1, 2, 3, 4),
                                            ::testing::Values(data::Remainder::kPad, data::Remainder::kDrop,
                                                              data::Remainder::kNone)));

// A data set that records how many batches exist at once and can fail.
class CountingDataset : public data::Dataset {
 public:
  explicit CountingDataset(int64_t n, int64_t fail_at = -1) : n_(n), fail_at_(fail_at) {}
  int64_t size() const override { return n_; }
  int64_t num_classes() const override { return 10; }
  std::vector<int64_t> sample_shape() const override { return {1, 2, 2}; }
  data::Example get(int64_t i, const data::LoadContext&) const override {
    if (i == fail_at_) TANDEM_FAIL("cannot decode /data/bad_sample_", i, ".jpg");
    return {torch::full({1, 2, 2}, static_cast<float>(i)), i % 10};
  }
  std::string describe(int64_t i) const override { return "/data/sample_" + std::to_string(i) + ".jpg"; }

 private:
  int64_t n_, fail_at_;
};

class LoaderTest : public ::testing::TestWithParam<std::tuple<int, int, bool>> {};

TEST_P(LoaderTest, DeliversEverySampleOnceInOrder) {
  auto [workers, buffer, static_shapes] = GetParam();
  auto ds = std::make_shared<CountingDataset>(103);
  data::DistributedSampler sampler(103, 1, 2, true, 1, data::Remainder::kNone);
  data::LoaderOptions o;
  o.batch_size = 8;
  o.num_workers = workers;
  o.buffer_size = buffer;
  o.static_shapes = static_shapes;
  data::Loader loader(ds, o);
  for (int epoch = 0; epoch < 2; ++epoch) {
    sampler.set_epoch(epoch);
    auto want = sampler.indices();
    loader.start_epoch(want, epoch);
    std::vector<int64_t> got;
    int64_t batches = 0;
    while (auto b = loader.next()) {
      ++batches;
      if (static_shapes) {
        EXPECT_EQ(b->input.size(0), 8);
      }
      for (int64_t i = 0; i < b->valid(); ++i) {
        got.push_back(static_cast<int64_t>(b->input[i][0][0][0].item<float>()));
        EXPECT_EQ(b->indices[i], got.back());
      }
    }
    EXPECT_EQ(got, want);  // exactly once, in sampler order
    EXPECT_EQ(batches, loader.num_batches());
  }
}

INSTANTIATE_TEST_SUITE_P(WorkersBuffers, LoaderTest,
                         ::testing::Combine(::testing::Values(0, 1, 3), ::testing::Values(1, 2, 50), ::testing::Bool()));

TEST(Loader, WorkerErrorStopsTrainingWithTheSample) {
  auto ds = std::make_shared<CountingDataset>(64, /*fail_at=*/37);
  data::LoaderOptions o;
  o.batch_size = 8;
  o.num_workers = 2;
  data::Loader loader(ds, o);
  std::vector<int64_t> idx(64);
  for (int64_t i = 0; i < 64; ++i) idx[i] = i;
  loader.start_epoch(idx, 0);
  std::string msg;
  try {
    while (loader.next()) {
    }
  } catch (const tandem::Error& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("bad_sample_37.jpg"), std::string::npos) << msg;
  EXPECT_NE(msg.find("batch 4"), std::string::npos) << msg;
}

TEST(Loader, FullBufferBoundsBatchesInExistence) {
  // A slow consumer: the workers may never hold more than buffer_size batches.
  auto ds = std::make_shared<CountingDataset>(400);
  std::atomic<int> alive{0}, peak{0};
  data::LoaderOptions o;
  o.batch_size = 4;
  o.num_workers = 3;
  o.buffer_size = 5;
  o.transform = [&](data::Batch& b) {
    int now = ++alive;
    int p = peak.load();
    while (now > p && !peak.compare_exchange_weak(p, now)) {
    }
  };
  data::Loader loader(ds, o);
  std::vector<int64_t> idx(400);
  for (int64_t i = 0; i < 400; ++i) idx[i] = i;
  loader.start_epoch(idx, 0);
  while (auto b = loader.next()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    --alive;  // the consumer is done with this batch
  }
  EXPECT_LE(peak.load(), 5 + 1);  // buffer_size held + the one the consumer holds
  EXPECT_GE(peak.load(), 2);      // and the workers did run ahead
}

// --buffer-size auto: the buffer is sized by the memory it will live in.
TEST(PipelinePlan, AutoBufferFitsTheMemoryItLivesIn) {
  train::TrainOptions o;
  o.buffer_size = 0;  // auto
  o.batch_size = 64;
  o.num_workers = 16;  // wants max(4 x 16, 8) = 64 batches
  const std::vector<int64_t> shape{1, 28, 28};  // 200,704 bytes per batch as float32
  // A GPU with 64 MiB free, shared by 2 local ranks: 16 MiB / 2 = 8 MiB -> 41 batches.
  auto gpu = train::plan_pipeline(o, shape, {"free memory of cuda:0", 64.0 * (1 << 20), 2});
  EXPECT_EQ(gpu.buffer_size, 41);
  EXPECT_NE(gpu.describe.find("of free memory of cuda:0"), std::string::npos) << gpu.describe;
  // Plenty of memory: the workers' need decides.
  auto ram = train::plan_pipeline(o, shape, {"RAM", 64.0 * (1 << 30), 2});
  EXPECT_EQ(ram.buffer_size, 64);
  // Not even one batch fits: still one.
  EXPECT_EQ(train::plan_pipeline(o, shape, {"RAM", 1024.0, 1}).buffer_size, 1);
  // An explicit size is kept.
  o.buffer_size = 7;
  EXPECT_EQ(train::plan_pipeline(o, shape, {"RAM", 1024.0, 1}).buffer_size, 7);
}

TEST(PipelinePlan, CpuDataDeviceBudgetsHostRamPerLocalRank) {
  auto m = train::buffer_memory(c10::Device(c10::kCPU), 3);
  EXPECT_EQ(m.where, "RAM");
  EXPECT_EQ(m.sharing_ranks, 3);
  EXPECT_GT(m.bytes, 1e9);  // this machine has GiBs of RAM
}
