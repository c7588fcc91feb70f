// Pipeline parallelism (pp/): the schedules as data, the min-max cut, the
// models' blocks, and pipelines of ranks on threads (comm::spawn) that must
// train exactly as one process does on the same Fashion-MNIST batches: K
// stages of one replica, D x K hybrids with DDP or the ring between the
// replicas of a stage, masked rows, uneven micro-batches. A neighbour that
// dies mid-schedule is a CommError, not a hang.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <torch/torch.h>

#include "tandem/comm/communicator.h"
#include "tandem/models/models.h"
#include "tandem/pp/pipeline.h"
#include "tandem/util/check.h"
#include "test_util.h"

using namespace tandem;

namespace {

namespace F = torch::nn::functional;
using pp::Op;
using pp::ScheduleKind;
using pp::StageOps;
using test::kGlobalBatch;

// Steps of the training comparisons: enough for momentum to matter, few
// enough for two slow cores.
constexpr int kPpSteps = 3;
static_assert(kPpSteps <= test::kSteps, "the fixture holds test::kSteps global batches");
constexpr double kTol = 1e-5;

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// "F0 F1 B0 ...": schedules compare and print readably.
std::string show(const StageOps& ops) {
  std::string s;
  for (const auto& op : ops)
    s += (s.empty() ? "" : " ") + std::string(op.kind == Op::kForward ? "F" : "B") + std::to_string(op.micro);
  return s;
}

const char* kind_name(ScheduleKind k) { return k == ScheduleKind::kGPipe ? "gpipe" : "1f1b"; }

// Short enough that a pipeline hanging because of a bug fails the test, far
// longer than any legitimate wait of these small steps.
comm::GlooOptions gloo_opts(int seconds = 30) {
  comm::GlooOptions o;
  o.timeout = std::chrono::seconds(seconds);
  return o;
}

// Aborts the test binary when a test that must not hang still runs after
// `limit` (a thread cannot be cancelled; ctest's 900 s would be the fallback).
class Watchdog {
 public:
  Watchdog(std::chrono::seconds limit, std::string what)
      : thread_([this, limit, what = std::move(what)] {
          std::unique_lock<std::mutex> lock(mu_);
          if (!cv_.wait_for(lock, limit, [this] { return done_; })) {
            std::fprintf(stderr, "pp_test: %s still running after %lld s; aborting\n", what.c_str(),
                         static_cast<long long>(limit.count()));
            std::abort();
          }
        }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;  // last: starts once the members it uses exist
};

// ---------------------------------------------------------------------------
// Schedules
// ---------------------------------------------------------------------------

// 1F1B as the header describes it, written out independently.
StageOps expected_1f1b(int stages, int stage, int micro) {
  StageOps ops;
  int f = 0, b = 0;
  const int warmup = std::min(stages - 1 - stage, micro);
  while (f < warmup) ops.push_back({Op::kForward, f++});
  while (f < micro) {
    ops.push_back({Op::kForward, f++});
    ops.push_back({Op::kBackward, b++});
  }
  while (b < micro) ops.push_back({Op::kBackward, b++});
  return ops;
}

// Runs every stage's ops in order on a clock of unit-time ops: a forward of
// micro-batch m on stage s waits for stage s-1's forward of m, a backward for
// stage s+1's backward of m (the last stage's for its own forward of m), each
// finished on an earlier tick. Returns the ticks the step spans, or -1 when
// the stages deadlock.
// Op times for simulate_bubble: stage s's forwards take fwd[s], its backwards bwd[s].
std::vector<std::vector<double>> op_times(const std::vector<pp::StageOps>& sched, const std::vector<double>& fwd,
                                          const std::vector<double>& bwd) {
  std::vector<std::vector<double>> out(sched.size());
  for (size_t s = 0; s < sched.size(); ++s)
    for (const auto& op : sched[s]) out[s].push_back(op.kind == Op::kForward ? fwd[s] : bwd[s]);
  return out;
}

int simulate_ticks(const std::vector<StageOps>& sched, int micro) {
  const int K = static_cast<int>(sched.size());
  const int kNotYet = std::numeric_limits<int>::max();
  std::vector<std::vector<int>> fwd(K, std::vector<int>(micro, kNotYet)), bwd = fwd;
  std::vector<size_t> pc(K, 0);
  for (int tick = 0; tick < 10000; ++tick) {
    bool all_done = true;
    std::vector<std::pair<int, Op>> now;
    for (int s = 0; s < K; ++s) {
      if (pc[s] == sched[s].size()) continue;
      all_done = false;
      const Op op = sched[s][pc[s]];
      int dep;
      if (op.kind == Op::kForward) dep = s == 0 ? -1 : fwd[s - 1][op.micro];
      else dep = s == K - 1 ? fwd[s][op.micro] : bwd[s + 1][op.micro];
      if (dep < tick) now.emplace_back(s, op);
    }
    if (all_done) return tick;
    if (now.empty()) return -1;
    for (auto& [s, op] : now) {
      (op.kind == Op::kForward ? fwd : bwd)[s][op.micro] = tick;
      ++pc[s];
    }
  }
  return -1;
}

TEST(Schedule, EveryStageForwardsAndBackwardsEachMicroBatchOnceInOrder) {
  for (auto kind : {ScheduleKind::kGPipe, ScheduleKind::k1F1B}) {
    for (int K = 1; K <= 4; ++K) {
      for (int M = 1; M <= 8; ++M) {
        const auto sched = pp::make_schedule(kind, K, M);
        ASSERT_EQ(sched.size(), static_cast<size_t>(K)) << kind_name(kind) << " K=" << K << " M=" << M;
        for (int s = 0; s < K; ++s) {
          const StageOps& ops = sched[s];
          SCOPED_TRACE(std::string(kind_name(kind)) + " K=" + std::to_string(K) + " M=" + std::to_string(M) +
                       " stage " + std::to_string(s) + ": " + show(ops));
          ASSERT_EQ(ops.size(), static_cast<size_t>(2 * M));
          // Forwards in micro-batch order, backwards in micro-batch order,
          // each micro-batch's forward before its backward.
          std::vector<int> fwd_at(M, -1), bwd_at(M, -1);
          int next_f = 0, next_b = 0;
          for (size_t i = 0; i < ops.size(); ++i) {
            const Op& op = ops[i];
            ASSERT_GE(op.micro, 0);
            ASSERT_LT(op.micro, M);
            if (op.kind == Op::kForward) {
              EXPECT_EQ(op.micro, next_f++);
              fwd_at[op.micro] = static_cast<int>(i);
            } else {
              EXPECT_EQ(op.micro, next_b++);
              bwd_at[op.micro] = static_cast<int>(i);
            }
          }
          EXPECT_EQ(next_f, M);
          EXPECT_EQ(next_b, M);
          for (int m = 0; m < M; ++m) EXPECT_LT(fwd_at[m], bwd_at[m]) << "micro-batch " << m;

          if (kind == ScheduleKind::kGPipe) {
            for (int m = 0; m < M; ++m) {
              EXPECT_EQ(ops[m], (Op{Op::kForward, m}));
              EXPECT_EQ(ops[M + m], (Op{Op::kBackward, m}));
            }
            EXPECT_EQ(pp::max_in_flight(ops), M);
          } else {
            EXPECT_EQ(show(ops), show(expected_1f1b(K, s, M)));
            // min(K-1-s, M) warm-up forwards plus the steady phase's first
            // forward (when a micro-batch is left for it).
            int leading = 0;
            while (leading < static_cast<int>(ops.size()) && ops[leading].kind == Op::kForward) ++leading;
            EXPECT_EQ(leading, std::min(K - 1 - s, M) + (K - 1 - s < M ? 1 : 0));
            EXPECT_EQ(pp::max_in_flight(ops), std::min(K - s, M));
            EXPECT_LE(pp::max_in_flight(ops), pp::max_in_flight(pp::make_schedule(ScheduleKind::kGPipe, K, M)[s]));
          }
        }
      }
    }
  }
}

TEST(Schedule, OneFOneBOnTwoStagesOfFourMicroBatches) {
  const auto sched = pp::make_schedule(ScheduleKind::k1F1B, 2, 4);
  ASSERT_EQ(sched.size(), 2u);
  EXPECT_EQ(show(sched[0]), "F0 F1 B0 F2 B1 F3 B2 B3");
  EXPECT_EQ(show(sched[1]), "F0 B0 F1 B1 F2 B2 F3 B3");
  EXPECT_EQ(pp::max_in_flight(sched[0]), 2);
  EXPECT_EQ(pp::max_in_flight(sched[1]), 1);
  const auto gpipe = pp::make_schedule(ScheduleKind::kGPipe, 2, 4);
  EXPECT_EQ(show(gpipe[0]), "F0 F1 F2 F3 B0 B1 B2 B3");
  EXPECT_EQ(show(gpipe[1]), "F0 F1 F2 F3 B0 B1 B2 B3");
}

TEST(Schedule, MaxInFlightCountsHeldMicroBatches) {
  EXPECT_EQ(pp::max_in_flight({}), 0);
  EXPECT_EQ(pp::max_in_flight({{Op::kForward, 0}, {Op::kBackward, 0}, {Op::kForward, 1}, {Op::kBackward, 1}}), 1);
  EXPECT_EQ(pp::max_in_flight({{Op::kForward, 0},
                               {Op::kForward, 1},
                               {Op::kBackward, 0},
                               {Op::kForward, 2},
                               {Op::kForward, 3},
                               {Op::kBackward, 1},
                               {Op::kBackward, 2},
                               {Op::kBackward, 3}}),
            3);
}

// Both schedules run to the end when every stage executes its ops in order
// (no deadlock), and with unit-time ops their idle fraction is GPipe's
// theoretical bubble (K-1)/(M+K-1): 1F1B saves memory, not time.
TEST(Schedule, StagesNeverDeadlockAndIdleAsTheTheorySays) {
  EXPECT_DOUBLE_EQ(pp::theory_bubble(2, 8), 1.0 / 9.0);
  EXPECT_DOUBLE_EQ(pp::theory_bubble(4, 4), 3.0 / 7.0);
  EXPECT_DOUBLE_EQ(pp::theory_bubble(1, 5), 0.0);
  for (auto kind : {ScheduleKind::kGPipe, ScheduleKind::k1F1B}) {
    for (int K = 1; K <= 4; ++K) {
      for (int M = 1; M <= 8; ++M) {
        const int ticks = simulate_ticks(pp::make_schedule(kind, K, M), M);
        ASSERT_GT(ticks, 0) << kind_name(kind) << " K=" << K << " M=" << M << " deadlocks";
        const double idle = static_cast<double>(ticks - 2 * M) / ticks;
        EXPECT_NEAR(idle, pp::theory_bubble(K, M), 1e-12) << kind_name(kind) << " K=" << K << " M=" << M;
        // The library's simulation agrees with this one on every stage.
        const auto sched = pp::make_schedule(kind, K, M);
        const auto lib = pp::simulate_bubble(sched, op_times(sched, std::vector<double>(K, 1.0), std::vector<double>(K, 1.0)));
        ASSERT_EQ(lib.size(), static_cast<size_t>(K));
        for (double i : lib) EXPECT_NEAR(i, idle, 1e-12) << kind_name(kind) << " K=" << K << " M=" << M;
      }
    }
  }
}

// The simulated step at given op times (equal ops: checked against the tick
// simulation above); a stage 10% slower, worked by hand for gpipe K = 2, M = 8 (stage 0:
// F 1, B 2; stage 1: F 1.1, B 2.2): stage 1's forwards end at 1 + 1.1 m,
// its backwards from 9.8 + 2.2 k; stage 0's last backward waits for stage
// 1's (ends 27.4) and ends the step at 29.4. Idle: stage 0 1 - 24 / 29.4,
// stage 1 1 - 26.4 / 29.4. One slow op delays the other stage too.
TEST(Schedule, SimulatedBubbleAtMeasuredOpTimes) {
  const auto gsched = pp::make_schedule(ScheduleKind::kGPipe, 2, 8);
  const auto gpipe = pp::simulate_bubble(gsched, op_times(gsched, {1.0, 1.1}, {2.0, 2.2}));
  EXPECT_NEAR(gpipe[0], 1 - 24.0 / 29.4, 1e-12);
  EXPECT_NEAR(gpipe[1], 1 - 26.4 / 29.4, 1e-12);
  EXPECT_LT(gpipe[1], pp::theory_bubble(2, 8));  // the slower stage idles less than the theory,
  EXPECT_GT(gpipe[0], pp::theory_bubble(2, 8));  // the faster one more
  // Equal stages, but stage 1's third forward takes 3 instead of 1: both
  // stages' steps grow by 2 (from 27 to 29), so stage 0 idles 5 of 29.
  auto jitter = op_times(gsched, {1.0, 1.0}, {2.0, 2.0});
  jitter[1][2] = 3.0;
  const auto j = pp::simulate_bubble(gsched, jitter);
  EXPECT_NEAR(j[0], 1 - 24.0 / 29.0, 1e-12);
  EXPECT_NEAR(j[1], 1 - 26.0 / 29.0, 1e-12);
  EXPECT_THROW(pp::simulate_bubble(gsched, {{1.0}, {1.0}}), tandem::Error);
}

TEST(Schedule, BadArgumentsAreErrors) {
  EXPECT_EQ(pp::parse_schedule("gpipe"), ScheduleKind::kGPipe);
  EXPECT_EQ(pp::parse_schedule("1f1b"), ScheduleKind::k1F1B);
  EXPECT_STREQ(pp::schedule_name(ScheduleKind::kGPipe), "gpipe");
  EXPECT_STREQ(pp::schedule_name(ScheduleKind::k1F1B), "1f1b");
  auto msg = test::error_of([] { pp::parse_schedule("pipedream"); });
  EXPECT_TRUE(contains(msg, "--schedule")) << msg;
  EXPECT_THROW(pp::make_schedule(ScheduleKind::k1F1B, 0, 4), tandem::Error);
  EXPECT_THROW(pp::make_schedule(ScheduleKind::kGPipe, 2, 0), tandem::Error);
}

// ---------------------------------------------------------------------------
// The min-max cut
// ---------------------------------------------------------------------------

double largest_stage(const std::vector<double>& costs, const std::vector<int>& cut) {
  double most = 0;
  for (size_t k = 0; k + 1 < cut.size(); ++k) {
    double sum = 0;
    for (int i = cut[k]; i < cut[k + 1]; ++i) sum += costs[static_cast<size_t>(i)];
    most = std::max(most, sum);
  }
  return most;
}

// Every cut of `costs` into `stages` non-empty contiguous ranges.
void for_each_cut(int n, int stages, const std::function<void(const std::vector<int>&)>& fn) {
  std::vector<int> cut(static_cast<size_t>(stages) + 1);
  cut[0] = 0;
  cut[stages] = n;
  std::function<void(int, int)> rec = [&](int k, int from) {
    if (k == stages) return fn(cut);
    for (int i = from; i <= n - (stages - k); ++i) {
      cut[k] = i;
      rec(k + 1, i + 1);
    }
  };
  rec(1, 1);
}

void expect_valid_cut(const std::vector<int>& cut, int n, int stages) {
  ASSERT_EQ(cut.size(), static_cast<size_t>(stages) + 1);
  EXPECT_EQ(cut.front(), 0);
  EXPECT_EQ(cut.back(), n);
  for (int k = 0; k < stages; ++k) EXPECT_LT(cut[k], cut[k + 1]) << "stage " << k << " is empty";
}

TEST(Partition, KnownCases) {
  EXPECT_EQ(pp::partition_min_max({1, 1, 1, 1}, 2), (std::vector<int>{0, 2, 4}));
  EXPECT_EQ(pp::partition_min_max({4, 1, 1, 1, 1}, 2), (std::vector<int>{0, 1, 5}));
  EXPECT_EQ(pp::partition_min_max({1, 2, 3, 4, 5}, 3), (std::vector<int>{0, 3, 4, 5}));  // 6 | 4 | 5
  EXPECT_EQ(pp::partition_min_max({1, 1, 1}, 2), (std::vector<int>{0, 1, 3}));  // a tie: the earliest cut
  EXPECT_EQ(pp::partition_min_max({5, 1, 1}, 1), (std::vector<int>{0, 3}));
  EXPECT_EQ(pp::partition_min_max({5, 1, 1}, 3), (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(pp::partition_min_max({1, 1, 1, 100}, 2), (std::vector<int>{0, 3, 4}));
}

TEST(Partition, LargestStageIsTheBruteForceOptimum) {
  std::mt19937 rng(42);
  for (int trial = 0; trial < 400; ++trial) {
    const int n = std::uniform_int_distribution<int>(1, 7)(rng);
    const int K = std::uniform_int_distribution<int>(1, std::min(4, n))(rng);
    const bool integral = trial % 2 == 0;  // integer costs: exact sums and many ties
    std::vector<double> costs(static_cast<size_t>(n));
    for (auto& c : costs)
      c = integral ? std::uniform_int_distribution<int>(0, 9)(rng) : std::uniform_real_distribution<double>(0.01, 10)(rng);
    std::string desc = "costs";
    for (double c : costs) desc += " " + std::to_string(c);
    desc += " into " + std::to_string(K);
    SCOPED_TRACE(desc);

    double best = std::numeric_limits<double>::infinity();
    std::vector<int> earliest;  // for K = 2: the optimum with the smallest cut
    for_each_cut(n, K, [&](const std::vector<int>& cut) {
      const double v = largest_stage(costs, cut);
      if (v < best) {
        best = v;
        earliest = cut;
      }
    });
    const auto cut = pp::partition_min_max(costs, K);
    expect_valid_cut(cut, n, K);
    if (cut.size() != static_cast<size_t>(K) + 1) continue;
    EXPECT_NEAR(largest_stage(costs, cut), best, 1e-9);
    if (K == 2 && integral) {
      EXPECT_EQ(cut, earliest);
    }
  }
}

TEST(Partition, MoreStagesThanBlocksNamesPp) {
  auto msg = test::error_of([] { pp::partition_min_max({1, 2, 3}, 4); });
  EXPECT_TRUE(contains(msg, "--pp")) << msg;
  EXPECT_EQ(pp::partition_min_max({1, 2, 3}, 3), (std::vector<int>{0, 1, 2, 3}));
}

TEST(Partition, CnnBlockParameterCounts) {
  auto m = test::fresh_cnn(false);
  ASSERT_EQ(m.blocks.size(), 4u);
  // conv1 32*1*9+32, conv2 64*32*9+64, fc1 3136*128+128, fc2 128*10+10.
  EXPECT_EQ(pp::block_params(m.blocks), (std::vector<double>{320, 18496, 401536, 1290}));
  EXPECT_EQ(pp::partition_min_max(pp::block_params(m.blocks), 2), (std::vector<int>{0, 2, 4}));
  EXPECT_EQ(pp::partition_min_max(pp::block_params(m.blocks), 3), (std::vector<int>{0, 2, 3, 4}));
}

// ---------------------------------------------------------------------------
// Blocks and their profile
// ---------------------------------------------------------------------------

models::ModelSpec spec_of(const std::string& name) {
  models::ModelSpec spec;
  spec.name = name;
  if (name == "resnet18") spec.input_shape = {1, 32, 32};
  return spec;
}

class ModelBlocks : public ::testing::TestWithParam<std::string> {};

TEST_P(ModelBlocks, AppliedInOrderTheyAreTheForward) {
  torch::set_num_threads(1);
  torch::manual_seed(3);
  const auto spec = spec_of(GetParam());
  auto m = models::make_model(spec);
  ASSERT_GE(m.blocks.size(), 2u);
  EXPECT_EQ(static_cast<int>(m.blocks.size()), models::block_count(GetParam()));  // what --pp is checked against
  m.module->eval();  // batch norm from its running statistics: no batch dependence
  std::vector<int64_t> shape{2};
  shape.insert(shape.end(), spec.input_shape.begin(), spec.input_shape.end());
  auto x = torch::randn(shape);
  torch::NoGradGuard no_grad;
  auto want = m.forward(x);
  at::Tensor y = x;
  for (const auto& b : m.blocks) y = b.forward(y);
  ASSERT_EQ(y.sizes(), want.sizes());
  EXPECT_EQ(want.size(1), 10);
  EXPECT_LT((y - want).abs().max().item<double>(), 1e-6);

  // Every parameter and buffer of the model belongs to exactly one block, so
  // the stages together train (and consolidate) all of it.
  std::map<const void*, int> params, buffers;
  std::set<std::string> names;
  for (const auto& b : m.blocks) {
    EXPECT_FALSE(b.name.empty());
    EXPECT_TRUE(names.insert(b.name).second) << "two blocks named " << b.name;
    for (const auto& p : b.parameters()) ++params[p.unsafeGetTensorImpl()];
    for (const auto& t : b.buffers()) ++buffers[t.unsafeGetTensorImpl()];
  }
  for (const auto& kv : m.module->named_parameters()) EXPECT_EQ(params[kv.value().unsafeGetTensorImpl()], 1) << kv.key();
  for (const auto& kv : m.module->named_buffers()) EXPECT_EQ(buffers[kv.value().unsafeGetTensorImpl()], 1) << kv.key();
  EXPECT_EQ(params.size(), m.module->parameters().size());
  EXPECT_EQ(buffers.size(), m.module->buffers().size());
}

INSTANTIATE_TEST_SUITE_P(Models, ModelBlocks, ::testing::Values("mlp", "cnn", "resnet18"));

TEST(Profile, MeasuresEveryBlockAndLeavesNoGradientsOrStatistics) {
  torch::set_num_threads(1);
  torch::manual_seed(4);
  auto m = models::make_model(spec_of("resnet18"));
  m.module->train();  // batch norm would move its running statistics
  std::vector<at::Tensor> before;
  for (const auto& b : m.module->buffers()) before.push_back(b.clone());
  const auto costs = pp::profile_blocks(m.blocks, torch::randn({4, 1, 32, 32}), 2);
  ASSERT_EQ(costs.size(), m.blocks.size());
  for (size_t i = 0; i < costs.size(); ++i) EXPECT_GT(costs[i], 0) << m.blocks[i].name;
  for (const auto& kv : m.module->named_parameters()) {
    const auto& g = kv.value().grad();
    EXPECT_TRUE(!g.defined() || g.abs().max().item<double>() == 0) << kv.key() << " kept a gradient";
  }
  const auto after = m.module->buffers();
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < after.size(); ++i) EXPECT_TRUE(torch::equal(after[i], before[i])) << "buffer #" << i;
}

// ---------------------------------------------------------------------------
// Pipelines against single-process training
// ---------------------------------------------------------------------------

using Named = std::map<std::string, at::Tensor>;

// Rows [begin, begin + n) of global batch `step` of the fixture.
at::Tensor rows_of(const at::Tensor& t, int step, int64_t begin, int64_t n) {
  const int64_t first = step * kGlobalBatch + begin;
  return t.slice(0, first, first + n);
}

struct Reference {
  Named first_grads;  // step 0's gradients, by parameter name
  Named params;       // after the steps
  std::vector<double> losses, correct;
};

// One process, the fixture's initial cnn, `steps` global batches of 64 rows:
// cross-entropy averaged over the batch's valid rows (`mask`: bool [64], the
// same for every batch; undefined: all rows), SGD lr 0.05 momentum 0.9.
Reference train_reference(int steps, const at::Tensor& mask) {
  const auto& f = test::sgd_fixture();
  auto m = test::fresh_cnn(true);
  torch::optim::SGD opt(m.module->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  Reference ref;
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    auto x = rows_of(f.x, s, 0, kGlobalBatch), y = rows_of(f.y, s, 0, kGlobalBatch);
    auto logits = m.forward(x);
    auto hit = logits.argmax(1).eq(y);
    at::Tensor loss;
    if (mask.defined()) {
      auto per = F::cross_entropy(logits, y, F::CrossEntropyFuncOptions().reduction(torch::kNone));
      auto w = mask.to(at::kFloat);
      loss = (per * w).sum() / w.sum();
      hit = hit & mask;
    } else {
      loss = F::cross_entropy(logits, y);
    }
    loss.backward();
    ref.losses.push_back(loss.item<double>());
    ref.correct.push_back(hit.sum().item<double>());
    if (s == 0)
      for (const auto& kv : m.module->named_parameters()) ref.first_grads[kv.key()] = kv.value().grad().clone();
    opt.step();
  }
  for (const auto& kv : m.module->named_parameters()) ref.params[kv.key()] = kv.value().detach().clone();
  return ref;
}

const Reference& full_batch_reference() {
  static const Reference ref = train_reference(kPpSteps, at::Tensor());
  return ref;
}

struct PipeCase {
  int stages = 2;
  int micro = 2;
  ScheduleKind schedule = ScheduleKind::k1F1B;
  std::string balance = "params";  // deterministic cut
  std::string sync = "ddp";
  int steps = kPpSteps;
  at::Tensor mask;  // bool [64] for every global batch; undefined: all rows valid
};

pp::PipelineOptions options_of(const PipeCase& s) {
  pp::PipelineOptions o;
  o.stages = s.stages;
  o.micro_batches = s.micro;
  o.schedule = s.schedule;
  o.balance = s.balance;
  o.sync = s.sync;
  return o;
}

// What one rank saw.
struct RankRun {
  int stage = -1, replica = -1, replicas = -1;
  bool last = false;
  std::vector<int> cut;
  std::vector<double> costs;
  std::string ops;                          // the executor's schedule for M
  std::set<std::string> owned;              // this stage's parameters, by name
  Named first_grads;                        // their gradients after step 0
  std::vector<std::string> foreign_grads;   // other stages' parameters with a gradient here
  std::vector<pp::StageStats> stats;        // of every step
  std::vector<std::string> broadcast_wrong; // broadcast_from_owners results unlike the parameter
  Named params;                             // every parameter after consolidate()
};

// One rank of a D x K pipeline, trained as the reference is: replica d takes
// rows [d * 64/D, (d+1) * 64/D) of every global batch, every stage gets them
// (only the first reads the input, only the last the target and mask).
RankRun run_rank(int rank, const comm::CommunicatorPtr& c, const PipeCase& s) {
  const auto& f = test::sgd_fixture();
  const int K = s.stages, D = c->size() / K, d = rank / K;
  const int64_t rows = kGlobalBatch / D;
  pp::Pipeline pipe(test::fresh_cnn(true), c, options_of(s), {1, 28, 28});
  RankRun out;
  out.stage = pipe.stage();
  out.replica = pipe.replica();
  out.replicas = pipe.replicas();
  out.last = pipe.last_stage();
  out.cut = pipe.cut();
  out.costs = pipe.block_costs();
  out.ops = show(pipe.stage_executor().ops(s.micro));
  std::set<const void*> mine;
  for (const auto& p : pipe.parameters()) mine.insert(p.unsafeGetTensorImpl());

  torch::optim::SGD opt(pipe.parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  for (int step = 0; step < s.steps; ++step) {
    at::Tensor mask = s.mask.defined() ? s.mask.slice(0, d * rows, (d + 1) * rows) : at::Tensor();
    out.stats.push_back(pipe.step(rows, rows_of(f.x, step, d * rows, rows), rows_of(f.y, step, d * rows, rows), mask));
    if (step == 0) {
      for (const auto& kv : pipe.model().module->named_parameters()) {
        const auto& g = kv.value().grad();
        if (mine.count(kv.value().unsafeGetTensorImpl())) {
          out.owned.insert(kv.key());
          if (g.defined()) out.first_grads[kv.key()] = g.clone();
        } else if (g.defined() && g.abs().max().item<double>() > 0) {
          out.foreign_grads.push_back(kv.key());
        }
      }
    }
    opt.step();
  }

  // Tensors that follow the parameters (here: copies of them) reach every
  // rank from their owners; the others hold a value that must be replaced.
  const auto all = pipe.model().module->parameters();
  std::vector<at::Tensor> per_param;
  for (const auto& p : all)
    per_param.push_back(mine.count(p.unsafeGetTensorImpl()) ? p.detach().clone() : torch::full_like(p, -7.0));
  pipe.broadcast_from_owners(per_param);
  pipe.consolidate();
  const auto named = pipe.model().module->named_parameters();
  for (size_t i = 0; i < all.size(); ++i)
    if ((per_param[i] - all[i].detach()).abs().max().item<double>() > kTol) out.broadcast_wrong.push_back(named[i].key());
  for (const auto& kv : named) out.params[kv.key()] = kv.value().detach().clone();
  return out;
}

std::vector<RankRun> run_pipeline(int world, const PipeCase& s) {
  std::vector<RankRun> runs(static_cast<size_t>(world));
  comm::spawn(world, [&](int rank, comm::CommunicatorPtr c) { runs[rank] = run_rank(rank, c, s); }, gloo_opts());
  return runs;
}

void expect_close(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  ASSERT_TRUE(got.defined()) << what << ": no tensor";
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  EXPECT_LT((got - want).abs().max().item<double>(), kTol) << what;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// Every rank of `runs` against the single-process reference.
void expect_matches_reference(const std::vector<RankRun>& runs, const PipeCase& s, const Reference& ref) {
  const int world = static_cast<int>(runs.size()), K = s.stages, D = world / K;
  for (int r = 0; r < world; ++r) {
    const RankRun& run = runs[r];
    SCOPED_TRACE("rank " + std::to_string(r));
    EXPECT_EQ(run.stage, r % K);
    EXPECT_EQ(run.replica, r / K);
    EXPECT_EQ(run.replicas, D);
    EXPECT_EQ(run.last, r % K == K - 1);
    EXPECT_EQ(run.cut, runs[0].cut) << "every rank takes rank 0's cut";
    EXPECT_EQ(run.ops, show(pp::make_schedule(s.schedule, K, s.micro)[r % K]));
    EXPECT_EQ(run.owned, runs[r % K].owned) << "a stage's replicas own the same parameters";
    EXPECT_FALSE(run.owned.empty());
    EXPECT_TRUE(run.foreign_grads.empty()) << "gradients outside the stage: " << join(run.foreign_grads);
    for (const auto& name : run.owned) {
      auto it = run.first_grads.find(name);
      if (it == run.first_grads.end()) {
        ADD_FAILURE() << name << " has no gradient after step 0";
        continue;
      }
      expect_close(it->second, ref.first_grads.at(name), "step-0 gradient of " + name);
    }
    ASSERT_EQ(run.stats.size(), static_cast<size_t>(s.steps));
    for (const auto& st : run.stats) EXPECT_EQ(st.micro_batches, s.micro);
    EXPECT_TRUE(run.broadcast_wrong.empty()) << "broadcast_from_owners: " << join(run.broadcast_wrong);
    ASSERT_EQ(run.params.size(), ref.params.size());
    for (const auto& [name, want] : ref.params)
      expect_close(run.params.at(name), want, "parameter " + name + " after " + std::to_string(s.steps) + " steps");
  }

  // The stages of one replica own every parameter exactly once.
  std::map<std::string, int> owners;
  for (int k = 0; k < K; ++k)
    for (const auto& name : runs[k].owned) ++owners[name];
  for (const auto& [name, want] : ref.params) EXPECT_EQ(owners[name], 1) << name;

  // The last stage of each replica reports its rows' mean loss over valid
  // rows; weighted by those rows it is the global batch's loss.
  for (int step = 0; step < s.steps; ++step) {
    double loss = 0, correct = 0, count = 0;
    for (int d = 0; d < D; ++d) {
      const auto& st = runs[d * K + K - 1].stats[step];
      loss += st.loss * st.count;
      correct += st.correct;
      count += st.count;
    }
    const double valid = s.mask.defined() ? s.mask.sum().item<double>() : static_cast<double>(kGlobalBatch);
    EXPECT_EQ(count, valid) << "step " << step;
    EXPECT_NEAR(loss / std::max(count, 1.0), ref.losses[step], kTol) << "step " << step;
    EXPECT_EQ(correct, ref.correct[step]) << "step " << step;
  }
}

// (stages, micro-batches, schedule, balance)
class PipelineEquivalence : public ::testing::TestWithParam<std::tuple<int, int, ScheduleKind, std::string>> {};

TEST_P(PipelineEquivalence, KStagesTrainLikeOneProcess) {
  torch::set_num_threads(1);
  PipeCase s;
  std::tie(s.stages, s.micro, s.schedule, s.balance) = GetParam();
  const auto& ref = full_batch_reference();
  auto runs = run_pipeline(s.stages, s);
  expect_matches_reference(runs, s, ref);
  const int nblocks = static_cast<int>(test::fresh_cnn(false).blocks.size());
  if (s.balance == "params") {
    // The parameters' min-max cut: the convolutions | fc1 (| fc2).
    EXPECT_EQ(runs[0].costs, pp::block_params(test::fresh_cnn(false).blocks));
    EXPECT_EQ(runs[0].cut, s.stages == 2 ? (std::vector<int>{0, 2, 4}) : (std::vector<int>{0, 2, 3, 4}));
  } else {
    expect_valid_cut(runs[0].cut, nblocks, s.stages);
    ASSERT_EQ(runs[0].costs.size(), static_cast<size_t>(nblocks));
    for (double c : runs[0].costs) EXPECT_GT(c, 0);
    for (const auto& run : runs) EXPECT_EQ(run.costs, runs[0].costs) << "every rank cuts by rank 0's profile";
  }
}

std::string equivalence_name(const ::testing::TestParamInfo<PipelineEquivalence::ParamType>& info) {
  return "K" + std::to_string(std::get<0>(info.param)) + "_M" + std::to_string(std::get<1>(info.param)) + "_" +
         kind_name(std::get<2>(info.param)) + "_" + std::get<3>(info.param);
}

INSTANTIATE_TEST_SUITE_P(ByParams, PipelineEquivalence,
                         ::testing::Combine(::testing::Values(2, 3), ::testing::Values(1, 2, 4),
                                            ::testing::Values(ScheduleKind::kGPipe, ScheduleKind::k1F1B),
                                            ::testing::Values(std::string("params"))),
                         equivalence_name);
INSTANTIATE_TEST_SUITE_P(ByTime, PipelineEquivalence,
                         ::testing::Values(std::make_tuple(3, 2, ScheduleKind::k1F1B, std::string("time")),
                                           std::make_tuple(2, 4, ScheduleKind::kGPipe, std::string("time"))),
                         equivalence_name);

// 2 replicas x 2 stages: replica d takes rows [32d, 32d+32) of each global
// batch, the two ranks of a stage average their gradients.
class HybridPipeline : public ::testing::TestWithParam<std::string> {};

TEST_P(HybridPipeline, TwoReplicasOfTwoStagesTrainLikeOneProcessOnTheUnion) {
  torch::set_num_threads(1);
  PipeCase s;
  s.stages = 2;
  s.micro = 2;
  s.sync = GetParam();
  const auto& ref = full_batch_reference();
  auto runs = run_pipeline(4, s);
  expect_matches_reference(runs, s, ref);
  // The replicas saw different rows: their losses differ, only their mean is the reference's.
  ASSERT_FALSE(runs[1].stats.empty());
  ASSERT_FALSE(runs[3].stats.empty());
  EXPECT_NE(runs[1].stats[0].loss, runs[3].stats[0].loss);
}

INSTANTIATE_TEST_SUITE_P(DdpAndRing, HybridPipeline, ::testing::Values("ddp", "ring"));

TEST(PipelineMask, MaskedRowsAreLeftOutOfTheMean) {
  torch::set_num_threads(1);
  // Micro-batch 0 (rows 0..31) keeps 21 rows, micro-batch 1 (rows 32..63)
  // only 5: a per-micro-batch mean would weigh those 5 like the 21.
  auto mask = torch::zeros({kGlobalBatch}, at::kBool);
  for (int64_t i = 0; i < 40; ++i)
    if (i % 3 != 0) mask[i] = true;
  ASSERT_EQ(mask.sum().item<int64_t>(), 26);
  PipeCase s;
  s.stages = 2;
  s.micro = 2;
  s.steps = 2;
  s.mask = mask;
  const auto ref = train_reference(s.steps, mask);
  // The mask matters: its gradients are not the whole batch's.
  const at::Tensor masked_g = ref.first_grads.at("fc2.weight"), full_g = full_batch_reference().first_grads.at("fc2.weight");
  EXPECT_GT((masked_g - full_g).abs().max().item<double>(), 1e-4);
  auto runs = run_pipeline(2, s);
  expect_matches_reference(runs, s, ref);
}

// 30 rows in 4 micro-batches (8, 8, 7, 7) and 3 rows (one micro-batch each):
// the gradients are still those of the batch's mean loss. Each step starts
// from cleared gradients. Stages are given only what they read.
TEST(PipelineRows, UnevenMicroBatchesAndFewerRowsThanMicroBatches) {
  torch::set_num_threads(1);
  const auto& f = test::sgd_fixture();
  const std::vector<int64_t> row_counts{30, 3};
  std::vector<Named> want(row_counts.size());
  std::vector<double> want_loss;
  for (size_t i = 0; i < row_counts.size(); ++i) {
    auto m = test::fresh_cnn(true);
    auto loss = F::cross_entropy(m.forward(f.x.slice(0, 0, row_counts[i])), f.y.slice(0, 0, row_counts[i]));
    loss.backward();
    want_loss.push_back(loss.item<double>());
    for (const auto& kv : m.module->named_parameters()) want[i][kv.key()] = kv.value().grad().clone();
  }
  struct Got {
    std::vector<Named> grads;
    std::vector<pp::StageStats> stats;
  };
  std::vector<Got> got(2);
  comm::spawn(
      2,
      [&](int rank, comm::CommunicatorPtr c) {
        PipeCase s;
        s.stages = 2;
        s.micro = 4;
        pp::Pipeline pipe(test::fresh_cnn(true), c, options_of(s), {1, 28, 28});
        std::set<const void*> mine;
        for (const auto& p : pipe.parameters()) mine.insert(p.unsafeGetTensorImpl());
        for (int64_t rows : row_counts) {
          auto x = rank == 0 ? f.x.slice(0, 0, rows) : at::Tensor();
          auto y = rank == 1 ? f.y.slice(0, 0, rows) : at::Tensor();
          got[rank].stats.push_back(pipe.step(rows, x, y, at::Tensor()));
          Named g;
          for (const auto& kv : pipe.model().module->named_parameters())
            if (mine.count(kv.value().unsafeGetTensorImpl()))
              g[kv.key()] = kv.value().grad().defined() ? kv.value().grad().clone() : at::Tensor();
          got[rank].grads.push_back(g);
        }
      },
      gloo_opts());
  for (int rank = 0; rank < 2; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    ASSERT_EQ(got[rank].stats.size(), row_counts.size());
    EXPECT_EQ(got[rank].stats[0].micro_batches, 4);
    EXPECT_EQ(got[rank].stats[1].micro_batches, 3);
    for (size_t i = 0; i < row_counts.size(); ++i) {
      EXPECT_FALSE(got[rank].grads[i].empty());
      for (const auto& [name, g] : got[rank].grads[i])
        expect_close(g, want[i].at(name), name + " on " + std::to_string(row_counts[i]) + " rows");
    }
  }
  for (size_t i = 0; i < row_counts.size(); ++i) {
    EXPECT_NEAR(got[1].stats[i].loss, want_loss[i], kTol) << row_counts[i] << " rows";
    EXPECT_EQ(got[1].stats[i].count, static_cast<double>(row_counts[i]));
  }
}

// Stage 0 of 2 holds at most 2 of 4 equal micro-batches under 1F1B, all 4
// under GPipe; the last stage 1 against 4.
TEST(PipelineMemory, OneFOneBHoldsFewerMicroBatchesThanGPipe) {
  torch::set_num_threads(1);
  const auto& f = test::sgd_fixture();
  std::map<ScheduleKind, std::vector<int64_t>> peak;
  for (auto kind : {ScheduleKind::kGPipe, ScheduleKind::k1F1B}) {
    auto& slot = peak[kind];  // looked up here, not by both threads
    slot.assign(2, -1);
    comm::spawn(
        2,
        [&](int rank, comm::CommunicatorPtr c) {
          PipeCase s;
          s.stages = 2;
          s.micro = 4;
          s.schedule = kind;
          pp::Pipeline pipe(test::fresh_cnn(true), c, options_of(s), {1, 28, 28});
          auto st = pipe.step(kGlobalBatch, rows_of(f.x, 0, 0, kGlobalBatch), rows_of(f.y, 0, 0, kGlobalBatch),
                              at::Tensor());
          slot[rank] = st.peak_activation_bytes;
        },
        gloo_opts());
  }
  const auto& gpipe = peak[ScheduleKind::kGPipe];
  const auto& one = peak[ScheduleKind::k1F1B];
  EXPECT_GT(one[0], 0);
  EXPECT_GT(one[1], 0);
  EXPECT_EQ(gpipe[0], 2 * one[0]);
  EXPECT_EQ(gpipe[1], 4 * one[1]);
}

// ---------------------------------------------------------------------------
// Configuration errors and failures
// ---------------------------------------------------------------------------

// Each rank builds the pipeline; every one of them must throw before any
// communication (a rank that went on would wait out the 10 s timeout and
// fail with a CommError, not a tandem::Error).
std::vector<std::string> construction_errors(int world, const PipeCase& s) {
  std::vector<std::string> messages(static_cast<size_t>(world));
  comm::spawn(
      world,
      [&](int rank, comm::CommunicatorPtr c) {
        messages[rank] = test::error_of([&] { pp::Pipeline pipe(test::fresh_cnn(true), c, options_of(s), {1, 28, 28}); });
      },
      gloo_opts(10));
  return messages;
}

TEST(PipelineErrors, WorldSizeNotAMultipleOfTheStages) {
  PipeCase s;
  s.stages = 2;
  for (const auto& msg : construction_errors(3, s)) {
    EXPECT_TRUE(contains(msg, "multiple")) << msg;
    EXPECT_TRUE(contains(msg, "world size")) << msg;
  }
}

TEST(PipelineErrors, NoMicroBatches) {
  PipeCase s;
  s.stages = 2;
  s.micro = 0;
  for (const auto& msg : construction_errors(2, s)) EXPECT_TRUE(contains(msg, "micro")) << msg;
}

TEST(PipelineErrors, MoreStagesThanTheCnnHasBlocks) {
  PipeCase s;
  s.stages = 5;  // the cnn has 4 blocks
  for (const auto& msg : construction_errors(5, s)) EXPECT_TRUE(contains(msg, "--pp")) << msg;
}

// Both stages run step 0 together; then one rank leaves (its pipeline and
// communicator are destroyed, as when a process dies) and the other runs
// step 1: it must fail with a CommError naming the dead rank, within the
// 5 s timeout, rather than wait for activations or gradients for ever.
// In-process the peer's sockets close, so the survivor usually learns at
// once; the timeout bounds the rest, the watchdog a hang.
class PipelineFailure : public ::testing::TestWithParam<int> {};

TEST_P(PipelineFailure, SurvivorGetsCommErrorNamingTheDeadStage) {
  torch::set_num_threads(1);
  // Writing to the dead rank's closed socket must be an error, not SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  const int dead = GetParam(), survivor = 1 - dead;
  const auto& f = test::sgd_fixture();
  Watchdog dog(std::chrono::seconds(120), "PipelineFailure");

  std::mutex mu;
  std::condition_variable cv;
  int finished_first_step = 0;
  bool first_step_ok[2] = {false, false};
  bool comm_error = false;
  std::string what;
  double took = -1;
  comm::spawn(
      2,
      [&](int rank, comm::CommunicatorPtr c) {
        PipeCase s;
        s.stages = 2;
        s.micro = 2;
        pp::Pipeline pipe(test::fresh_cnn(true), c, options_of(s), {1, 28, 28});
        auto step = [&](int i) {
          return pipe.step(kGlobalBatch, rows_of(f.x, i, 0, kGlobalBatch), rows_of(f.y, i, 0, kGlobalBatch),
                           at::Tensor());
        };
        std::exception_ptr error;
        try {
          step(0);
          first_step_ok[rank] = true;
        } catch (...) {
          error = std::current_exception();
        }
        {
          std::unique_lock<std::mutex> lock(mu);
          ++finished_first_step;
          cv.notify_all();
          cv.wait_for(lock, std::chrono::seconds(60), [&] { return finished_first_step == 2; });
        }
        if (error) std::rethrow_exception(error);
        if (rank == dead) return;
        const auto t0 = std::chrono::steady_clock::now();
        try {
          step(1);
        } catch (const tandem::CommError& e) {
          comm_error = true;
          what = e.what();
        }
        took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      },
      gloo_opts(5));
  EXPECT_TRUE(first_step_ok[0] && first_step_ok[1]);
  EXPECT_TRUE(comm_error) << "rank " << survivor << " finished step 1 without its neighbour";
  EXPECT_TRUE(contains(what, "rank " + std::to_string(dead))) << what;
  EXPECT_GE(took, 0);
  EXPECT_LT(took, 30) << "the 5 s timeout should have ended the wait";
}

INSTANTIATE_TEST_SUITE_P(DeadStage, PipelineFailure, ::testing::Values(1, 0),
                         [](const auto& info) { return std::string(info.param == 1 ? "LastStageDies" : "FirstStageDies"); });

}  // namespace

// Batch norm (resnet18): each micro-batch is normalised with its own
// statistics and the running statistics move once per micro-batch, so a
// 2-stage pipeline with M = 2 equals one process that runs the same two
// micro-batches one after another with gradient accumulation: gradients and
// running statistics alike.
TEST(PipelineBatchNorm, MicroBatchesNormaliseAlone) {
  constexpr int64_t kRows = 8, kMicro = 2;
  const models::ModelSpec spec{"resnet18", 10, {1, 16, 16}};
  torch::manual_seed(3);
  auto x = torch::randn({kRows, 1, 16, 16});
  auto y = torch::randint(10, {kRows}, torch::kLong);
  // Reference: micro-batches in turn, each loss its share of the batch mean.
  torch::manual_seed(11);
  auto ref = models::make_model(spec);
  ref.module->train();
  // The ranks (threads: one global generator) start from these values.
  std::map<std::string, at::Tensor> init;
  for (const auto& p : ref.module->named_parameters()) init[p.key()] = p.value().detach().clone();
  for (const auto& b : ref.module->named_buffers()) init[b.key()] = b.value().clone();
  for (int64_t m = 0; m < kMicro; ++m) {
    const int64_t b = m * kRows / kMicro, n = kRows / kMicro;
    auto loss = F::cross_entropy(ref.forward(x.slice(0, b, b + n)), y.slice(0, b, b + n),
                                 F::CrossEntropyFuncOptions().reduction(torch::kSum)) / static_cast<double>(kRows);
    loss.backward();
  }
  std::map<std::string, at::Tensor> want;
  for (const auto& p : ref.module->named_parameters()) want[p.key()] = p.value().grad().clone();
  for (const auto& b : ref.module->named_buffers()) want[b.key()] = b.value().clone();

  Watchdog dog(std::chrono::seconds(120), "PipelineBatchNorm");
  std::mutex mu;
  std::map<std::string, at::Tensor> got;
  comm::spawn(2, [&](int rank, comm::CommunicatorPtr c) {
    auto m = models::make_model(spec);
    {
      torch::NoGradGuard guard;
      for (const auto& p : m.module->named_parameters()) p.value().copy_(init.at(p.key()));
      for (const auto& b : m.module->named_buffers()) b.value().copy_(init.at(b.key()));
    }
    m.module->train();
    pp::PipelineOptions o;
    o.stages = 2;
    o.micro_batches = kMicro;
    o.schedule = ScheduleKind::kGPipe;
    o.balance = "params";
    pp::Pipeline pipe(m, c, o, {1, 16, 16});
    pipe.step(kRows, rank == 0 ? x : at::Tensor(), rank == 1 ? y : at::Tensor(), at::Tensor());
    {
      std::lock_guard<std::mutex> lock(mu);
      for (const auto& p : m.module->named_parameters())
        if (p.value().grad().defined()) got["grad " + p.key()] = p.value().grad().clone();
    }
    pipe.consolidate();  // every stage's running statistics on every rank (a collective: no lock held)
    std::lock_guard<std::mutex> lock(mu);
    if (rank == 0)
      for (const auto& b : m.module->named_buffers()) got["buffer " + b.key()] = b.value().clone();
  }, gloo_opts());
  for (const auto& p : ref.module->named_parameters()) {
    auto it = got.find("grad " + p.key());
    ASSERT_NE(it, got.end()) << p.key() << " got no gradient on any stage";
    EXPECT_LT((it->second - want[p.key()]).abs().max().item<double>(), kTol) << p.key();
  }
  for (const auto& b : ref.module->named_buffers()) {
    auto it = got.find("buffer " + b.key());
    ASSERT_NE(it, got.end()) << b.key();
    EXPECT_TRUE(torch::allclose(it->second.to(torch::kDouble), want[b.key()].to(torch::kDouble), 1e-5, 1e-6)) << b.key();
  }
}
