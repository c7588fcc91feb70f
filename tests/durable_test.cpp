// Durable training end to end, with real processes: the trained model in
// PyTorch, exact resume after a killed rank (ddp, ring, ps), resume on another
// world size, damaged checkpoints, the stall inspector and the collective
// checks.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "run_tandem.h"
#include "tandem/data/idx.h"
#include "tandem/models/weights.h"
#include "test_util.h"

namespace fs = std::filesystem;
using tandem::test::TempDir;

namespace {

nlohmann::json read_json(const fs::path& p) {
  std::ifstream f(p);
  EXPECT_TRUE(f.good()) << p;
  return nlohmann::json::parse(f);
}

// Every tensor of two weights files equal, bit for bit.
void expect_same_weights(const std::string& a, const std::string& b) {
  auto wa = tandem::models::read_weights(a), wb = tandem::models::read_weights(b);
  ASSERT_EQ(wa.size(), wb.size());
  for (size_t i = 0; i < wa.size(); ++i) {
    EXPECT_EQ(wa[i].first, wb[i].first);
    EXPECT_TRUE(torch::equal(wa[i].second, wb[i].second)) << wa[i].first << " differs";
  }
}

std::pair<int, std::string> run_tandem_env(const std::string& env, const std::string& args) {
  return run_tandem_cmd("env " + env + " " + std::string(TANDEM_EXE) + " " + args);
}

const std::string kSmall = " --model mlp --limit 768 --val-limit 300 --batch-size 32 --num-workers 1 --quiet ";

}  // namespace

TEST(Durable, TrainedModelLoadsInPyTorchWithTheSameAccuracy) {
  TempDir d("tandem_durable");
  auto [code, out] = run_tandem("train --nproc 2 --epochs 1" + kSmall + "--output " + d.file("r.json"));
  ASSERT_EQ(code, 0) << out;
  ASSERT_TRUE(fs::exists(d.file("model.pt"))) << out;
  const double acc = read_json(d.file("r.json"))["epochs"][0]["val_accuracy"].get<double>();
  // Python's torch.load reads it into the same architecture: same accuracy.
  const std::string cmd = "/usr/bin/python3 " + std::string(TANDEM_SOURCE_DIR) + "/tests/eval_state_dict.py " +
                          d.file("model.pt") + " mlp " + tandem::data::kFashionMnistDir + " 300 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  char buf[4096];
  std::string py;
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) py.append(buf, n);
  ASSERT_EQ(pclose(p), 0) << py;
  double py_acc = -1;
  ASSERT_EQ(std::sscanf(py.c_str(), "accuracy %lf", &py_acc), 1) << py;
  EXPECT_NEAR(py_acc, acc, 1e-9) << py;
  // --weights loads it back: one step at a negligible learning rate keeps the accuracy.
  auto [code2, out2] = run_tandem("train --epochs 1 --limit 32 --model mlp --val-limit 300 --batch-size 32 --quiet "
                                  "--lr 1e-12 --momentum 0 --save none --weights " + d.file("model.pt") +
                                  " --output " + d.file("w.json"));
  ASSERT_EQ(code2, 0) << out2;
  EXPECT_NEAR(read_json(d.file("w.json"))["epochs"][0]["val_accuracy"].get<double>(), acc, 1e-9);
}

class ExactResume : public ::testing::TestWithParam<std::string> {};

// 12 steps per epoch (pp: 24); checkpoints every 5 steps; a worker kills itself
// (SIGKILL) after step 17, in epoch 2; the launcher restarts the group, which
// resumes from the checkpoint of step 15. The result is bit-identical to an
// uninterrupted run.
TEST_P(ExactResume, KilledRankEndsBitIdentical) {
  const std::string strategy = GetParam();
  TempDir d("tandem_exact");
  const bool ps = strategy == "ps";
  const std::string worker = ps ? "2" : "1";
  // pp: two pipeline stages of one replica (24 steps per epoch); every
  // stage's parameters and momentum are in the checkpoint.
  const std::string how = strategy == "pp" ? "ddp --pp 2 --micro-batches 2" : strategy;
  const std::string common = "train --nproc " + std::string(ps ? "3" : "2") + " --strategy " + how +
                             " --epochs 2" + kSmall + "--checkpoint-every 5 ";
  auto [c1, o1] = run_tandem(common + "--checkpoint-dir " + d.file("ck_ref") + " --output " + d.file("ref.json") +
                             " --save " + d.file("ref.pt"));
  ASSERT_EQ(c1, 0) << o1;
  auto [c2, o2] = run_tandem_env("TANDEM_TEST_FAULT=kill:" + worker + ":17",
                                 common + "--max-restarts 1 --checkpoint-dir " + d.file("ck") + " --output " +
                                     d.file("killed.json"));
  ASSERT_EQ(c2, 0) << o2;
  EXPECT_NE(o2.find("rank " + worker + " kills itself after step 17"), std::string::npos) << o2;
  EXPECT_NE(o2.find("restarting the group"), std::string::npos) << o2;
  expect_same_weights(d.file("ref.pt"), d.file("model.pt"));
  auto ref = read_json(d.file("ref.json")), got = read_json(d.file("killed.json"));
  EXPECT_EQ(got["restarts"].get<int>(), 1);
  EXPECT_GE(got["steps_redone"].get<int>(), 0);
  for (int e = 0; e < 2; ++e)
    EXPECT_EQ(got["epochs"][e]["val_accuracy"].get<double>(), ref["epochs"][e]["val_accuracy"].get<double>());
  EXPECT_EQ(got["all_losses"].size(), ref["all_losses"].size());
}

