// End to end, real processes: `tandem train` and `tandem compare` on a
// Fashion-MNIST subset, and the flag checks.
#include <gtest/gtest.h>

#include <cmath>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "run_tandem.h"
#include "tandem/models/weights.h"

namespace fs = std::filesystem;

namespace {

struct Run {
  int code;
  std::string output;
};

Run run(const std::string& args) {
  auto [code, out] = run_tandem(args);
  return {code, out};
}

fs::path temp_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("tandem_train_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream f(p);
  EXPECT_TRUE(f.good()) << p;
  return nlohmann::json::parse(f);
}

void expect_schema(const nlohmann::json& j, bool ps) {
  for (const char* k : {"method", "world_size", "batch_size", "start_time", "end_time", "epochs", "summary", "all_losses"})
    EXPECT_TRUE(j.contains(k)) << k;
  ASSERT_FALSE(j["epochs"].empty());
  for (const auto& e : j["epochs"]) {
    for (const char* k : {"epoch", "train_loss", "train_accuracy", "train_time", "train_throughput", "avg_batch_time",
                          "val_loss", "val_accuracy"})
      EXPECT_TRUE(e.contains(k)) << k;
    if (ps) {
      EXPECT_TRUE(e.contains("avg_comm_time_pull"));
      EXPECT_TRUE(e.contains("avg_comm_time_push"));
    } else {
      EXPECT_TRUE(e.contains("avg_comm_time"));
    }
    EXPECT_GT(e["train_throughput"].get<double>(), 0);
    EXPECT_GT(e["val_accuracy"].get<double>(), 0.3);  // learned something in one short epoch
    EXPECT_TRUE(e["pipeline"].contains("stall_fraction"));
  }
  for (const char* k : {"avg_train_throughput", "avg_train_time_per_epoch", "best_val_accuracy"})
    EXPECT_TRUE(j["summary"].contains(k)) << k;
  if (ps) {
    EXPECT_TRUE(j.contains("num_workers"));
  }
  EXPECT_FALSE(j["all_losses"].empty());
}

// A port nobody listens on now (the kernel picks it; closed again at once).
int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  EXPECT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  ::close(fd);
  return ntohs(a.sin_port);
}

// Two `tandem launch` "nodes" on loopback meeting through the TCPStore, each
// running `nproc` ranks of `args`; `prefix` + node rank goes before the
// executable (e.g. "env TANDEM_HOST_ID=node"). Both must exit 0.
void run_two_nodes(int nproc, const std::string& prefix, const std::string& args) {
  const std::string port = std::to_string(free_port());
  auto node = [&](int r) {
    return "launch --nnodes 2 --node-rank " + std::to_string(r) + " --master-addr 127.0.0.1 --master-port " + port +
           " --nproc-per-node " + std::to_string(nproc) + " -- " + (prefix.empty() ? "" : prefix + std::to_string(r) + " ") +
           std::string(TANDEM_EXE) + " " + args;
  };
  ::Run second{};
  std::thread t([&] { second = run(node(1)); });
  ::Run first = run(node(0));
  t.join();
  ASSERT_EQ(first.code, 0) << first.output;
  ASSERT_EQ(second.code, 0) << second.output;
}

}  // namespace

TEST(Train, TwoRanksOnASubsetWriteTheResultsJson) {
  auto d = temp_dir("train");
  auto r = run("train --nproc 2 --limit 2000 --val-limit 1000 --epochs 1 --output " + (d / "r.json").string());
  ASSERT_EQ(r.code, 0) << r.output;
  auto j = read_json(d / "r.json");
  expect_schema(j, false);
  EXPECT_EQ(j["method"], "baseline_ddp");
  EXPECT_EQ(j["world_size"], 2);
  EXPECT_EQ(j["batch_size"], 64);
  // 2000 samples, 2 ranks, batch 64: 16 steps per rank.
  EXPECT_EQ(j["all_losses"].size(), 16u);
  fs::remove_all(d);
}

