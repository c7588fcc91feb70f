// Communicator: collectives and point-to-point across ranks-as-threads.
#include <gtest/gtest.h>

#include "tandem/comm/communicator.h"
#include "tandem/util/check.h"

using tandem::comm::CommunicatorPtr;

class CommTest : public ::testing::TestWithParam<std::tuple<int, int64_t>> {};

TEST_P(CommTest, AllReduceSumsAcrossRanks) {
  auto [world, count] = GetParam();
  tandem::comm::spawn(world, [&](int rank, CommunicatorPtr c) {
    auto t = torch::arange(count, torch::kFloat32) + rank;
    c->all_reduce(t);
    // sum_r (i + r) = world*i + world*(world-1)/2
    auto want = torch::arange(count, torch::kFloat32) * world + world * (world - 1) / 2.0;
    ASSERT_TRUE(torch::allclose(t, want)) << "rank " << rank;
  });
}

TEST_P(CommTest, BroadcastCopiesRoot) {
  auto [world, count] = GetParam();
  const int root = world - 1;
  tandem::comm::spawn(world, [&](int rank, CommunicatorPtr c) {
    auto t = rank == root ? torch::arange(count, torch::kFloat64) * 3 : torch::full({count}, -1.0, torch::kFloat64);
    c->broadcast(t, root);
    ASSERT_TRUE(torch::equal(t, torch::arange(count, torch::kFloat64) * 3)) << "rank " << rank;
  });
}

class P2PTest : public CommTest {};

TEST_P(P2PTest, SendRecvAroundTheRing) {
  auto [world, count] = GetParam();
  tandem::comm::spawn(world, [&](int rank, CommunicatorPtr c) {
    auto out = torch::full({count}, static_cast<float>(rank), torch::kFloat32);
    auto in = torch::empty({count}, torch::kFloat32);
    int right = (rank + 1) % world, left = (rank + world - 1) % world;
    auto s = c->send_async(out, right, 7);
    auto r = c->recv_async(in, left, 7);
    s->wait(c->timeout());
    r->wait(c->timeout());
    ASSERT_TRUE(torch::equal(in, torch::full({count}, static_cast<float>(left)))) << "rank " << rank;
  });
}

INSTANTIATE_TEST_SUITE_P(WorldsAndCounts, CommTest,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4),
                                            ::testing::Values<int64_t>(0, 1, 7, 1000, (1 << 20) + 3)));

INSTANTIATE_TEST_SUITE_P(WorldsAndCounts, P2PTest,
                         ::testing::Combine(::testing::Values(2, 3, 4),
                                            ::testing::Values<int64_t>(0, 1, 7, 1000, (1 << 20) + 3)));

TEST(Comm, SingleRankHasNoPeers) {
  auto c = tandem::comm::make_single();
  auto t = torch::ones({3});
  c->all_reduce(t);
  EXPECT_TRUE(torch::equal(t, torch::ones({3})));
  EXPECT_THROW(c->send(t, 1, 0), tandem::Error);
}

TEST(Comm, RecvAnyReportsSource) {
  tandem::comm::spawn(3, [&](int rank, CommunicatorPtr c) {
    if (rank == 0) {
      for (int i = 0; i < 2; ++i) {
        auto t = torch::zeros({1});
        int src = c->recv_any(t, 3);
        ASSERT_EQ(t.item<float>(), static_cast<float>(src * 10));
      }
    } else {
      auto t = torch::full({1}, static_cast<float>(rank * 10));
      c->send(t, 0, 3);
    }
  });
}

TEST(Comm, ReduceToRoot) {
  tandem::comm::spawn(3, [&](int rank, CommunicatorPtr c) {
    auto t = torch::full({5}, static_cast<float>(rank + 1));
    c->reduce(t, 1);
    if (rank == 1) {
      ASSERT_TRUE(torch::equal(t, torch::full({5}, 6.0f)));
    }
  });
}
