// Mixed precision: the autocast guard, the loss scaler (alone and agreed
// across ranks as threads), and `tandem train --precision / --loss-scale`
// end to end as real processes.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include <ATen/autocast_mode.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "run_tandem.h"
#include "tandem/comm/communicator.h"
#include "tandem/models/weights.h"
#include "tandem/train/mixed_precision.h"
#include "test_util.h"

namespace fs = std::filesystem;
using tandem::test::error_of;
using tandem::test::TempDir;
using namespace tandem::train;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNan = std::numeric_limits<float>::quiet_NaN();

// Two parameters whose gradients are `scale` x known values.
struct Params {
  std::vector<at::Tensor> p;
  std::vector<at::Tensor> want;  // the gradients before scaling
  explicit Params(double scale) {
    torch::manual_seed(3);
    for (auto n : {7, 12}) {
      auto t = torch::zeros({n}, torch::requires_grad());
      auto g = torch::randn({n});
      t.mutable_grad() = g * scale;
      p.push_back(t);
      want.push_back(g);
    }
    p.push_back(torch::zeros({3}, torch::requires_grad()));  // no gradient: skipped
  }
};

nlohmann::json read_json(const fs::path& p) {
  std::ifstream f(p);
  EXPECT_TRUE(f.good()) << p;
  return nlohmann::json::parse(f);
}

}  // namespace

TEST(LossScaler, FiniteGradientsAreUnscaledExactlyAndStep) {
  LossScaler s;  // 65536: a power of two, so dividing is exact
  Params ps(s.scale_value());
  EXPECT_TRUE(s.unscale_and_check(ps.p, nullptr));
  for (size_t i = 0; i < ps.want.size(); ++i) EXPECT_TRUE(torch::equal(ps.p[i].grad(), ps.want[i])) << i;
  EXPECT_FALSE(ps.p[2].grad().defined());
  s.update(false);
  EXPECT_EQ(s.scale_value(), 65536.0);
  EXPECT_EQ(s.skipped_steps(), 0);
  EXPECT_EQ(s.good_steps_in_a_row(), 1);

  // A fixed scale that is not a power of two: grad / scale, as division gives it.
  LossScalerOptions o;
  o.init_scale = 3.0;
  o.dynamic = false;
  LossScaler f(o);
  Params q(1.0);
  std::vector<at::Tensor> scaled;
  for (auto& t : q.p)
    if (t.grad().defined()) scaled.push_back(t.grad().clone());
  EXPECT_TRUE(f.unscale_and_check(q.p, nullptr));
  for (size_t i = 0; i < scaled.size(); ++i) EXPECT_TRUE(torch::equal(q.p[i].grad(), scaled[i] / 3.0)) << i;
}

TEST(LossScaler, InfOrNanSkipsTheStepAndHalvesTheScale) {
  for (float bad : {kInf, -kInf, kNan}) {
    LossScaler s;
    Params ps(s.scale_value());
    ps.p[1].grad()[5] = bad;
    const auto before = ps.p[0].grad().clone();
    EXPECT_FALSE(s.unscale_and_check(ps.p, nullptr)) << bad;
    EXPECT_TRUE(torch::equal(ps.p[0].grad(), before)) << "gradients of a skipped step are left alone";
    s.update(true);
    EXPECT_EQ(s.scale_value(), 32768.0) << bad;
    EXPECT_EQ(s.skipped_steps(), 1);
    EXPECT_EQ(s.good_steps_in_a_row(), 0);
  }
}

TEST(LossScaler, GrowsAfterARunOfGoodStepsOnly) {
  LossScalerOptions o;
  o.init_scale = 8;
  o.growth_interval = 3;
  LossScaler s(o);
  s.update(false);
  s.update(false);
  EXPECT_EQ(s.scale_value(), 8.0);
  s.update(true);  // the run restarts
  EXPECT_EQ(s.scale_value(), 4.0);
  s.update(false);
  s.update(false);
  EXPECT_EQ(s.scale_value(), 4.0);
  s.update(false);
  EXPECT_EQ(s.scale_value(), 8.0);
  EXPECT_EQ(s.good_steps_in_a_row(), 0);
  for (int i = 0; i < 3; ++i) s.update(false);
  EXPECT_EQ(s.scale_value(), 16.0);
  EXPECT_EQ(s.skipped_steps(), 1);

  // Fixed: skips are counted, the scale never moves.
  o.dynamic = false;
  LossScaler f(o);
  f.update(true);
  for (int i = 0; i < 6; ++i) f.update(false);
  EXPECT_EQ(f.scale_value(), 8.0);
  EXPECT_EQ(f.skipped_steps(), 1);
}

