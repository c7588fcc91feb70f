// Checked communicator: results unchanged, mismatched collectives become a
// tandem::Error on every rank, and the stall inspector names the late rank.
// Ranks are threads over Gloo (comm::spawn); the inspector's store is a
// HashStore shared by the ranks of one test.
#include <gtest/gtest.h>

#include <chrono>
#include <mutex>
#include <thread>

#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include "tandem/comm/checked.h"
#include "tandem/comm/communicator.h"
#include "tandem/util/check.h"
#include "tandem/util/clock.h"

using tandem::Clock;
using tandem::comm::CheckOptions;
using tandem::comm::CommunicatorPtr;
using tandem::comm::OpLabel;
using tandem::comm::ReduceOp;

namespace {

// Short enough that a collective hanging because of a bug fails the test, long
// enough for the 3 s stalls below.
tandem::comm::GlooOptions gloo_opts() {
  tandem::comm::GlooOptions o;
  o.timeout = std::chrono::seconds(15);
  return o;
}

// The lines one rank's checked communicator logged, with when.
struct Log {
  std::mutex m;
  std::vector<std::pair<Clock::time_point, std::string>> lines;
  std::function<void(const std::string&)> sink() {
    return [this](const std::string& line) {
      std::lock_guard<std::mutex> lock(m);
      lines.emplace_back(Clock::now(), line);
    };
  }
  std::string text() {
    std::string s;
    for (auto& l : lines) s += l.second + "\n";
    return s;
  }
};

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const tandem::Error& e) {
    return e.what();
  }
  return "<no tandem::Error thrown>";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

CheckOptions fingerprints_only() {
  CheckOptions o;
  o.fingerprints = true;
  o.stall_warn_s = 0;
  return o;
}

}  // namespace

// Every collective through the wrapper (fingerprints and inspector on) gives
// the bits the bare communicator gives.
class CheckedResultsTest : public ::testing::TestWithParam<int> {};

TEST_P(CheckedResultsTest, SameValuesAsUnwrapped) {
  int world = GetParam();
  auto store = c10::make_intrusive<c10d::HashStore>();
  tandem::comm::spawn(world, [&](int rank, CommunicatorPtr inner) {
    CheckOptions o;
    o.fingerprints = true;
    o.stall_warn_s = 60;
    auto c = tandem::comm::make_checked(inner, store, o);
    ASSERT_EQ(c->rank(), rank);
    ASSERT_EQ(c->size(), world);
    ASSERT_EQ(c->backend(), inner->backend());
    ASSERT_EQ(c->timeout(), inner->timeout());
    // Runs `op` on a copy through each communicator; they must agree bit for bit.
    using Op = std::function<void(CommunicatorPtr, at::Tensor&)>;
    auto same = [&](const char* what, const at::Tensor& x, const Op& op) {
      auto a = x.clone(), b = x.clone();
      op(inner, a);
      op(c, b);
      ASSERT_TRUE(at::equal(a, b)) << what << " on rank " << rank;
    };
    auto f = at::randn({7}) + rank;
    auto l = at::arange(5, at::kLong) * (rank + 1);
    same("all_reduce", f, [](CommunicatorPtr k, at::Tensor& t) { k->all_reduce(t); });
    same("all_reduce max int64", l, [](CommunicatorPtr k, at::Tensor& t) { k->all_reduce(t, ReduceOp::kMax); });
    same("all_reduce_async min", f, [](CommunicatorPtr k, at::Tensor& t) {
      OpLabel label("min of f");
      k->all_reduce_async(t, ReduceOp::kMin)->wait(k->timeout());
    });
    same("broadcast", f, [&](CommunicatorPtr k, at::Tensor& t) { k->broadcast(t, world - 1); });
    same("broadcast_async", l, [](CommunicatorPtr k, at::Tensor& t) { k->broadcast_async(t, 0)->wait(k->timeout()); });
    same("reduce", f, [](CommunicatorPtr k, at::Tensor& t) { k->reduce(t, 0); });
    same("all_gather", f, [&](CommunicatorPtr k, at::Tensor& t) {
      auto out = at::zeros({world * t.numel()});
      k->all_gather(out, t);
      t = out;
    });
    same("all_gather_async", l, [&](CommunicatorPtr k, at::Tensor& t) {
      auto out = at::zeros({world * t.numel()}, at::kLong);
      k->all_gather_async(out, t)->wait(k->timeout());
      t = out;
    });
    // Several asynchronous collectives in flight, waited in reverse order.
    same("3 async all_reduce", f, [](CommunicatorPtr k, at::Tensor& t) {
      std::vector<at::Tensor> parts{t.clone(), t.clone() * 2, t.clone() * 3};
      std::vector<tandem::comm::RequestPtr> reqs;
      for (auto& p : parts) reqs.push_back(k->all_reduce_async(p));
      for (int i = 2; i >= 0; --i) reqs[i]->wait(k->timeout());
      t = at::cat(parts);
    });
    c->barrier();
  }, gloo_opts());
}

