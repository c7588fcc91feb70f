// Gradient synchronisers: 2 ranks x batch 32 must equal 1 rank x batch 64 on
// the same Fashion-MNIST samples, for DDP and the ring, with and without
// gradient accumulation. Ranks are threads sharing an in-memory store.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "tandem/collectives/ring_allreduce.h"
#include "tandem/comm/communicator.h"
#include "tandem/data/idx.h"
#include "tandem/models/models.h"
#include "tandem/sync/ddp.h"
#include "tandem/sync/ring_sync.h"
#include "tandem/util/check.h"
#include "test_util.h"

using namespace tandem;

namespace {

using test::kGlobalBatch;
using test::kSteps;

// Runs kSteps SGD steps; each rank takes its slice of every global batch,
// split into `accum` micro-batches. Returns the gradients of step 0 and the
// final parameters.
struct Outcome {
  std::vector<at::Tensor> first_grads, params;
};

template <typename MakeSync>
Outcome train(int rank, int world, int accum, MakeSync make_sync) {
  const auto& f = test::sgd_fixture();
  auto m = test::fresh_cnn(/*load_reference=*/rank == 0);  // other ranks must get rank 0's via broadcast
  auto sync = make_sync(m.module);
  torch::optim::SGD opt(m.module->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  Outcome out;
  const int64_t per_rank = kGlobalBatch / world, micro = per_rank / accum;
  for (int s = 0; s < kSteps; ++s) {
    opt.zero_grad();
    for (int a = 0; a < accum; ++a) {
      if (sync) sync->begin_step(a == accum - 1);
      int64_t b = s * kGlobalBatch + rank * per_rank + a * micro;
      auto loss = torch::nn::functional::cross_entropy(m.forward(f.x.slice(0, b, b + micro)), f.y.slice(0, b, b + micro));
      (loss / accum).backward();
      if (sync) sync->finish();
    }
    if (s == 0)
      for (auto& p : m.module->parameters()) out.first_grads.push_back(p.grad().clone());
    opt.step();
  }
  for (auto& p : m.module->parameters()) out.params.push_back(p.detach().clone());
  return out;
}

void expect_close(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    double diff = (a[i] - b[i]).abs().max().item<double>();
    EXPECT_LT(diff, 1e-5) << what << " #" << i;
  }
}

class SyncEquivalence : public ::testing::TestWithParam<std::tuple<std::string, int, double>> {};

TEST_P(SyncEquivalence, TwoRanksMatchOneRankOnTheUnionBatch) {
  torch::set_num_threads(1);
  auto [kind_at, accum, bucket_mb] = GetParam();
  // "ddp" runs over Gloo; "ddp/shm" over the shared-memory communicator.
  const auto slash = kind_at.find('/');
  const std::string kind = kind_at.substr(0, slash);
  const std::string backend = slash == std::string::npos ? "gloo" : kind_at.substr(slash + 1);
  auto reference = train(0, 1, 1, [](auto) { return sync::GradientSyncPtr(); });
  std::vector<Outcome> got(2);
  comm::spawn(2, [&](int rank, comm::CommunicatorPtr c) {
    got[rank] = train(rank, 2, accum, [&](std::shared_ptr<torch::nn::Module> m) -> sync::GradientSyncPtr {
      sync::DdpOptions o;
      o.bucket_mb = bucket_mb;
      if (kind == "ring") return std::make_unique<sync::RingSync>(m, c, o);
      return std::make_unique<sync::DistributedDataParallel>(m, c, o);
    });
  }, {}, backend);
  for (int r = 0; r < 2; ++r) {
    expect_close(got[r].first_grads, reference.first_grads, "averaged gradient");
    expect_close(got[r].params, reference.params, "parameters after 5 steps");
  }
}

INSTANTIATE_TEST_SUITE_P(DdpAndRing, SyncEquivalence,
                         ::testing::Values(std::make_tuple("ddp", 1, 25.0), std::make_tuple("ddp", 2, 25.0),
                                           std::make_tuple("ddp", 1, 0.05), std::make_tuple("ring", 1, 0.05),
                                           std::make_tuple("ring", 2, 25.0), std::make_tuple("ddp/shm", 1, 25.0),
                                           std::make_tuple("ddp/shm", 2, 0.05), std::make_tuple("ring/shm", 1, 0.05),
                                           std::make_tuple("ddp/hybrid", 1, 0.05)));

// --compress fp16: what arrives in .grad() went over the wire as float16 (so
// every value is exactly a float16), and stays within float16's rounding of
// the fp32 result.
class Fp16Compression : public ::testing::TestWithParam<std::string> {};

TEST_P(Fp16Compression, GradientsTravelAsHalfAndStayClose) {
  torch::set_num_threads(1);
  const std::string kind = GetParam();
  auto reference = train(0, 1, 1, [](auto) { return sync::GradientSyncPtr(); });
  std::vector<Outcome> got(2);
  comm::spawn(2, [&](int rank, comm::CommunicatorPtr c) {
    got[rank] = train(rank, 2, 1, [&](std::shared_ptr<torch::nn::Module> m) -> sync::GradientSyncPtr {
      sync::DdpOptions o;
      o.bucket_mb = 0.05;  // several buckets
      o.compress = sync::parse_compress("fp16");
      if (kind == "ring") return std::make_unique<sync::RingSync>(m, c, o);
      return std::make_unique<sync::DistributedDataParallel>(m, c, o);
    });
  });
  for (int r = 0; r < 2; ++r) {
    for (size_t i = 0; i < reference.first_grads.size(); ++i) {
      const auto& g = got[r].first_grads[i];
      const auto& want = reference.first_grads[i];
      EXPECT_TRUE(torch::equal(g, g.to(at::kHalf).to(at::kFloat))) << "gradient #" << i << " is not a float16 value";
      const double scale = want.abs().max().item<double>();
      EXPECT_LT((g - want).abs().max().item<double>(), 2e-3 * scale + 1e-7) << "gradient #" << i;
    }
    for (size_t i = 0; i < reference.params.size(); ++i) {
      const double scale = reference.params[i].abs().max().item<double>();
      EXPECT_LT((got[r].params[i] - reference.params[i]).abs().max().item<double>(), 1e-3 * scale)
          << "parameter #" << i << " after 5 steps";
    }
    // Both ranks apply the same averaged gradient.
    for (size_t i = 0; i < reference.params.size(); ++i)
      EXPECT_TRUE(torch::equal(got[r].params[i], got[0].params[i])) << "rank " << r << " parameter #" << i;
  }
}

INSTANTIATE_TEST_SUITE_P(DdpAndRing, Fp16Compression, ::testing::Values("ddp", "ring"));

TEST(Ddp, UnknownCompressionNamesTheChoices) {
  auto msg = test::error_of([] { sync::parse_compress("int4"); });
  EXPECT_NE(msg.find("--compress int4"), std::string::npos) << msg;
  EXPECT_NE(msg.find("topk:F"), std::string::npos) << msg;
}

TEST(Ddp, BucketsFollowReverseRegistrationOrder) {
  comm::spawn(1, [](int, comm::CommunicatorPtr c) {
    auto m = models::make_model({"cnn"});
    sync::DdpOptions o;
    o.bucket_mb = 0.1;  // fc1.weight (1.6 MB) gets a bucket of its own
    sync::DistributedDataParallel ddp(m.module, c, o);
    auto layout = ddp.bucket_layout();
    ASSERT_GE(layout.size(), 2u);
    EXPECT_EQ(layout.front().front(), m.module->parameters().size() - 1);
    EXPECT_EQ(layout.back().back(), 0u);
  });
}

TEST(Ddp, DefaultFirstBucketClosesEarlySoItsAllReduceOverlapsBackward) {
  comm::spawn(1, [](int, comm::CommunicatorPtr c) {
    auto m = models::make_model({"cnn"});
    sync::DistributedDataParallel ddp(m.module, c);  // 25 MB buckets, first one 1 MB
    auto layout = ddp.bucket_layout();
    const size_t n = m.module->parameters().size();  // conv1 w,b, conv2 w,b, fc1 w,b, fc2 w,b
    ASSERT_EQ(n, 8u);
    // fc2.bias, fc2.weight, fc1.bias (5.7 KB) leave the first bucket open; fc1.weight
    // (1.6 MB) fills it; both convolutions share the second.
    ASSERT_EQ(layout.size(), 2u);
    EXPECT_EQ(layout[0], (std::vector<size_t>{7, 6, 5, 4}));
    EXPECT_EQ(layout[1], (std::vector<size_t>{3, 2, 1, 0}));
  });
}

TEST(Ddp, ShapeMismatchNamesTheParameter) {
  std::vector<std::string> messages(2);
  comm::spawn(2, [&](int rank, comm::CommunicatorPtr c) {
    auto m = models::make_model({"cnn", rank == 0 ? 10 : 7});
    try {
      sync::DistributedDataParallel ddp(m.module, c);
    } catch (const tandem::Error& e) {
      messages[rank] = e.what();
    }
  });
  EXPECT_NE(messages[1].find("fc2.weight"), std::string::npos) << messages[1];
  EXPECT_NE(messages[1].find("[10, 128]"), std::string::npos) << messages[1];
  EXPECT_NE(messages[0].find("rank 1"), std::string::npos) << messages[0];
}

class RingTest : public ::testing::TestWithParam<std::tuple<int, int64_t, bool>> {};

TEST_P(RingTest, EqualsElementwiseSum) {
  auto [world, count, dbl] = GetParam();
  auto dtype = dbl ? torch::kFloat64 : torch::kFloat32;
  comm::spawn(world, [&](int rank, comm::CommunicatorPtr c) {
    auto gen = at::detail::createCPUGenerator(1000 + rank);
    auto t = at::randn({count}, gen, dtype);
    auto want = torch::zeros({count}, dtype);
    for (int r = 0; r < world; ++r) {
      auto g = at::detail::createCPUGenerator(1000 + r);
      want += at::randn({count}, g, dtype);
    }
    collectives::RingOptions o;
    o.chunk_bytes = 4096;  // several chunks per segment for the larger counts
    collectives::ring_all_reduce(*c, t, o);
    ASSERT_TRUE(torch::allclose(t, want, 1e-5, 1e-5)) << "rank " << rank;
  });
}

INSTANTIATE_TEST_SUITE_P(WorldsCountsTypes, RingTest,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4, 5),
                                            ::testing::Values<int64_t>(0, 1, 3, 1000, (1 << 20) + 3),
                                            ::testing::Bool()));

}  // namespace