TEST(LossScaler, StateRoundTrips) {
  LossScaler a;
  a.update(true);
  a.update(false);
  a.update(false);
  LossScaler b;
  b.load_state(a.state());
  EXPECT_EQ(b.scale_value(), 32768.0);
  EXPECT_EQ(b.skipped_steps(), 1);
  EXPECT_EQ(b.good_steps_in_a_row(), 2);
  EXPECT_EQ(a.state()["skipped_steps"], 1);
}

// Only rank 1 sees inf: both ranks skip, both halve, and rank 0's finite
// gradients are not unscaled (its step is skipped too).
class ScalerAgreement : public ::testing::TestWithParam<const char*> {};

TEST_P(ScalerAgreement, OneRanksInfSkipsTheStepOnEveryRank) {
  std::vector<int> stepped(2, -1);
  std::vector<double> scale(2, 0);
  std::vector<int> second(2, -1);
  tandem::comm::spawn(
      2,
      [&](int rank, tandem::comm::CommunicatorPtr c) {
        LossScaler s;
        Params ps(s.scale_value());
        if (rank == 1) ps.p[0].grad()[0] = kInf;
        const bool ok = s.unscale_and_check(ps.p, c.get());
        s.update(!ok);
        stepped[rank] = ok;
        scale[rank] = s.scale_value();
        if (rank == 0) {
          EXPECT_TRUE(torch::equal(ps.p[0].grad(), ps.want[0] * 65536.0));
        }
        // The next step, finite everywhere, goes ahead on both.
        Params next(s.scale_value());
        second[rank] = s.unscale_and_check(next.p, c.get());
      },
      {}, GetParam());
  EXPECT_EQ(stepped[0], 0);
  EXPECT_EQ(stepped[1], 0);
  EXPECT_EQ(scale[0], 32768.0);
  EXPECT_EQ(scale[1], 32768.0);
  EXPECT_EQ(second[0], 1);
  EXPECT_EQ(second[1], 1);
}

INSTANTIATE_TEST_SUITE_P(GlooAndShm, ScalerAgreement, ::testing::Values("gloo", "shm"));

TEST(LossScaler, ParsesTheFlag) {
  EXPECT_FALSE(parse_loss_scale("auto", Precision::kFp32));
  EXPECT_FALSE(parse_loss_scale("auto", Precision::kBf16));
  ASSERT_TRUE(parse_loss_scale("auto", Precision::kFp16));
  EXPECT_TRUE(parse_loss_scale("auto", Precision::kFp16)->dynamic);
  EXPECT_TRUE(parse_loss_scale("dynamic", Precision::kFp32)->dynamic);
  EXPECT_FALSE(parse_loss_scale("none", Precision::kFp16));
  auto fixed = parse_loss_scale("1024", Precision::kFp16);
  ASSERT_TRUE(fixed);
  EXPECT_FALSE(fixed->dynamic);
  EXPECT_EQ(fixed->init_scale, 1024.0);
  for (const char* bad : {"0", "-2", "big", "12x", "", "inf"})
    EXPECT_NE(error_of([&] { parse_loss_scale(bad, Precision::kFp16); }).find("--loss-scale"), std::string::npos)
        << bad;
  EXPECT_NE(error_of([] { parse_precision("fp8"); }).find("--precision 'fp8' is unknown: choose fp32"),
            std::string::npos);
  EXPECT_EQ(parse_precision("bf16"), Precision::kBf16);
}