INSTANTIATE_TEST_SUITE_P(Strategies, ExactResume, ::testing::Values("ddp", "ring", "ps", "pp"));

// The parameter server's async mode is not deterministic: a killed worker's
// run resumes (shards, momentum, update count) and converges.
TEST(Durable, AsyncParameterServerResumesAndConverges) {
  TempDir d("tandem_async");
  auto [code, out] = run_tandem_env("TANDEM_TEST_FAULT=kill:2:17",
                                    "train --nproc 3 --strategy ps --ps-mode async --momentum 0.5 --epochs 2" +
                                        kSmall + "--checkpoint-every 5 --max-restarts 1 --checkpoint-dir " +
                                        d.file("ck") + " --output " + d.file("r.json"));
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("resuming from"), std::string::npos) << out;
  auto j = read_json(d.file("r.json"));
  EXPECT_EQ(j["restarts"].get<int>(), 1);
  ASSERT_EQ(j["epochs"].size(), 2u);
  EXPECT_GT(j["epochs"][1]["val_accuracy"].get<double>(), 0.6);
}

// A checkpoint taken mid-epoch by 2 ranks continues on 3: the rest of the
// epoch is re-sharded, every step is accounted for, and training converges.
TEST(Durable, ResumesOnAnotherWorldSize) {
  TempDir d("tandem_reshard");
  auto [c1, o1] = run_tandem("train --nproc 2 --epochs 1" + kSmall + "--checkpoint-every 5 --keep-checkpoints 5 "
                             "--checkpoint-dir " + d.file("ck") + " --output " + d.file("two.json"));
  ASSERT_EQ(c1, 0) << o1;
  ASSERT_TRUE(fs::exists(d.file("ck/ckpt-0000000010"))) << o1;
  auto [c2, o2] = run_tandem("train --nproc 3 --epochs 2" + kSmall + "--resume " + d.file("ck/ckpt-0000000010") +
                             " --output " + d.file("three.json") + " --save none");
  ASSERT_EQ(c2, 0) << o2;
  EXPECT_NE(o2.find("resuming 2 ranks' run on 3"), std::string::npos) << o2;
  auto j = read_json(d.file("three.json"));
  ASSERT_EQ(j["epochs"].size(), 2u);
  // Epoch 1: 10 steps of 2 x 32, then (768 - 640) samples over 3 ranks: 2 steps; epoch 2: 768 / 3 / 32 = 8 steps.
  EXPECT_EQ(j["all_losses"].size(), 10u + 2u + 8u);
  EXPECT_GT(j["epochs"][1]["val_accuracy"].get<double>(), 0.6);
}