INSTANTIATE_TEST_SUITE_P(World, CheckedResultsTest, ::testing::Values(2, 3));

// Point-to-point calls take no sequence number: rank 0 sends twice while the
// others receive once each, and the following collective still matches.
TEST(CheckedTest, PointToPointIsNotNumbered) {
  tandem::comm::spawn(3, [&](int rank, CommunicatorPtr inner) {
    auto c = tandem::comm::make_checked(inner, {}, fingerprints_only());
    auto t = at::full({4}, static_cast<float>(rank));
    if (rank == 0) {
      c->send(t, 1, 0);
      c->send_async(t, 2, 0)->wait(c->timeout());
    } else {
      c->recv(t, 0, 0);
      ASSERT_TRUE(at::equal(t, at::zeros({4})));
    }
    auto s = at::ones({3});
    c->all_reduce(s);
    ASSERT_TRUE(at::equal(s, at::full({3}, 3.0f)));
  }, gloo_opts());
}

// Different element counts at collective #3: both ranks throw the same error
// naming both calls instead of hanging or summing garbage, and the
// communicator stays usable.
TEST(CheckedTest, ElementCountMismatchThrowsOnEveryRank) {
  std::vector<std::string> errors(2);
  tandem::comm::spawn(2, [&](int rank, CommunicatorPtr inner) {
    auto c = tandem::comm::make_checked(inner, {}, fingerprints_only());
    c->barrier();  // #1
    auto warm = at::ones({2});
    c->all_reduce(warm);  // #2
    auto t = at::ones({rank == 0 ? 10 : 20});
    errors[rank] = error_of([&] {
      OpLabel label(rank == 0 ? "bucket 2 all-reduce" : "bucket 3 all-reduce");
      c->all_reduce(t);  // #3
    });
    ASSERT_TRUE(at::equal(t, at::ones({rank == 0 ? 10 : 20}))) << "the mismatched collective ran";
    auto after = at::ones({3});
    c->all_reduce(after);
    ASSERT_TRUE(at::equal(after, at::full({3}, 2.0f)));
  }, gloo_opts());
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r) + ": " + errors[r]);
    EXPECT_TRUE(contains(errors[r], "collective mismatch at #3"));
    EXPECT_TRUE(contains(errors[r], "rank 0 calls all_reduce(float32 x 10, sum) 'bucket 2 all-reduce'"));
    EXPECT_TRUE(contains(errors[r], "rank 1 calls all_reduce(float32 x 20, sum) 'bucket 3 all-reduce'"));
  }
  EXPECT_EQ(errors[0], errors[1]);
}

// all_reduce against broadcast, issued asynchronously: the check happens at
// issue time, so both ranks throw before anything is in flight.
TEST(CheckedTest, OperationKindMismatchThrowsOnEveryRank) {
  std::vector<std::string> errors(2);
  tandem::comm::spawn(2, [&](int rank, CommunicatorPtr inner) {
    auto c = tandem::comm::make_checked(inner, {}, fingerprints_only());
    auto t = at::ones({10});
    errors[rank] = error_of([&] {
      if (rank == 0) {
        c->all_reduce_async(t)->wait(c->timeout());
      } else {
        c->broadcast_async(t, 0)->wait(c->timeout());
      }
    });
    c->barrier();
  }, gloo_opts());
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r) + ": " + errors[r]);
    EXPECT_TRUE(contains(errors[r], "collective mismatch at #1"));
    EXPECT_TRUE(contains(errors[r], "rank 0 calls all_reduce(float32 x 10, sum)"));
    EXPECT_TRUE(contains(errors[r], "rank 1 calls broadcast(float32 x 10, root 0)"));
  }
}

// Three ranks, one with another dtype: the ranks that agree are grouped.
TEST(CheckedTest, DtypeMismatchGroupsAgreeingRanks) {
  std::vector<std::string> errors(3);
  tandem::comm::spawn(3, [&](int rank, CommunicatorPtr inner) {
    auto c = tandem::comm::make_checked(inner, {}, fingerprints_only());
    auto in = at::ones({4}, rank == 1 ? at::kDouble : at::kFloat);
    auto out = at::zeros({12}, in.scalar_type());
    errors[rank] = error_of([&] { c->all_gather(out, in); });
  }, gloo_opts());
  for (int r = 0; r < 3; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r) + ": " + errors[r]);
    EXPECT_TRUE(contains(errors[r], "ranks 0, 2 call all_gather(float32 x 4 per rank)"));
    EXPECT_TRUE(contains(errors[r], "rank 1 calls all_gather(float64 x 4 per rank)"));
  }
}