TEST(Autocast, CpuBf16RunsLinearLayersInBf16AndRestores) {
  torch::manual_seed(0);
  torch::nn::Linear lin(16, 4);
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(1, 2, 3));
  auto x = torch::randn({5, 16});
  ASSERT_FALSE(at::autocast::is_cpu_enabled());
  {
    AutocastGuard g(c10::DeviceType::CPU, Precision::kBf16);
    auto y = lin(x);
    EXPECT_EQ(y.scalar_type(), at::kBFloat16);
    EXPECT_EQ(conv(torch::randn({1, 1, 6, 6})).scalar_type(), at::kBFloat16);
    {
      AutocastGuard inner(c10::DeviceType::CPU, Precision::kFp32);  // does nothing
      EXPECT_EQ(lin(x).scalar_type(), at::kBFloat16);
    }
    {
      AutocastGuard inner(c10::DeviceType::CPU, Precision::kBf16);
    }
    EXPECT_TRUE(at::autocast::is_cpu_enabled()) << "an inner guard restores the outer state";
    // Backward reaches the fp32 parameters with fp32 gradients.
    y.to(at::kFloat).sum().backward();
    EXPECT_EQ(lin->weight.grad().scalar_type(), at::kFloat);
  }
  EXPECT_FALSE(at::autocast::is_cpu_enabled());
  EXPECT_EQ(lin(x).scalar_type(), at::kFloat);
  EXPECT_NE(error_of([] { AutocastGuard g(c10::DeviceType::CPU, Precision::kFp16); }).find("use --precision bf16"),
            std::string::npos);
}

// End to end, 2 ranks: rank R's gradients get an inf at step 3 after the
// all-reduce, so without agreement only rank R would skip. With it, both skip
// once, the scale ends at 65536 / 2 (the run is shorter than the growth
// interval), and rank 0's saved weights are the same whichever rank saw the
// inf (the ranks made the same updates).
TEST(TrainMixedPrecision, InjectedInfSkipsOneStepOnEveryRank) {
  TempDir d("tandem_mp_inf");
  const std::string common = " --nproc 2 --limit 4096 --val-limit 1000 --epochs 1 --quiet --loss-scale dynamic ";
  std::vector<std::vector<at::Tensor>> weights;
  for (const char* rank : {"1", "0"}) {
    const std::string out = d.file(std::string("r") + rank + ".json");
    const std::string model = d.file(std::string("m") + rank + ".pt");
    auto [code, text] = run_tandem_cmd(std::string("env TANDEM_TEST_FAULT=inf:") + rank + ":3 " + TANDEM_EXE +
                                       " train" + common + "--output " + out + " --save " + model);
    ASSERT_EQ(code, 0) << text;
    auto j = read_json(out);
    EXPECT_EQ(j["precision"], "fp32");
    ASSERT_TRUE(j.contains("loss_scale")) << j.dump();
    EXPECT_EQ(j["loss_scale"]["skipped_steps"], 1);
    EXPECT_EQ(j["loss_scale"]["scale"].get<double>(), 32768.0);
    EXPECT_TRUE(j["loss_scale"]["dynamic"].get<bool>());
    // 32 steps, one skipped: 0.63 measured (0.65 without the fault).
    EXPECT_GT(j["epochs"][0]["val_accuracy"].get<double>(), 0.5);
    std::vector<at::Tensor> w;
    for (auto& [name, t] : tandem::models::read_weights(model)) {
      EXPECT_TRUE(torch::isfinite(t).all().item<bool>()) << name;
      w.push_back(t);
    }
    weights.push_back(w);
  }
  ASSERT_EQ(weights[0].size(), weights[1].size());
  for (size_t i = 0; i < weights[0].size(); ++i)
    EXPECT_TRUE(torch::equal(weights[0][i], weights[1][i])) << "tensor " << i << " differs between the runs";
}