// The newest checkpoint damaged: --resume falls back to the one before with
// a warning naming the file; asked for by path, it is an error naming it.
TEST(Durable, DamagedCheckpointFallsBackOrFails) {
  TempDir d("tandem_damaged");
  auto [c1, o1] = run_tandem("train --epochs 1" + kSmall + "--checkpoint-every 10 --checkpoint-dir " + d.file("ck") +
                             " --output " + d.file("a.json"));
  ASSERT_EQ(c1, 0) << o1;
  // 24 steps: checkpoints at 10, 20 and the end of training (24); 2 are kept.
  ASSERT_TRUE(fs::exists(d.file("ck/ckpt-0000000024"))) << o1;
  ASSERT_TRUE(fs::exists(d.file("ck/ckpt-0000000020"))) << o1;
  {
    std::fstream f(d.file("ck/ckpt-0000000024/model.pt"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(200);
    char c = 0;
    f.read(&c, 1);
    f.seekp(200);
    c = static_cast<char>(c ^ 0x40);
    f.write(&c, 1);
  }
  // (--resume DIR reads a directory of checkpoints and writes none)
  auto [c2, o2] = run_tandem("train --epochs 1" + kSmall + "--resume " + d.file("ck") + " --output " +
                             d.file("b.json") + " --save none");
  EXPECT_EQ(c2, 0) << o2;
  EXPECT_NE(o2.find("model.pt"), std::string::npos) << o2;
  EXPECT_NE(o2.find("ckpt-0000000020"), std::string::npos) << o2;
  EXPECT_EQ(read_json(d.file("b.json"))["epochs"].size(), 1u);
  auto [c3, o3] = run_tandem("train --epochs 1" + kSmall + "--resume " + d.file("ck/ckpt-0000000024") +
                             " --output " + d.file("c.json"));
  EXPECT_NE(c3, 0) << o3;
  EXPECT_NE(o3.find("model.pt"), std::string::npos) << o3;
  // A fresh run refuses a directory holding another run's checkpoints.
  auto [c5, o5] = run_tandem("train --epochs 1" + kSmall + "--checkpoint-dir " + d.file("ck") + " --output " +
                             d.file("e.json"));
  EXPECT_NE(c5, 0) << o5;
  EXPECT_NE(o5.find("holds checkpoints of an earlier run"), std::string::npos) << o5;
  // Another model cannot continue this checkpoint: the message names the difference.
  auto [c4, o4] = run_tandem("train --epochs 2 --model cnn --limit 768 --val-limit 300 --batch-size 32 --quiet "
                             "--resume " + d.file("ck/ckpt-0000000020") + " --output " + d.file("d.json"));
  EXPECT_NE(c4, 0) << o4;
  EXPECT_NE(o4.find("model = \"mlp\""), std::string::npos) << o4;
}

// --check-collectives: a rank that issues another collective than the
// others is an error naming both ranks, not a hang or a wrong sum.
TEST(Durable, CheckCollectivesNamesBothRanks) {
  TempDir d("tandem_mismatch");
  auto [code, out] = run_tandem_env("TANDEM_TEST_FAULT=mismatch", "train --nproc 2 --epochs 1" + kSmall +
                                                                      "--check-collectives --timeout 30 --output " +
                                                                      d.file("r.json"));
  EXPECT_NE(code, 0) << out;
  EXPECT_NE(out.find("collective mismatch"), std::string::npos) << out;
  EXPECT_NE(out.find("rank 0 calls all_reduce(float32 x 2"), std::string::npos) << out;
  EXPECT_NE(out.find("rank 1 calls all_reduce(float32 x 3"), std::string::npos) << out;
}

// The stall inspector: a stopped rank is named by rank 0 after --stall-warn;
// then --timeout ends the job, and nothing is left running.
TEST(Durable, StallInspectorNamesAStoppedRank) {
  TempDir d("tandem_stall");
  const std::string log = d.file("log.txt");
  const std::string cmd = std::string(TANDEM_EXE) + " train --nproc 2 --epochs 1 --model mlp --limit 20000 "
                          "--val-limit 300 --batch-size 32 --num-workers 1 --stall-warn 2 --timeout 8 --output " +
                          d.file("r.json") + " > " + log + " 2>&1";
  pid_t launcher = fork();
  ASSERT_GE(launcher, 0);
  if (launcher == 0) {
    setpgid(0, 0);
    execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  // Rank 1: the launcher's child whose environment says RANK=1, once training runs.
  auto read_file = [](const std::string& p) {
    std::ifstream f(p);
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  pid_t rank1 = -1;
  const auto t0 = std::chrono::steady_clock::now();
  while (rank1 < 0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    if (read_file(log).find("model start") == std::string::npos) continue;
    for (const auto& e : fs::directory_iterator("/proc")) {
      const std::string name = e.path().filename().string();
      if (name.find_first_not_of("0123456789") != std::string::npos) continue;
      std::string stat = read_file("/proc/" + name + "/stat");
      auto close = stat.rfind(')');
      if (close == std::string::npos) continue;
      int ppid = 0;
      char state = 0;
      if (std::sscanf(stat.c_str() + close + 2, "%c %d", &state, &ppid) != 2 || ppid != launcher) continue;
      std::string env = read_file("/proc/" + name + "/environ");
      for (size_t at = 0; at < env.size(); at = env.find('\0', at) + 1) {
        if (env.compare(at, 7, std::string("RANK=1\0", 7)) == 0) rank1 = std::stoi(name);
        if (env.find('\0', at) == std::string::npos) break;
      }
    }
  }
  ASSERT_GT(rank1, 0) << read_file(log);
  ASSERT_EQ(::kill(rank1, SIGSTOP), 0);
  const auto stopped = std::chrono::steady_clock::now();
  int status = 0;
  pid_t r = 0;
  while ((r = waitpid(launcher, &status, WNOHANG)) == 0 &&
         std::chrono::steady_clock::now() - stopped < std::chrono::seconds(60))
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  if (r == 0) {
    ::kill(-launcher, SIGKILL);
    ::kill(rank1, SIGKILL);
    waitpid(launcher, &status, 0);
    FAIL() << "the job did not end within 60 s of the stop\n" << read_file(log);
  }
  const std::string out = read_file(log);
  EXPECT_NE(status, 0) << out;
  EXPECT_NE(out.find("stall: collective #"), std::string::npos) << out;
  EXPECT_NE(out.find("rank 1 has not reached it"), std::string::npos) << out;
  // No orphans: rank 1's pid is gone.
  EXPECT_NE(::kill(rank1, 0), 0) << "rank 1 (pid " << rank1 << ") survived the job";
}