// --pp 2: two pipeline stages of one replica, then a 2 x 2 hybrid; the
// results JSON holds the pp section; the saved model is the whole cnn.
TEST(Train, PipelineStagesTrainAndReport) {
  auto d = temp_dir("train_pp");
  for (const std::string world : {"2", "4"}) {
    const auto out = d / ("pp" + world + ".json");
    auto r = run("train --nproc " + world + " --pp 2 --micro-batches 4 --schedule gpipe --limit 2048 --val-limit 1000 "
                 "--epochs 1 --batch-size 32 --output " + out.string() + " --trace " + (d / "t.json").string());
    ASSERT_EQ(r.code, 0) << r.output;
    EXPECT_NE(r.output.find("pp: 2 stages x " + std::string(world == "2" ? "1 replica" : "2 replicas")),
              std::string::npos) << r.output;
    auto j = read_json(out);
    expect_schema(j, false);
    EXPECT_EQ(j["method"], "pp");
    EXPECT_EQ(j["config"]["pp"], 2);
    const auto& pp = j["pp"];
    EXPECT_EQ(pp["stages"], 2);
    EXPECT_EQ(pp["replicas"], world == "2" ? 1 : 2);
    EXPECT_EQ(pp["schedule"], "gpipe");
    EXPECT_NEAR(pp["theory_bubble"].get<double>(), 1.0 / 5.0, 1e-12);
    ASSERT_EQ(pp["cut"].size(), 3u);
    EXPECT_EQ(pp["cut"][0], 0);
    EXPECT_EQ(pp["cut"][2], 4);
    ASSERT_EQ(pp["per_stage"].size(), 2u);
    for (const auto& s : pp["per_stage"]) {
      EXPECT_GT(s["busy_per_step_s"].get<double>(), 0.0);
      EXPECT_GT(s["peak_activation_bytes"].get<double>(), 0.0);
      EXPECT_GT(s["bubble_fraction"].get<double>(), 0.0);
      EXPECT_LT(s["bubble_fraction"].get<double>(), 1.0);
    }
    // 2048 samples, per-replica batch 32: 64 steps (1 replica) or 32 (2).
    EXPECT_EQ(j["all_losses"].size(), world == "2" ? 64u : 32u);
    EXPECT_GT(j["epochs"][0]["val_accuracy"].get<double>(), 0.6);
    // Every stage's spans in the trace of its rank.
    for (const char* rank : {"0", "1"}) {
      std::ifstream t(d / ("t.rank" + std::string(rank) + ".json"));
      std::stringstream ss;
      ss << t.rdbuf();
      EXPECT_NE(ss.str().find("\"stage " + std::string(rank) + "\""), std::string::npos);
      EXPECT_NE(ss.str().find("\"B3\""), std::string::npos);
    }
  }
  // The saved weights are the whole model under its usual names.
  auto w = tandem::models::read_weights((d / "model.pt").string());
  EXPECT_EQ(w.size(), 8u);  // conv1, conv2, fc1, fc2: weight and bias
  fs::remove_all(d);
}

// Distributed evaluation counts every validation sample exactly once: with
// 1001 samples over 3 ranks (shards of 334, 334, 333, loaded by the ranks'
// loader workers), accuracy is k / 1001 for a whole k.
TEST(Train, EvaluationCountsEachValidationSampleOnce) {
  auto d = temp_dir("eval");
  auto r = run("train --nproc 3 --limit 1536 --val-limit 1001 --num-workers 2 --epochs 1 --quiet --output " +
               (d / "r.json").string());
  ASSERT_EQ(r.code, 0) << r.output;
  const double acc = read_json(d / "r.json")["epochs"][0]["val_accuracy"].get<double>();
  const double k = acc * 1001;
  EXPECT_NEAR(k, std::round(k), 1e-6) << "val accuracy " << acc << " is not a multiple of 1/1001";
  EXPECT_GT(acc, 0.0);
  fs::remove_all(d);
}

TEST(Train, CompareRunsThreeMethodsAndReports) {
  auto d = temp_dir("compare");
  auto r = run("compare --nproc 3 --limit 1536 --val-limit 600 --epochs 1 --out " + d.string());
  ASSERT_EQ(r.code, 0) << r.output;
  expect_schema(read_json(d / "results_baseline_ddp.json"), false);
  expect_schema(read_json(d / "results_all_reduce.json"), false);
  auto ps = read_json(d / "results_ps.json");
  expect_schema(ps, true);
  // The server comes on top: 3 workers like DDP's 3 ranks, so sync PS is the
  // same SGD and its per-step losses follow DDP's.
  EXPECT_EQ(ps["num_workers"], 3);
  EXPECT_EQ(ps["world_size"], 4);
  auto ddp = read_json(d / "results_baseline_ddp.json");
  ASSERT_EQ(ps["all_losses"].size(), ddp["all_losses"].size());
  ASSERT_GE(ddp["all_losses"].size(), 8u);
  for (size_t i = 0; i < ddp["all_losses"].size(); ++i)
    EXPECT_NEAR(ps["all_losses"][i].get<double>(), ddp["all_losses"][i].get<double>(), 1e-3) << "step " << i;
  EXPECT_TRUE(fs::exists(d / "performance_report.txt"));
  fs::remove_all(d);
}

// The multi-host path (TCPStore on --master-addr/--master-port), with two
// "nodes" of one rank each started as separate `tandem launch` processes.
TEST(Train, TwoNodesMeetThroughTheTcpStore) {
  auto d = temp_dir("nodes");
  run_two_nodes(1, "", "train --limit 640 --val-limit 200 --epochs 1 --quiet --output " + (d / "nodes.json").string());
  auto j = read_json(d / "nodes.json");
  expect_schema(j, false);
  EXPECT_EQ(j["world_size"], 2);
  fs::remove_all(d);
}