// Rank 1 reaches collective #2 three seconds after rank 0: rank 0 logs one
// stall line naming rank 1 while it waits, then both complete normally.
TEST(CheckedTest, StallNamesTheRankThatHasNotArrived) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  Log logs[2];
  Clock::time_point rank1_joins;
  tandem::comm::spawn(2, [&](int rank, CommunicatorPtr inner) {
    CheckOptions o;
    o.stall_warn_s = 1;
    o.log = logs[rank].sink();
    auto c = tandem::comm::make_checked(inner, store, o);
    {
      OpLabel label("bucket 1 all-reduce");
      auto w = at::ones({3});
      c->all_reduce(w);  // #1
    }
    if (rank == 1) {
      std::this_thread::sleep_for(std::chrono::seconds(3));
      rank1_joins = Clock::now();
    }
    OpLabel label("bucket 2 all-reduce");
    auto t = at::ones({1024});
    c->all_reduce_async(t)->wait(c->timeout());  // #2
    ASSERT_TRUE(at::equal(t, at::full({1024}, 2.0f)));
    c->barrier();
  }, gloo_opts());
  ASSERT_EQ(logs[0].lines.size(), 1u) << logs[0].text();
  const std::string& line = logs[0].lines[0].second;
  EXPECT_TRUE(contains(line, "stall: collective #2 'bucket 2 all-reduce' has waited")) << line;
  EXPECT_TRUE(contains(line, "on rank 0; rank 1 has not reached it (last issued #1 'bucket 1 all-reduce'")) << line;
  EXPECT_LT(logs[0].lines[0].first, rank1_joins) << "the stall was reported after it ended";
  EXPECT_TRUE(logs[1].lines.empty()) << "only rank 0 reports";
  EXPECT_TRUE(store->check({"tandem/check/rank0", "tandem/check/rank1"}));
}

// Rank 0 is the late one: it has no collective waiting, but reads that rank 1
// has waited in #2 too long and reports itself. Another rank's record may be
// a tick old, so its stall shows after stall_warn_s + 1.5 s (here 2.5 s).
TEST(CheckedTest, StallOnAnotherRankIsReportedByRankZero) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  Log logs[2];
  Clock::time_point rank0_joins;
  tandem::comm::spawn(2, [&](int rank, CommunicatorPtr inner) {
    CheckOptions o;
    o.stall_warn_s = 1;
    o.store_prefix = "job/other/";
    o.log = logs[rank].sink();
    auto c = tandem::comm::make_checked(inner, store, o);
    c->barrier();  // #1
    if (rank == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(4500));
      rank0_joins = Clock::now();
    }
    auto t = at::ones({10});
    c->broadcast(t, 1);  // #2
  }, gloo_opts());
  ASSERT_EQ(logs[0].lines.size(), 1u) << logs[0].text();
  const std::string& line = logs[0].lines[0].second;
  EXPECT_TRUE(contains(line, "stall: collective #2 broadcast(float32 x 10, root 1) has waited")) << line;
  EXPECT_TRUE(contains(line, "on rank 1; rank 0 has not reached it (last issued #1 barrier()")) << line;
  EXPECT_LT(logs[0].lines[0].first, rank0_joins) << "the stall was reported after it ended";
  EXPECT_TRUE(store->check({"job/other/rank0", "job/other/rank1"}));
}

// The watchdog ticks once a second but stops at once.
TEST(CheckedTest, DestructorReturnsPromptly) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  auto inner = tandem::comm::make_single();
  CheckOptions o;
  o.stall_warn_s = 5;
  auto c = tandem::comm::make_checked(inner, store, o);
  auto t = at::ones({2});
  c->all_reduce(t);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  auto t0 = Clock::now();
  c.reset();
  EXPECT_LT(tandem::seconds_since(t0), 0.5);
}

TEST(CheckedTest, InspectorWithoutStoreIsAUserError) {
  auto inner = tandem::comm::make_single();
  CheckOptions o;
  o.stall_warn_s = 60;
  EXPECT_TRUE(contains(error_of([&] { tandem::comm::make_checked(inner, {}, o); }), "needs the job's store"));
}

TEST(CheckedTest, LabelsNestAndUnwind) {
  EXPECT_EQ(OpLabel::current(), nullptr);
  {
    OpLabel outer("outer");
    EXPECT_EQ(*OpLabel::current(), "outer");
    {
      OpLabel inner("inner");
      EXPECT_EQ(*OpLabel::current(), "inner");
    }
    EXPECT_EQ(*OpLabel::current(), "outer");
    std::thread([] { EXPECT_EQ(OpLabel::current(), nullptr) << "labels are per thread"; }).join();
  }
  EXPECT_EQ(OpLabel::current(), nullptr);
}
