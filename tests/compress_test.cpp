// Gradient compression, local SGD and load balancing (issue 12): the
// compressors' error bounds and invariants on known tensors, the models they
// leave on every rank, weighted averaging, and the flags' errors. Ranks are
// threads sharing an in-memory store; the last test runs the real tool.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "run_tandem.h"
#include "tandem/collectives/ring_allreduce.h"
#include "tandem/comm/communicator.h"
#include "tandem/data/sampler.h"
#include "tandem/report/report.h"
#include "tandem/sync/compress.h"
#include "tandem/train/results.h"
#include "tandem/sync/ddp.h"
#include "tandem/sync/ring_sync.h"
#include "tandem/train/trainer.h"
#include "test_util.h"

using namespace tandem;

namespace {

// Rank r's known gradient of n elements: smooth, signed, different per rank.
at::Tensor known(int rank, int64_t n) {
  return at::sin(at::arange(n, at::kFloat) * (0.37 + 0.11 * rank)) * (1.0 + rank) +
         0.01 * at::arange(n, at::kFloat) / std::max<int64_t>(1, n);
}

at::Tensor exact_mean(int world, int64_t n) {
  auto s = at::zeros({n}, at::kFloat);
  for (int r = 0; r < world; ++r) s += known(r, n);
  return s / world;
}

double max_abs(const at::Tensor& t) { return t.numel() ? t.abs().max().item<double>() : 0.0; }

// Runs `steps` reduces of spec's compressor on `world` thread-ranks (Gloo, or
// the ring when ring) and returns every rank's last output.
std::vector<at::Tensor> reduce_on_ranks(const std::string& spec, int world, int64_t n, int steps = 1, bool ring = false,
                                        std::vector<sync::BucketSlot> slots = {}, double min_saving = 1.0) {
  if (slots.empty()) slots = {{0, {n}}};
  std::vector<at::Tensor> out(world);
  comm::spawn(world, [&](int rank, comm::CommunicatorPtr c) {
    sync::Wire wire(c, ring);
    auto comp = sync::make_bucket_compressor(sync::parse_compress(spec), slots, n, 7, rank, min_saving);
    at::Tensor flat;
    for (int s = 0; s < steps; ++s) {
      flat = known(rank, n);
      comp->reduce(flat, wire);
    }
    out[rank] = flat;
  });
  return out;
}

void expect_identical(const std::vector<at::Tensor>& got, const std::string& what) {
  for (size_t r = 1; r < got.size(); ++r) EXPECT_TRUE(torch::equal(got[r], got[0])) << what << ": rank " << r;
}

TEST(Compress, HalfPrecisionStaysWithinItsRounding) {
  for (const char* spec : {"fp16", "bf16"}) {
    for (bool ring : {false, true}) {
      auto got = reduce_on_ranks(spec, 2, 1000, 1, ring);
      expect_identical(got, spec);
      // Each rank's share is rounded once, the sum once more.
      const double eps = std::string(spec) == "fp16" ? 1e-3 : 8e-3;
      EXPECT_LT(max_abs(got[0] - exact_mean(2, 1000)), eps * max_abs(exact_mean(2, 1000)) * 2) << spec;
    }
  }
}

TEST(Compress, Int8ErrorIsWithinOneStepAndUnbiased) {
  const int64_t n = 4096;
  const int world = 2;
  // Rank r's rounding error per element is below its scale max|g_r| / 127;
  // the average's below the mean of the scales.
  double bound = 0;
  for (int r = 0; r < world; ++r) bound += max_abs(known(r, n)) / 127.0 / world;
  auto got = reduce_on_ranks("int8", world, n);
  expect_identical(got, "int8");
  const auto want = exact_mean(world, n);
  EXPECT_LT(max_abs(got[0] - want), bound * 1.0001);
  // Unbiased: over 64 steps the mean error shrinks well below one step.
  std::vector<at::Tensor> sum(world);
  comm::spawn(world, [&](int rank, comm::CommunicatorPtr c) {
    sync::Wire wire(c, false);
    auto comp = sync::make_bucket_compressor(sync::parse_compress("int8"), {{0, {n}}}, n, 3, rank);
    auto acc = at::zeros({n});
    for (int s = 0; s < 64; ++s) {
      auto flat = known(rank, n);
      comp->reduce(flat, wire);
      acc += flat;
    }
    sum[rank] = acc / 64;
  });
  EXPECT_LT((sum[0] - want).abs().mean().item<double>(), bound / 8);
}

TEST(Compress, TopKFractionOneIsExactAndTopKSendsTheLargest) {
  auto all = reduce_on_ranks("topk:1", 3, 777);
  expect_identical(all, "topk:1");
  EXPECT_LT(max_abs(all[0] - exact_mean(3, 777)), 1e-5);
  // F = 0.1: the result is the mean of each rank's 78 largest entries.
  const int64_t n = 777, k = 78;
  auto got = reduce_on_ranks("topk:0.1", 3, n);
  expect_identical(got, "topk:0.1");
  auto want = at::zeros({n});
  for (int r = 0; r < 3; ++r) {
    auto g = known(r, n);
    auto idx = std::get<1>(g.abs().topk(k));
    want.index_add_(0, idx, g.index_select(0, idx));
  }
  EXPECT_LT(max_abs(got[0] - want / 3), 1e-6);
}

TEST(Compress, TopKAddsDuplicateIndicesAcrossRanks) {
  // Every rank's largest entries are at the same indices: their values add up.
  const int64_t n = 100;
  std::vector<at::Tensor> out(2);
  comm::spawn(2, [&](int rank, comm::CommunicatorPtr c) {
    sync::Wire wire(c, false);
    auto comp = sync::make_bucket_compressor(sync::parse_compress("topk:0.05"), {{0, {n}}}, n, 1, rank);
    auto g = at::zeros({n});
    for (int64_t i : {3, 17, 42, 64, 99}) g[i] = 10.0 + rank + i;
    comp->reduce(g, wire);
    out[rank] = g;
  });
  expect_identical(out, "duplicates");
  for (int64_t i : {3, 17, 42, 64, 99})
    EXPECT_FLOAT_EQ(out[0][i].item<float>(), ((10.0 + i) + (11.0 + i)) / 2) << "index " << i;
  EXPECT_EQ(out[0].ne(0).sum().item<int64_t>(), 5);
}

TEST(Compress, ErrorFeedbackKeepsEveryGradient) {
  // sum over steps of (what was sent) + the residual == sum of the gradients.
  for (const char* spec : {"topk:0.02", "powersgd:1"}) {
    const int64_t n = 24 * 10 + 10;  // a 24 x 10 matrix and a bias
    std::vector<sync::BucketSlot> slots{{0, {24, 10}}, {240, {10}}};
    comm::spawn(2, [&](int rank, comm::CommunicatorPtr c) {
      sync::Wire wire(c, false);
      auto comp = sync::make_bucket_compressor(sync::parse_compress(spec), slots, n, 5, rank);
      auto grads = at::zeros({n}), sent = at::zeros({n});
      for (int s = 0; s < 6; ++s) {
        auto g = known(rank, n) * (1 + s) + at::cos(at::arange(n, at::kFloat) * s);
        grads += g;
        auto flat = g.clone();
        comp->reduce(flat, wire);
        sent += comp->last_sent();
      }
      EXPECT_LT(max_abs(sent + comp->residual() - grads), 1e-4 * max_abs(grads)) << spec << " rank " << rank;
      EXPECT_GT(max_abs(comp->residual()), 0.0) << spec << ": a compressor that sends everything feeds nothing back";
    });
  }
}

TEST(Compress, PowerSgdOfFullRankIsTheExactAverage) {
  // Matrices 6 x 4 (rank 4) and 3 x 8 (rank 3) plus a vector: powersgd:8 is
  // clipped to each matrix's full rank and reproduces the all-reduce.
  const int64_t n = 24 + 24 + 5;
  std::vector<sync::BucketSlot> slots{{0, {6, 4}}, {24, {3, 2, 4}}, {48, {5}}};
  for (bool ring : {false, true}) {
    auto got = reduce_on_ranks("powersgd:8", 3, n, 1, ring, slots, /*min_saving=*/0);
    expect_identical(got, "powersgd full rank");
    EXPECT_LT(max_abs(got[0] - exact_mean(3, n)), 1e-5 * max_abs(exact_mean(3, n))) << (ring ? "ring" : "gloo");
  }
  // Rank 1 of a 6 x 4 matrix is not exact, but stays identical on every rank.
  auto low = reduce_on_ranks("powersgd:1", 2, 24, 3, false, {{0, {6, 4}}}, 0);
  expect_identical(low, "powersgd:1");
  EXPECT_GT(max_abs(low[0] - exact_mean(2, 24)), 1e-3);
}

TEST(Compress, BytesPerStepShrinkAsPromised) {
  const int64_t n = 100000;
  std::map<std::string, int64_t> bytes;
  for (const char* spec : {"none", "fp16", "int8", "topk:0.01"}) {
    std::vector<int64_t> b(2);
    comm::spawn(2, [&](int rank, comm::CommunicatorPtr c) {
      sync::Wire wire(c, false);
      auto comp = sync::make_bucket_compressor(sync::parse_compress(spec), {{0, {n}}}, n, 1, rank);
      auto flat = known(rank, n);
      comp->reduce(flat, wire);
      b[rank] = wire.bytes_sent;
    });
    bytes[spec] = b[0];
  }
  EXPECT_EQ(bytes["none"], 4 * n);  // 2(N-1)/N x 4n on 2 ranks
  EXPECT_EQ(bytes["fp16"], 2 * n);
  EXPECT_EQ(bytes["int8"], n + 4);
  EXPECT_EQ(bytes["topk:0.01"], 8 * 1000);
}

TEST(Compress, RingAllGatherPlacesEveryRanksBlock) {
  for (int world : {1, 2, 3, 5}) {
    comm::spawn(world, [&](int rank, comm::CommunicatorPtr c) {
      auto in = at::full({7}, rank * 10, at::kInt) + at::arange(7, at::kInt);
      auto out = at::empty({7 * world}, at::kInt);
      collectives::ring_all_gather(*c, out, in);
      for (int r = 0; r < world; ++r)
        EXPECT_TRUE(torch::equal(out.slice(0, 7 * r, 7 * (r + 1)), at::full({7}, r * 10, at::kInt) + at::arange(7, at::kInt)))
            << "world " << world << " block " << r;
    });
  }
}

TEST(Compress, ParameterServerCodecsRoundTrip) {
  const int64_t n = 1000;
  auto g = known(0, n);
  for (const char* spec : {"fp16", "bf16", "int8", "topk:1"}) {
    auto codec = sync::make_codec(sync::parse_compress(spec), 1);
    auto payload = codec->payload_like(n);
    codec->encode(g, payload, 0);
    auto acc = at::zeros({n});
    codec->decode_add(payload, acc, 0.5);
    EXPECT_LT(max_abs(acc - g * 0.5), 0.5 * max_abs(g) / 100) << spec;
  }
  EXPECT_NE(test::error_of([] { sync::make_codec(sync::parse_compress("powersgd:2"), 1); }).find("--strategy ps use"),
            std::string::npos);
}

// ---- training with a compressor, local SGD, weighted averaging -------------

struct Trained {
  std::vector<at::Tensor> params;
  int64_t bytes = 0;
};

// kSteps SGD steps on the fixture's global batches; rank r of `world` takes
// `sizes[r]` samples of each (equal shares by default), its loss weighted by
// sizes[r] x world / batch when `weighted`.
template <typename MakeSync>
Trained train(int rank, int world, MakeSync make_sync, std::vector<int64_t> sizes = {}, int sync_every = 0,
              comm::CommunicatorPtr comm = nullptr) {
  const auto& f = test::sgd_fixture();
  if (sizes.empty()) sizes.assign(world, test::kGlobalBatch / world);
  auto m = test::fresh_cnn(rank == 0);
  auto gsync = make_sync(m.module);
  std::unique_ptr<sync::ParameterAverager> avg;
  if (sync_every > 0) {
    sync::broadcast_module(*m.module, *comm);
    avg = std::make_unique<sync::ParameterAverager>(m.module, comm, false);
  }
  torch::optim::SGD opt(m.module->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  int64_t offset = 0;
  for (int r = 0; r < rank; ++r) offset += sizes[r];
  const double weight = static_cast<double>(sizes[rank]) * world / test::kGlobalBatch;
  Trained out;
  for (int s = 0; s < test::kSteps; ++s) {
    opt.zero_grad();
    if (gsync) gsync->begin_step(true);
    const int64_t b = s * test::kGlobalBatch + offset;
    auto loss = torch::nn::functional::cross_entropy(m.forward(f.x.slice(0, b, b + sizes[rank])),
                                                     f.y.slice(0, b, b + sizes[rank]));
    (loss * weight).backward();
    if (gsync) {
      gsync->finish();
      out.bytes += gsync->last_times().bytes;
    }
    opt.step();
    if (avg && (s + 1) % sync_every == 0) avg->average();
  }
  for (auto& p : m.module->parameters()) out.params.push_back(p.detach().clone());
  return out;
}

void expect_close(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, double tol, const std::string& what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_LT(max_abs(a[i] - b[i]), tol) << what << " parameter #" << i;
}

class CompressedTraining : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(CompressedTraining, EveryRankHoldsTheSameModel) {
  torch::set_num_threads(1);
  const auto [kind, spec] = GetParam();
  std::vector<Trained> got(2);
  comm::spawn(2, [&](int rank, comm::CommunicatorPtr c) {
    got[rank] = train(rank, 2, [&](std::shared_ptr<torch::nn::Module> m) -> sync::GradientSyncPtr {
      sync::DdpOptions o;
      o.bucket_mb = 0.05;  // several buckets
      o.compress = sync::parse_compress(spec);
      o.seed = 11;
      if (kind == "ring") return std::make_unique<sync::RingSync>(m, c, o);
      return std::make_unique<sync::DistributedDataParallel>(m, c, o);
    });
  });
  for (size_t i = 0; i < got[0].params.size(); ++i)
    EXPECT_TRUE(torch::equal(got[1].params[i], got[0].params[i])) << kind << " " << spec << " parameter #" << i;
  EXPECT_GT(got[0].bytes, 0);
}

INSTANTIATE_TEST_SUITE_P(AllCompressors, CompressedTraining,
                         ::testing::Combine(::testing::Values("ddp", "ring"),
                                            ::testing::Values("bf16", "int8", "topk:0.01", "powersgd:2")));

TEST(Balance, WeightedAverageOfUnequalSharesIsTheGlobalBatchUpdate) {
  torch::set_num_threads(1);
  auto reference = train(0, 1, [](auto) { return sync::GradientSyncPtr(); });
  std::vector<Trained> got(2);
  comm::spawn(2, [&](int rank, comm::CommunicatorPtr c) {
    got[rank] = train(rank, 2, [&](std::shared_ptr<torch::nn::Module> m) -> sync::GradientSyncPtr {
      return std::make_unique<sync::DistributedDataParallel>(m, c, sync::DdpOptions{});
    }, {48, 16});
  });
  for (int r = 0; r < 2; ++r) expect_close(got[r].params, reference.params, 1e-5, "48 + 16 vs 64");
}

TEST(Balance, BatchesFollowTheRatesAndKeepTheGlobalBatch) {
  EXPECT_EQ(train::balanced_batches({1, 1, 2}, 192), (std::vector<int64_t>{48, 48, 96}));
  EXPECT_EQ(train::balanced_batches({3, 1}, 64), (std::vector<int64_t>{48, 16}));
  auto b = train::balanced_batches({1000, 1, 1}, 10);  // everyone keeps a sample
  EXPECT_EQ(b, (std::vector<int64_t>{8, 1, 1}));
  EXPECT_EQ(train::balanced_batches({0, 5}, 10), (std::vector<int64_t>{5, 5}));  // no measurement: equal
}

TEST(Balance, UnevenSharesCoverTheEpochOnceEvenWhenReplanned) {
  const int64_t N = 1000, B = 96;
  // Shares 24/24/48 for the first 4 steps, then 40/40/16 from position 384.
  std::multiset<int64_t> seen;
  const std::vector<std::vector<int64_t>> plans{{24, 24, 48}, {40, 40, 16}};
  for (int r = 0; r < 3; ++r) {
    data::DistributedSampler s(N, r, 3, true, 9);
    s.set_epoch(2);
    int64_t off0 = 0, off1 = 0;
    for (int q = 0; q < r; ++q) off0 += plans[0][q], off1 += plans[1][q];
    auto first = s.balanced_indices(B, 0, off0, plans[0][r]);
    first.resize(4 * plans[0][r]);
    auto rest = s.balanced_indices(B, 4 * B, off1, plans[1][r]);
    EXPECT_EQ(static_cast<int64_t>(rest.size()), data::DistributedSampler::balanced_steps(N, 4 * B, B) * plans[1][r]);
    seen.insert(first.begin(), first.end());
    seen.insert(rest.begin(), rest.end());
  }
  // 11 steps of 96 = 1056 positions: every sample once, the first 56 of the
  // permutation (the padding) twice.
  EXPECT_EQ(seen.size(), 1056u);
  int64_t twice = 0;
  for (int64_t i = 0; i < N; ++i) {
    ASSERT_GE(seen.count(i), 1u) << "sample " << i << " not visited";
    twice += seen.count(i) == 2;
  }
  EXPECT_EQ(twice, 56);
}

TEST(LocalSgd, EveryStepAveragingEqualsDdp) {
  torch::set_num_threads(1);
  std::vector<Trained> ddp(2), local(2);
  comm::spawn(2, [&](int rank, comm::CommunicatorPtr c) {
    ddp[rank] = train(rank, 2, [&](std::shared_ptr<torch::nn::Module> m) -> sync::GradientSyncPtr {
      return std::make_unique<sync::DistributedDataParallel>(m, c, sync::DdpOptions{});
    });
  });
  comm::spawn(2, [&](int rank, comm::CommunicatorPtr c) {
    local[rank] = train(rank, 2, [](auto) { return sync::GradientSyncPtr(); }, {}, /*sync_every=*/1, c);
  });
  for (int r = 0; r < 2; ++r) expect_close(local[r].params, ddp[0].params, 1e-5, "local SGD H=1 vs DDP");
}

TEST(Flags, BadValuesNameTheFlagAndTheFix) {
  auto msg = test::error_of([] { sync::parse_compress("zip"); });
  EXPECT_NE(msg.find("--compress zip: unknown"), std::string::npos) << msg;
  for (const char* bad : {"topk:0", "topk:1.5", "topk:", "topk:x"}) {
    msg = test::error_of([&] { sync::parse_compress(bad); });
    EXPECT_NE(msg.find("must be a number in (0, 1]"), std::string::npos) << bad << ": " << msg;
  }
  for (const char* bad : {"powersgd:0", "powersgd:-1", "powersgd:1.5"}) {
    msg = test::error_of([&] { sync::parse_compress(bad); });
    EXPECT_NE(msg.find("must be a whole number >= 1"), std::string::npos) << bad << ": " << msg;
  }
  train::TrainOptions o;
  o.sync_every = 0;
  EXPECT_NE(test::error_of([&] { train::validate(o); }).find("--sync-every must be >= 1"), std::string::npos);
  o = {};
  o.strategy = "ps";
  o.balance = "auto";
  EXPECT_NE(test::error_of([&] { train::validate(o); }).find("--balance auto applies to"), std::string::npos);
  o = {};
  o.balance = "fast";
  EXPECT_NE(test::error_of([&] { train::validate(o); }).find("choose off or auto"), std::string::npos);
  o = {};
  o.strategy = "ps";
  o.compress = "powersgd:2";
  EXPECT_NE(test::error_of([&] { train::validate(o); }).find("needs an all-reduce"), std::string::npos);
}

TEST(Report, VariantsAreLabelledAndSetAgainstTheirBytes) {
  test::TempDir dir;
  auto write = [&](const std::string& file, const std::string& method, nlohmann::json config, double bytes,
                   double acc) {
    train::RunResult r;
    r.method = method;
    r.world_size = 2;
    r.batch_size = 64;
    r.config = config;
    train::EpochResult e;
    e.epoch = 1;
    e.val_accuracy = acc;
    e.train_throughput = 1000;
    e.train_time = 10;
    e.comm_bytes = bytes;
    r.epochs.push_back(e);
    r.all_losses = {1.0};
    std::ofstream(dir.file(file)) << train::to_json(r).dump();
  };
  write("results_baseline_ddp.json", "baseline_ddp", {{"compress", "none"}, {"sync_every", 1}}, 1e6, 0.91);
  write("results_baseline_ddp_powersgd_2.json", "baseline_ddp", {{"compress", "powersgd:2"}, {"sync_every", 1}}, 2e4,
        0.905);
  write("results_baseline_ddp_localsgd8.json", "baseline_ddp", {{"compress", "none"}, {"sync_every", 8}}, 1.25e5, 0.9);
  write("results_ps_ssp.json", "ps", {{"ps_mode", "ssp"}, {"staleness", 2}}, 3e5, 0.88);
  std::ostringstream log;
  auto runs = report::read_results(dir.path(), log);
  ASSERT_EQ(runs.size(), 4u) << log.str();
  const auto text = report::format_report(runs);
  for (const char* want : {"DDP (baseline) powersgd:2", "DDP (baseline) local SGD H=8", "Parameter server ssp:2",
                           "Accuracy versus bytes sent", "50.0x", "8.0x"})
    EXPECT_NE(text.find(want), std::string::npos) << want << " missing from\n" << text;
}

TEST(Compare, BadVariantsFailBeforeAnyTraining) {
  for (auto [methods, want] : std::vector<std::pair<std::string, std::string>>{
           {"ddp,localsgd", "needs the steps between averages"},
           {"ddp,ddp:topk:2", "must be a number in (0, 1]"},
           {"ddp,ps:powersgd:2", "needs an all-reduce"},
           {"ddp,gossip", "unknown method 'gossip'"},
           {"ddp,ddp", "listed twice"}}) {
    auto [rc, out] = run_tandem("compare --methods " + methods + " --limit 64 --out /tmp/tandem_never_written");
    EXPECT_NE(rc, 0) << methods;
    EXPECT_NE(out.find(want), std::string::npos) << methods << ": " << out;
    EXPECT_EQ(out.find("method ddp on"), std::string::npos) << methods << ": trained before failing";
  }
}

// The real tool, 2 processes: the results JSON reports bytes per step, the
// compressed runs send fewer, and --balance records the shares.
TEST(EndToEnd, CompressedLocalAndBalancedRunsReportTheirBytes) {
  test::TempDir dir;
  auto run = [&](const std::string& name, const std::string& extra) {
    auto [rc, out] = run_tandem("train --nproc 2 --model mlp --epochs 1 --limit 2048 --val-limit 512 --quiet "
                                "--save none --output " + dir.file(name + ".json") + " " + extra);
    EXPECT_EQ(rc, 0) << out;
    std::ifstream f(dir.file(name + ".json"));
    return nlohmann::json::parse(f);
  };
  auto none = run("none", "");
  auto psgd = run("psgd", "--compress powersgd:2");
  auto topk = run("topk", "--strategy ring --compress topk:0.01");
  auto local = run("local", "--sync-every 4");
  auto bal = run("bal", "--balance auto");
  auto ps = run("ps", "--strategy ps --compress int8");
  const double b0 = none["epochs"][0]["comm_bytes"].get<double>();
  EXPECT_GT(b0, 0);
  EXPECT_LT(psgd["epochs"][0]["comm_bytes"].get<double>() * 20, b0);
  EXPECT_LT(topk["epochs"][0]["comm_bytes"].get<double>() * 20, b0);
  EXPECT_NEAR(local["epochs"][0]["comm_bytes"].get<double>() * 4, b0, b0 * 0.05);
  EXPECT_GT(ps["epochs"][0]["comm_bytes"].get<double>(), 0);
  EXPECT_EQ(psgd["config"]["compress"], "powersgd:2");
  EXPECT_EQ(local["config"]["sync_every"], 4);
  EXPECT_EQ(bal["config"]["balance"], "auto");
  ASSERT_EQ(bal["epochs"][0]["shares"].size(), 2u);
  EXPECT_NEAR(bal["epochs"][0]["shares"][0].get<double>() + bal["epochs"][0]["shares"][1].get<double>(), 1.0, 1e-9);
  // One short epoch: every variant learns (chance is 0.1).
  for (auto* j : {&none, &psgd, &topk, &local, &bal, &ps})
    EXPECT_GT((*j)["epochs"][0]["val_accuracy"].get<double>(), 0.3) << (*j)["config"].dump();
}

}  // namespace