// The communicator changes how gradients travel, not what they sum to: with
// the same seed, gloo, shm (one host) and hybrid (two launch "nodes" on
// loopback with different TANDEM_HOST_ID, 2 ranks each) train to the same
// accuracy as gloo with the same world size.
TEST(Train, CommunicatorsReachTheSameAccuracy) {
  auto d = temp_dir("comms");
  const std::string common = " --limit 2048 --val-limit 1000 --epochs 1 --quiet ";
  auto acc = [&](const fs::path& p) {
    auto j = read_json(p);
    return std::make_pair(j["epochs"].back()["val_accuracy"].get<double>(), j["config"]["comm"].get<std::string>());
  };
  for (const char* c : {"gloo", "shm"}) {
    auto r = run(std::string("train --nproc 2 --comm ") + c + common + "--output " + (d / (std::string(c) + ".json")).string());
    ASSERT_EQ(r.code, 0) << r.output;
  }
  auto [g, gname] = acc(d / "gloo.json");
  auto [s, sname] = acc(d / "shm.json");
  EXPECT_EQ(gname, "gloo");
  EXPECT_EQ(sname, "shm");
  EXPECT_NEAR(s, g, 0.02) << "shm vs gloo (sums in another order: a few samples may flip)";
  EXPECT_GT(g, 0.3);  // it learned (chance is 0.1; 32 steps of one epoch)

  auto r4 = run("train --nproc 4 --comm gloo" + common + "--output " + (d / "gloo4.json").string());
  ASSERT_EQ(r4.code, 0) << r4.output;
  // TANDEM_HOST_ID makes the two launches two hosts.
  run_two_nodes(2, "env TANDEM_HOST_ID=node", "train" + common + "--output " + (d / "hybrid.json").string());
  auto [g4, g4name] = acc(d / "gloo4.json");
  auto [h, hname] = acc(d / "hybrid.json");
  EXPECT_EQ(hname, "hybrid");
  EXPECT_NEAR(h, g4, 0.02) << "hybrid vs gloo, 4 ranks";
  fs::remove_all(d);
}

TEST(Train, BadFlagsNameTheFlag) {
  struct Case {
    const char* args;
    const char* says;
  } cases[] = {
      {"train --nproc 0", "--nproc must be >= 1"},
      {"train --lr -1", "--lr must be a positive number"},
      {"train --model alexnet", "unknown model 'alexnet'"},
      {"train --strategy magic", "--strategy 'magic' is unknown"},
      {"train --strategy ps", "at least 2 ranks"},
      {"train --buffer-size zero", "--buffer-size must be a number >= 1 or auto"},
      {"train --buffer-size 8x", "--buffer-size must be a number >= 1 or auto, got '8x'"},
      {"train --buffer-size 99999999999999999999", "--buffer-size must be a number >= 1 or auto"},
      {"train --data-dir /nonexistent", "/nonexistent/train-images-idx3-ubyte.gz: no such file"},
      {"train --model-device cuda:3", "cuda:3"},
      {"train --compress int4", "--compress int4: unknown gradient compression; choose none, fp16, bf16, int8"},
      {"train --compress topk:0", "the fraction F of topk:F must be a number in (0, 1]"},
      {"train --nproc 3 --strategy ps --compress powersgd:2", "needs an all-reduce among the workers"},
      {"train --sync-every 0", "--sync-every must be >= 1"},
      {"train --nproc 3 --strategy ps --balance auto", "--balance auto applies to --strategy ddp or ring"},
      {"train --comm tcp", "--comm: unknown communicator 'tcp' (accepted: auto, gloo, shm, hybrid, nccl)"},
      {"train --loss-scale dynamic --compress topk:0.01", "--loss-scale with --compress topk:0.01"},
      {"train --model-device auto --precision fp16", "--precision fp16 on the CPU model device"},
      {"train --nproc 3 --pp 2", "the world size 3 is not a multiple of the stage count"},
      {"train --nproc 2 --pp 5", "--pp 5: the model has only 4 blocks"},
      {"train --pp 2 --micro-batches 0", "--micro-batches must be >= 1"},
      {"train --pp 2 --schedule zigzag", "--schedule 'zigzag' is unknown"},
      {"train --pp 2 --pp-balance flops", "--pp-balance 'flops' is unknown"},
      {"train --nproc 3 --pp 2 --strategy ps", "--pp 2 with --strategy ps"},
      {"train --pp 2 --batch-size 4 --micro-batches 8", "cannot be split into --micro-batches 8"},
      {"compare --methods localsgd:8x", "--methods: 'localsgd:8x': 8x is not a whole number >= 1"},
      {"compare --nproc 3 --methods ddp,pp", "'pp' cuts the model into 2 stages, which --nproc 3 is not a multiple of"},
  };
  for (const auto& c : cases) {
    auto r = run(std::string(c.args) + " --quiet --output ''");
    EXPECT_NE(r.code, 0) << c.args;
    EXPECT_NE(r.output.find(c.says), std::string::npos) << c.args << "\n" << r.output;
  }
}
