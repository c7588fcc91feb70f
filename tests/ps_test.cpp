// Parameter server: sync mode equals single-process SGD on the union of the
// workers' batches (1 and 2 servers, both transports, across two epochs);
// async and SSP reduce the loss, SSP respects its staleness bound; options are
// validated; a dead worker surfaces as CommError. Ranks are threads sharing
// an in-memory store, on real Fashion-MNIST samples.
#include <gtest/gtest.h>

#include <atomic>
#include <iostream>
#include <chrono>
#include <csignal>
#include <thread>

#include <torch/torch.h>

#include "tandem/comm/communicator.h"
#include "tandem/data/idx.h"
#include "tandem/models/models.h"
#include "tandem/sync/ps.h"
#include "tandem/util/check.h"
#include "test_util.h"

using namespace tandem;
namespace ps = tandem::sync::ps;

namespace {

using test::fresh_cnn;
using test::kGlobalBatch;
using test::kSteps;
constexpr double kLr = 0.05, kMomentum = 0.9;

std::vector<at::Tensor> snapshot(torch::nn::Module& m) {
  std::vector<at::Tensor> out;
  for (auto& p : m.parameters()) out.push_back(p.detach().clone());
  return out;
}

// kSteps of torch::optim::SGD on the whole 64-sample batch of each step.
std::vector<at::Tensor> reference_params() {
  const auto& f = test::sgd_fixture();
  auto m = fresh_cnn(true);
  torch::optim::SGD opt(m.module->parameters(), torch::optim::SGDOptions(kLr).momentum(kMomentum));
  for (int s = 0; s < kSteps; ++s) {
    opt.zero_grad();
    int64_t b = s * kGlobalBatch;
    auto loss = torch::nn::functional::cross_entropy(m.forward(f.x.slice(0, b, b + kGlobalBatch)),
                                                     f.y.slice(0, b, b + kGlobalBatch));
    loss.backward();
    opt.step();
  }
  return snapshot(*m.module);
}

void expect_close(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    double diff = (a[i] - b[i]).abs().max().item<double>();
    EXPECT_LT(diff, 1e-5) << what << " #" << i;
  }
}

// --- sync mode equals single-process SGD -----------------------------------

class PsSync : public ::testing::TestWithParam<std::tuple<int, int, ps::Transport>> {};

TEST_P(PsSync, EqualsSgdOnTheUnionOfWorkerBatches) {
  torch::set_num_threads(1);
  auto [world, servers, transport] = GetParam();
  const auto& f = test::sgd_fixture();
  const auto want = reference_params();
  ps::PsOptions o;
  o.num_servers = servers;
  o.transport = transport;
  o.lr = kLr;
  o.momentum = kMomentum;
  const int workers = world - servers;
  ASSERT_EQ(kGlobalBatch % workers, 0);
  const int64_t per_worker = kGlobalBatch / workers;
  const std::vector<int64_t> epochs{3, kSteps - 3};  // two epochs, evaluation-like collective between
  std::vector<std::vector<at::Tensor>> got(world);
  comm::spawn(world, [&](int rank, comm::CommunicatorPtr c) {
    auto m = fresh_cnn(/*load_reference=*/rank == 0);  // the others get rank 0's by broadcast
    auto between_epochs = [&] {
      auto t = torch::ones({3});
      c->all_reduce(t);
      ASSERT_EQ(t[0].item<float>(), static_cast<float>(world));
    };
    if (ps::is_server(rank, o)) {
      ps::Server server(m.module, c, o);
      for (auto steps : epochs) {
        server.serve_epoch(steps);
        ps::finalize_epoch(*m.module, *c, o);
        between_epochs();
      }
      EXPECT_EQ(server.updates(), kSteps);
      EXPECT_TRUE(server.clock_log().empty());
    } else {
      ps::Worker worker(m.module, c, o);
      EXPECT_EQ(worker.name(), "ps");
      EXPECT_TRUE(worker.applies_update());
      const int w = ps::worker_index(rank, o);
      int s = 0;
      for (auto steps : epochs) {
        for (int64_t i = 0; i < steps; ++i, ++s) {
          worker.begin_step(true);
          m.module->zero_grad();
          int64_t b = s * kGlobalBatch + w * per_worker;
          auto loss = torch::nn::functional::cross_entropy(m.forward(f.x.slice(0, b, b + per_worker)),
                                                           f.y.slice(0, b, b + per_worker));
          loss.backward();
          worker.finish();
          EXPECT_GE(worker.last_times().pull, 0.0);
          EXPECT_GE(worker.last_times().push, 0.0);
        }
        ps::finalize_epoch(*m.module, *c, o);
        between_epochs();
      }
    }
    got[rank] = snapshot(*m.module);
  });
  for (int r = 0; r < world; ++r) expect_close(got[r], want, "rank " + std::to_string(r) + " parameters");
}