// The scale and the skipped-step count live in the results, which a
// checkpoint keeps: a resumed run continues from them.
TEST(TrainMixedPrecision, ResumeRestoresTheScaleAndTheCount) {
  TempDir d("tandem_mp_resume");
  const std::string common = std::string(TANDEM_EXE) + " train --nproc 2 --limit 2048 --val-limit 500 --quiet "
                             "--loss-scale dynamic --save none --checkpoint-dir " + d.file("ckpt");
  auto [code, text] = run_tandem_cmd("env TANDEM_TEST_FAULT=inf:0:2 " + common + " --epochs 1 --output " +
                                     d.file("first.json"));
  ASSERT_EQ(code, 0) << text;
  EXPECT_EQ(read_json(d.file("first.json"))["loss_scale"]["skipped_steps"], 1);
  std::tie(code, text) = run_tandem_cmd(common + " --epochs 2 --resume latest --output " + d.file("second.json"));
  ASSERT_EQ(code, 0) << text;
  auto j = read_json(d.file("second.json"));
  EXPECT_EQ(j["loss_scale"]["skipped_steps"], 1) << j["loss_scale"].dump();
  EXPECT_EQ(j["loss_scale"]["scale"].get<double>(), 32768.0);
  EXPECT_EQ(j["loss_scale"]["good_run"], 2 * 16 - 2) << "the run of good steps carries on over the resume";
}

// In fp32 a power-of-two scale is exact both ways: with the scaler the run's
// weights are bit-identical to a run without one (unscaling in the wrong
// place, twice, or not at all would change them).
TEST(TrainMixedPrecision, Fp32WithADynamicScaleTrainsBitForBitAlike) {
  TempDir d("tandem_mp_exact");
  std::vector<std::vector<at::Tensor>> w;
  for (const char* s : {"none", "dynamic"}) {
    const std::string model = d.file(std::string(s) + ".pt");
    auto [code, text] = run_tandem(std::string("train --nproc 2 --limit 1024 --val-limit 200 --epochs 1 --quiet "
                                               "--output '' --loss-scale ") + s + " --save " + model);
    ASSERT_EQ(code, 0) << text;
    w.emplace_back();
    for (auto& [name, t] : tandem::models::read_weights(model)) w.back().push_back(t);
  }
  ASSERT_EQ(w[0].size(), w[1].size());
  for (size_t i = 0; i < w[0].size(); ++i) EXPECT_TRUE(torch::equal(w[0][i], w[1][i])) << "tensor " << i;
}

// bf16 on the CPU reaches fp32's accuracy within a few points.
TEST(TrainMixedPrecision, Bf16TrainsAsWellAsFp32) {
  TempDir d("tandem_mp_bf16");
  double acc[2];
  int i = 0;
  for (const char* p : {"fp32", "bf16"}) {
    const std::string out = d.file(std::string(p) + ".json");
    auto [code, text] = run_tandem(std::string("train --limit 4096 --val-limit 1000 --epochs 1 --quiet --precision ") +
                                   p + " --output " + out);
    ASSERT_EQ(code, 0) << text;
    auto j = read_json(out);
    EXPECT_EQ(j["precision"], p);
    EXPECT_EQ(j["config"]["precision"], p);
    EXPECT_FALSE(j.contains("loss_scale")) << "auto: no scaler for " << p;
    acc[i++] = j["epochs"][0]["val_accuracy"].get<double>();
  }
  EXPECT_GT(acc[0], 0.65);
  EXPECT_NEAR(acc[1], acc[0], 0.04) << "fp32 " << acc[0] << " bf16 " << acc[1];
}

TEST(TrainMixedPrecision, BadFlagsNameTheFlag) {
  struct Case {
    const char* args;
    const char* says;
  } cases[] = {
      {"train --precision fp8", "--precision 'fp8' is unknown: choose fp32"},
      {"train --precision fp16", "CPU autocast supports bf16 only"},
      {"train --precision fp16", "use --precision bf16"},
      {"train --loss-scale lots", "--loss-scale 'lots' is not auto"},
      {"train --nproc 2 --pp 2 --precision bf16", "--precision bf16 with --pp 2"},
      {"train --nproc 2 --pp 2 --loss-scale dynamic", "--loss-scale dynamic with --pp 2"},
      {"train --nproc 3 --strategy ps --loss-scale dynamic", "--loss-scale dynamic with --strategy ps"},
      {"train --nproc 3 --strategy ps --precision fp16 --model-device cuda", "--precision fp16 with --strategy ps"},
  };
  for (const auto& c : cases) {
    auto [code, out] = run_tandem(std::string(c.args) + " --quiet --output ''");
    EXPECT_NE(code, 0) << c.args;
    EXPECT_NE(out.find(c.says), std::string::npos) << c.args << "\n" << out;
  }
}