INSTANTIATE_TEST_SUITE_P(ServersAndTransports, PsSync,
                         ::testing::Values(std::make_tuple(3, 1, ps::Transport::kCollective),
                                           std::make_tuple(3, 1, ps::Transport::kP2P),
                                           std::make_tuple(4, 2, ps::Transport::kCollective),
                                           std::make_tuple(4, 2, ps::Transport::kP2P)),
                         [](const auto& info) {
                           return "world" + std::to_string(std::get<0>(info.param)) + "_servers" +
                                  std::to_string(std::get<1>(info.param)) + "_" +
                                  ps::to_string(std::get<2>(info.param));
                         });

// --- async and SSP ---------------------------------------------------------

constexpr int kSubset = 2000;
constexpr int kAsyncSteps = 40;
constexpr int64_t kBatch = 32;
constexpr double kAsyncMomentum = 0.5;

const data::TensorDataset& subset() {
  static auto ds = data::load_fashion_mnist(data::kFashionMnistDir, true, kSubset);
  return *ds;
}

struct AsyncOutcome {
  std::vector<std::vector<double>> losses;  // [worker][step]
  std::vector<ps::ClockRecord> log;
};

// 1 server + 3 workers, kAsyncSteps steps each; worker 0 sleeps `slow` per step.
AsyncOutcome run_async(ps::Mode mode, int staleness, std::chrono::milliseconds slow) {
  torch::set_num_threads(1);
  constexpr int kWorld = 4;
  ps::PsOptions o;
  o.mode = mode;
  o.staleness = staleness;
  o.transport = ps::Transport::kP2P;
  // Asynchrony acts like extra momentum (stale gradients), so the explicit
  // momentum is lower than sync mode's 0.9, as usual for async SGD.
  o.lr = kLr;
  o.momentum = kAsyncMomentum;
  const auto& ds = subset();
  AsyncOutcome out;
  out.losses.assign(kWorld - 1, {});
  comm::spawn(kWorld, [&](int rank, comm::CommunicatorPtr c) {
    torch::manual_seed(1);
    auto m = models::make_model({"mlp"});
    if (ps::is_server(rank, o)) {
      ps::Server server(m.module, c, o);
      server.serve_epoch(kAsyncSteps);
      ps::finalize_epoch(*m.module, *c, o);
      out.log = server.clock_log();
    } else {
      ps::Worker worker(m.module, c, o);
      const int w = ps::worker_index(rank, o), W = ps::num_workers(kWorld, o);
      for (int s = 0; s < kAsyncSteps; ++s) {
        if (w == 0 && slow.count() > 0) std::this_thread::sleep_for(slow);
        worker.begin_step(true);
        std::vector<int64_t> idx;
        for (int64_t i = 0; i < kBatch; ++i) idx.push_back(((s * W + w) * kBatch + i) % kSubset);
        auto b = ds.get_batch(idx, {});
        m.module->zero_grad();
        auto loss = torch::nn::functional::cross_entropy(m.forward(b.input), b.target);
        loss.backward();
        worker.finish();
        out.losses[w].push_back(loss.item<double>());
      }
      ps::finalize_epoch(*m.module, *c, o);
    }
    // Every rank can still run collectives (the trainer evaluates next).
    auto t = torch::ones({1});
    c->all_reduce(t);
    EXPECT_EQ(t.item<float>(), static_cast<float>(kWorld));
  });
  return out;
}

double mean_loss(const AsyncOutcome& o, int from, int to) {
  double sum = 0;
  int n = 0;
  for (const auto& l : o.losses)
    for (int s = from; s < to; ++s, ++n) sum += l.at(s);
  return sum / n;
}

TEST(PsAsync, ReducesTheTrainingLoss) {
  auto o = run_async(ps::Mode::kAsync, 0, std::chrono::milliseconds(0));
  const double first = mean_loss(o, 0, 10), last = mean_loss(o, kAsyncSteps - 10, kAsyncSteps);
  EXPECT_LT(last, first * 0.8) << "first 10 steps " << first << ", last 10 steps " << last;
  EXPECT_EQ(o.log.size(), static_cast<size_t>(3 * kAsyncSteps));  // one answered pull per step
  int64_t spread = 0;
  for (const auto& r : o.log) spread = std::max(spread, r.clock - r.min_clock);
  std::cout << "async: loss " << first << " -> " << last << ", max clock - min_clock " << spread << "\n";
}

TEST(PsSsp, ReducesTheLossAndKeepsWithinTheStalenessBound) {
  constexpr int kStaleness = 1;
  auto o = run_async(ps::Mode::kSsp, kStaleness, std::chrono::milliseconds(30));
  const double first = mean_loss(o, 0, 10), last = mean_loss(o, kAsyncSteps - 10, kAsyncSteps);
  EXPECT_LT(last, first * 0.8) << "first 10 steps " << first << ", last 10 steps " << last;
  ASSERT_EQ(o.log.size(), static_cast<size_t>(3 * kAsyncSteps));
  int at_bound = 0;
  for (const auto& r : o.log) {
    EXPECT_LE(r.clock - r.min_clock, kStaleness) << "worker " << r.worker << " clock " << r.clock;
    EXPECT_GE(r.clock, r.min_clock);
    if (r.clock - r.min_clock == kStaleness) ++at_bound;
  }
  EXPECT_GT(at_bound, 0) << "the slow worker never held the others back to the bound";
}

// --- options, topology, layout ------------------------------------------------

std::string error_of(const ps::PsOptions& o, int world) {
  try {
    ps::validate(o, world);
  } catch (const tandem::Error& e) {
    return e.what();
  }
  return "";
}

TEST(PsOptions, ValidateNamesTheProblem) {
  ps::PsOptions o;
  EXPECT_EQ(error_of(o, 2), "");
  EXPECT_NE(error_of(o, 1).find("at least 2 ranks"), std::string::npos);
  auto k = o;
  k.num_servers = 2;
  EXPECT_NE(error_of(k, 2).find("must be < world size"), std::string::npos) << error_of(k, 2);
  EXPECT_EQ(error_of(k, 3), "");
  k.num_servers = 0;
  EXPECT_NE(error_of(k, 3).find("--ps-servers"), std::string::npos);
  auto s = o;
  s.mode = ps::Mode::kSsp;
  s.transport = ps::Transport::kP2P;
  s.staleness = -1;
  EXPECT_NE(error_of(s, 3).find("--ps-staleness"), std::string::npos);
  s.staleness = 2;
  EXPECT_EQ(error_of(s, 3), "");
  s.transport = ps::Transport::kCollective;
  EXPECT_NE(error_of(s, 3).find("--ps-transport p2p"), std::string::npos) << error_of(s, 3);
  auto a = o;
  a.mode = ps::Mode::kAsync;
  EXPECT_NE(error_of(a, 3).find("--ps-transport p2p"), std::string::npos);
  auto l = o;
  l.lr = 0;
  EXPECT_NE(error_of(l, 3).find("--lr"), std::string::npos);
}

TEST(PsOptions, ParseModeAndTransport) {
  EXPECT_EQ(ps::parse_mode("sync"), ps::Mode::kSync);
  EXPECT_EQ(ps::parse_mode("async"), ps::Mode::kAsync);
  EXPECT_EQ(ps::parse_mode("ssp"), ps::Mode::kSsp);
  EXPECT_EQ(ps::parse_transport("p2p"), ps::Transport::kP2P);
  EXPECT_EQ(ps::parse_transport("collective"), ps::Transport::kCollective);
  try {
    ps::parse_mode("bsp");
    FAIL() << "no error";
  } catch (const tandem::Error& e) {
    EXPECT_NE(std::string(e.what()).find("sync, async, ssp"), std::string::npos) << e.what();
  }
  try {
    ps::parse_transport("mpi");
    FAIL() << "no error";
  } catch (const tandem::Error& e) {
    EXPECT_NE(std::string(e.what()).find("p2p, collective"), std::string::npos) << e.what();
  }
}

TEST(PsTopology, ServersFirstThenWorkers) {
  ps::PsOptions o;
  o.num_servers = 2;
  EXPECT_TRUE(ps::is_server(0, o));
  EXPECT_TRUE(ps::is_server(1, o));
  EXPECT_FALSE(ps::is_server(2, o));
  EXPECT_EQ(ps::num_workers(5, o), 3);
  EXPECT_EQ(ps::worker_index(2, o), 0);
  EXPECT_EQ(ps::worker_index(4, o), 2);
}

TEST(PsLayout, ContiguousBalancedShards) {
  for (int64_t total : {1, 7, 100, 421642}) {
    for (int k : {1, 2, 3, 7}) {
      if (total < k) continue;
      ps::ShardLayout l(total, k);
      ASSERT_EQ(l.num_shards(), k);
      int64_t at = 0, lo = total, hi = 0;
      for (int i = 0; i < k; ++i) {
        EXPECT_EQ(l.shard(i).begin, at);
        at = l.shard(i).end;
        lo = std::min(lo, l.shard(i).size());
        hi = std::max(hi, l.shard(i).size());
      }
      EXPECT_EQ(at, total);
      EXPECT_LE(hi - lo, 1) << total << " / " << k;
    }
  }
}

TEST(PsLayout, FlatParamsRoundTripsAcrossParameterBoundaries) {
  torch::manual_seed(3);
  auto m = models::make_model({"mlp"});
  ps::FlatParams fp(*m.module);
  auto flat = at::empty({fp.total()});
  fp.gather_params(flat, fp.all());
  auto want = snapshot(*m.module);
  // Scatter 3 uneven shards of a changed copy, gather them back.
  ps::ShardLayout l(fp.total(), 3);
  auto changed = flat * 2 + 1;
  for (int k = 0; k < 3; ++k) fp.scatter_params(changed, l.shard(k));
  auto ps_ = m.module->parameters();
  for (size_t i = 0; i < ps_.size(); ++i) EXPECT_TRUE(torch::allclose(ps_[i], want[i] * 2 + 1)) << i;
  auto back = at::empty({fp.total()});
  for (int k = 0; k < 3; ++k) fp.gather_params(back, l.shard(k));
  EXPECT_TRUE(torch::equal(back, changed));
  fp.gather_grads(back, fp.all());  // no gradients yet: zeros
  EXPECT_EQ(back.abs().sum().item<double>(), 0.0);
}

TEST(PsRoles, WrongRoleIsAnError) {
  ps::PsOptions o;
  std::vector<std::string> messages(2);
  comm::spawn(2, [&](int rank, comm::CommunicatorPtr c) {
    auto m = models::make_model({"mlp"});
    try {
      if (rank == 0)
        ps::Worker w(m.module, c, o);  // rank 0 is the server
      else
        ps::Server s(m.module, c, o);  // rank 1 is a worker
    } catch (const tandem::Error& e) {
      messages[rank] = e.what();
    }
  });
  EXPECT_NE(messages[0].find("construct ps::Server"), std::string::npos) << messages[0];
  EXPECT_NE(messages[1].find("construct ps::Worker"), std::string::npos) << messages[1];
}

TEST(PsWorker, GradientAccumulationIsRejected) {
  ps::PsOptions o;
  std::string message;
  comm::spawn(2, [&](int rank, comm::CommunicatorPtr c) {
    auto m = models::make_model({"mlp"});
    if (rank == 0) {
      ps::Server s(m.module, c, o);
      s.serve_epoch(0);
    } else {
      ps::Worker w(m.module, c, o);
      try {
        w.begin_step(false);
      } catch (const tandem::Error& e) {
        message = e.what();
      }
    }
  });
  EXPECT_NE(message.find("--grad-accum"), std::string::npos) << message;
}

// --- failures ----------------------------------------------------------------

class PsFailure : public ::testing::TestWithParam<ps::Mode> {};

TEST_P(PsFailure, ServerSeesADeadWorkerAsCommError) {
  torch::set_num_threads(1);
  // Writing to the dead rank's closed socket must be an error, not SIGPIPE
  // (Gloo writes without MSG_NOSIGNAL; the process has to ignore SIGPIPE).
  std::signal(SIGPIPE, SIG_IGN);
  ps::PsOptions o;
  o.mode = GetParam();
  o.transport = ps::Transport::kP2P;
  o.staleness = 1;
  comm::GlooOptions g;
  g.timeout = std::chrono::milliseconds(3000);
  std::atomic<bool> server_comm_error{false};
  std::string what;
  comm::spawn(
      3,
      [&](int rank, comm::CommunicatorPtr c) {
        auto m = models::make_model({"mlp"});
        if (rank == 0) {
          ps::Server s(m.module, c, o);
          try {
            s.serve_epoch(3);
          } catch (const tandem::CommError& e) {
            server_comm_error = true;
            what = e.what();
          }
        } else if (rank == 1) {
          ps::Worker w(m.module, c, o);  // dies right away: never pulls
        } else {
          ps::Worker w(m.module, c, o);
          try {
            for (int s = 0; s < 3; ++s) {
              w.begin_step(true);
              m.module->zero_grad();
              m.forward(torch::zeros({2, 1, 28, 28})).sum().backward();
              w.finish();
            }
          } catch (const tandem::CommError&) {
            // the server gave up (sync mode: it waits for the dead worker first)
          }
        }
      },
      g);
  EXPECT_TRUE(server_comm_error.load());
  EXPECT_NE(what.find("rank 0"), std::string::npos) << what;
}

INSTANTIATE_TEST_SUITE_P(Modes, PsFailure, ::testing::Values(ps::Mode::kSync, ps::Mode::kAsync, ps::Mode::kSsp),
                         [](const auto& info) { return ps::to_string(info.param); });

}  // namespace
