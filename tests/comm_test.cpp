// Communicator: collectives and point-to-point over gloo, shm and hybrid,
// ranks as threads; failure detection with ranks as real processes; the
// choice of NCCL, and NCCL's world of one where a GPU is present.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/cuda.h>

#include "tandem/comm/communicator.h"
#include "tandem/comm/rendezvous.h"
#include "tandem/comm/shm.h"
#include "tandem/util/check.h"
#include "test_util.h"

using tandem::comm::CommunicatorPtr;
using tandem::comm::ReduceOp;

namespace {

// Every rank ends with the same bits.
void expect_identical_across_ranks(const CommunicatorPtr& c, const at::Tensor& t) {
  auto mine = t.to(at::kDouble).view({-1});
  auto all = at::zeros({c->size(), mine.numel()}, at::kDouble);
  c->all_gather(all, mine);
  for (int r = 0; r < c->size(); ++r) ASSERT_TRUE(torch::equal(all[r], mine)) << "rank " << r << " differs";
}

}  // namespace

// backend x world x element count.
class CommTest : public ::testing::TestWithParam<std::tuple<std::string, int, int64_t>> {};

TEST_P(CommTest, AllReduceSumsAcrossRanks) {
  auto [backend, world, count] = GetParam();
  tandem::comm::spawn(world, [&](int rank, CommunicatorPtr c) {
    auto t = torch::arange(count, torch::kFloat32) + rank;
    c->all_reduce(t);
    // sum_r (i + r) = world*i + world*(world-1)/2
    auto want = torch::arange(count, torch::kFloat32) * world + world * (world - 1) / 2.0;
    ASSERT_TRUE(torch::allclose(t, want)) << "rank " << rank;
  }, {}, backend);
}

TEST_P(CommTest, AsyncAllReducesInFlightAreBitIdentical) {
  auto [backend, world, count] = GetParam();
  tandem::comm::spawn(world, [&](int rank, CommunicatorPtr c) {
    torch::manual_seed(rank);
    std::vector<at::Tensor> ts;
    std::vector<at::Tensor> want;
    std::vector<tandem::comm::RequestPtr> reqs;
    for (int i = 0; i < 3; ++i) ts.push_back(torch::randn({count + i}));
    for (auto& t : ts) reqs.push_back(c->all_reduce_async(t));
    for (auto& r : reqs) r->wait(c->timeout());
    for (auto& t : ts) expect_identical_across_ranks(c, t);
  }, {}, backend);
}

TEST_P(CommTest, BroadcastCopiesRoot) {
  auto [backend, world, count] = GetParam();
  const int root = world - 1;
  tandem::comm::spawn(world, [&](int rank, CommunicatorPtr c) {
    auto t = rank == root ? torch::arange(count, torch::kFloat64) * 3 : torch::full({count}, -1.0, torch::kFloat64);
    c->broadcast(t, root);
    ASSERT_TRUE(torch::equal(t, torch::arange(count, torch::kFloat64) * 3)) << "rank " << rank;
  }, {}, backend);
}

TEST_P(CommTest, AllGatherPlacesEveryRank) {
  auto [backend, world, count] = GetParam();
  tandem::comm::spawn(world, [&](int rank, CommunicatorPtr c) {
    auto in = torch::arange(count, torch::kInt64) + rank * 1000;
    auto out = torch::full({world * count}, -1, torch::kInt64);
    c->all_gather(out, in);
    for (int r = 0; r < world; ++r)
      ASSERT_TRUE(torch::equal(out.narrow(0, r * count, count), torch::arange(count, torch::kInt64) + r * 1000))
          << "rank " << rank << " slot " << r;
  }, {}, backend);
}

class P2PTest : public CommTest {};

TEST_P(P2PTest, SendRecvAroundTheRing) {
  auto [backend, world, count] = GetParam();
  tandem::comm::spawn(world, [&](int rank, CommunicatorPtr c) {
    auto out = torch::full({count}, static_cast<float>(rank), torch::kFloat32);
    auto in = torch::empty({count}, torch::kFloat32);
    int right = (rank + 1) % world, left = (rank + world - 1) % world;
    auto s = c->send_async(out, right, 7);
    auto r = c->recv_async(in, left, 7);
    s->wait(c->timeout());
    r->wait(c->timeout());
    ASSERT_TRUE(torch::equal(in, torch::full({count}, static_cast<float>(left)))) << "rank " << rank;
  }, {}, backend);
}

std::string name_of(const ::testing::TestParamInfo<std::tuple<std::string, int, int64_t>>& i) {
  return std::get<0>(i.param) + "_w" + std::to_string(std::get<1>(i.param)) + "_n" +
         std::to_string(std::get<2>(i.param));
}

const auto kCounts = ::testing::Values<int64_t>(0, 1, 7, 1000, (1 << 20) + 3);

INSTANTIATE_TEST_SUITE_P(Gloo, CommTest, ::testing::Combine(::testing::Values("gloo"), ::testing::Values(1, 2, 3, 4), kCounts),
                         name_of);
INSTANTIATE_TEST_SUITE_P(Shm, CommTest,
                         ::testing::Combine(::testing::Values("shm"), ::testing::Values(1, 2, 3, 4, 5, 8), kCounts),
                         name_of);
INSTANTIATE_TEST_SUITE_P(Hybrid, CommTest, ::testing::Combine(::testing::Values("hybrid"), ::testing::Values(2, 3, 4), kCounts),
                         name_of);
INSTANTIATE_TEST_SUITE_P(All, P2PTest,
                         ::testing::Combine(::testing::Values("gloo", "shm", "hybrid"), ::testing::Values(2, 3, 4),
                                            kCounts),
                         name_of);

class BackendTest : public ::testing::TestWithParam<std::string> {};

TEST_P(BackendTest, ReduceToRoot) {
  tandem::comm::spawn(3, [&](int rank, CommunicatorPtr c) {
    auto t = torch::full({5}, static_cast<float>(rank + 1));
    c->reduce(t, 1);
    if (rank == 1) {
      ASSERT_TRUE(torch::equal(t, torch::full({5}, 6.0f)));
    }
  }, {}, GetParam());
}

TEST_P(BackendTest, RecvAnyReportsSource) {
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
  }, {}, GetParam());
}

TEST_P(BackendTest, MaxMinAndEveryFloatType) {
  tandem::comm::spawn(4, [&](int rank, CommunicatorPtr c) {
    for (auto type : {torch::kFloat32, torch::kFloat64, torch::kFloat16, torch::kBFloat16}) {
      // Gloo in LibTorch 1.13 has no bfloat16 ("Invalid scalar type"); hybrid
      // reduces across hosts with Gloo.
      if (type == torch::kBFloat16 && GetParam() != "shm") continue;
      // Small integers: exact in every type, so the sum is exact.
      auto base = torch::arange(3001, torch::kFloat32).remainder(13);
      auto t = (base + rank).to(type);
      c->all_reduce(t);
      ASSERT_TRUE(torch::equal(t, (base * 4 + 6).to(type))) << c10::toString(type) << " sum";
      auto mx = (base * (rank % 2 ? -1 : 1) + rank).to(type);
      c->all_reduce(mx, ReduceOp::kMax);
      ASSERT_TRUE(torch::equal(mx, torch::max(base + 2, -base + 3).to(type))) << c10::toString(type) << " max";
      auto mn = (base + rank).to(type);
      c->all_reduce(mn, ReduceOp::kMin);
      ASSERT_TRUE(torch::equal(mn, base.to(type))) << c10::toString(type) << " min";
    }
    // Sums of non-integers in float16: bit-identical on every rank.
    auto h = torch::full({100}, 0.1, torch::kFloat16);
    c->all_reduce(h);
    expect_identical_across_ranks(c, h);
    EXPECT_NEAR(h[0].item<float>(), 0.4, 1e-3);
  }, {}, GetParam());
}

TEST_P(BackendTest, BarrierAndManyTagsInAnyOrder) {
  // Messages larger than a p2p ring, received in the opposite order of their
  // sending, both directions at once: needs the progress engine to hold
  // unexpected messages and to interleave sends and receives.
  tandem::comm::spawn(2, [&](int rank, CommunicatorPtr c) {
    c->barrier();
    const int64_t n = (1 << 18) + 5;  // 1 MiB + 20 bytes of float
    const int peer = 1 - rank;
    std::vector<at::Tensor> out, in;
    std::vector<tandem::comm::RequestPtr> reqs;
    for (int tag = 0; tag < 3; ++tag) {
      out.push_back(torch::full({n}, static_cast<float>(rank * 10 + tag)));
      reqs.push_back(c->send_async(out.back(), peer, tag));
    }
    for (int tag = 2; tag >= 0; --tag) {
      in.push_back(torch::empty({n}));
      reqs.push_back(c->recv_async(in.back(), peer, tag));
    }
    for (auto& r : reqs) r->wait(c->timeout());
    for (int i = 0; i < 3; ++i)
      ASSERT_TRUE(torch::equal(in[i], torch::full({n}, static_cast<float>(peer * 10 + 2 - i)))) << "tag " << 2 - i;
    c->barrier();
  }, {}, GetParam());
}

TEST_P(BackendTest, SameTagMessagesArriveInSendingOrder) {
  // One tag, one direction, through every send path of the shm engine: small
  // messages into an empty ring (written whole by the posting thread), one
  // larger than a ring (streamed by the engine), small ones posted behind it
  // (queued, though they would fit), more than the ring holds while no
  // receive is posted; then, with the receives posted first so the ring
  // drains while the sender posts, a long mixed sequence in which queued and
  // eager sends hand over again and again. Each receive must get the message
  // sent in its place (MPI's non-overtaking rule), whichever thread wrote it.
  const int64_t big = (1 << 18) + 3;  // floats: 1 MiB, more than a 256 KiB ring
  const std::vector<int64_t> first = {1, 1000, 7, 0, big, 3, 16000, 16000, 16000, 16000, 16000, 2};
  std::vector<int64_t> second;
  for (int i = 0; i < 120; ++i) second.push_back(i % 9 == 4 ? big / 3 + i : (i * 37) % 2000);
  tandem::comm::spawn(2, [&](int rank, CommunicatorPtr c) {
    auto value = [](int phase, size_t i) { return static_cast<float>(phase * 1000 + static_cast<int>(i) + 1); };
    for (int phase = 0; phase < 2; ++phase) {
      const auto& sizes = phase == 0 ? first : second;
      std::vector<at::Tensor> bufs;
      std::vector<tandem::comm::RequestPtr> reqs;
      const bool recv_first = phase == 1;
      auto post_recvs = [&] {
        for (size_t i = 0; i < sizes.size(); ++i) {
          bufs.push_back(torch::empty({sizes[i]}));
          reqs.push_back(c->recv_async(bufs.back(), 0, 5));
        }
      };
      if (rank == 1 && recv_first) post_recvs();
      c->barrier();
      if (rank == 0) {
        for (size_t i = 0; i < sizes.size(); ++i) {
          bufs.push_back(torch::full({sizes[i]}, value(phase, i)));
          reqs.push_back(c->send_async(bufs.back(), 1, 5));
        }
      }
      if (phase == 0) c->barrier();  // every send is posted before any receive
      if (rank == 1 && !recv_first) post_recvs();
      for (auto& r : reqs) r->wait(c->timeout());
      if (rank != 1) continue;
      for (size_t i = 0; i < sizes.size(); ++i)
        ASSERT_TRUE(torch::equal(bufs[i], torch::full({sizes[i]}, value(phase, i))))
            << "phase " << phase << " message " << i;
    }
  }, {}, GetParam());
}

INSTANTIATE_TEST_SUITE_P(All, BackendTest, ::testing::Values("gloo", "shm", "hybrid"));

TEST(Comm, SingleRankHasNoPeers) {
  auto c = tandem::comm::make_single();
  auto t = torch::ones({3});
  c->all_reduce(t);
  EXPECT_TRUE(torch::equal(t, torch::ones({3})));
  EXPECT_THROW(c->send(t, 1, 0), tandem::Error);
}

TEST(Comm, ChooseCommByHosts) {
  using tandem::comm::choose_comm;
  EXPECT_EQ(choose_comm("auto", {"a", "a"}), "shm");
  EXPECT_EQ(choose_comm("auto", {"a", "a", "b", "b"}), "hybrid");
  EXPECT_EQ(choose_comm("auto", {"a", "b"}), "gloo");
  EXPECT_EQ(choose_comm("gloo", {"a", "a"}), "gloo");
  EXPECT_EQ(choose_comm("hybrid", {"a", "a"}), "hybrid");
  auto e = tandem::test::error_of([] { choose_comm("shm", {"a", "b"}); });
  EXPECT_NE(e.find("--comm shm needs every rank on one host"), std::string::npos) << e;
  e = tandem::test::error_of([] { choose_comm("tcp", {"a"}); });
  EXPECT_NE(e.find("accepted: auto, gloo, shm, hybrid"), std::string::npos) << e;
}

// auto picks NCCL only for models each on a GPU of its own, and only in a
// build with NCCL; CPU models keep the host-based choice (ChooseCommByHosts).
TEST(Comm, ChooseCommNcclForGpuModels) {
  using tandem::comm::choose_comm;
  using tandem::comm::GpuLayout;
  const bool nccl = tandem::comm::nccl_available();
  std::string why;
  EXPECT_EQ(choose_comm("auto", {"a", "a"}, &why, GpuLayout{2, 2}), nccl ? "nccl" : "shm") << why;
  EXPECT_NE(why.find(nccl ? "a GPU per rank, NCCL" : "CUDA model, not NCCL: this build has none"), std::string::npos)
      << why;
  EXPECT_EQ(choose_comm("auto", {"a", "b"}, &why, GpuLayout{2, 2}), nccl ? "nccl" : "gloo") << why;
  // Two ranks on one GPU: NCCL refuses that, so auto does not pick it.
  EXPECT_EQ(choose_comm("auto", {"a", "a"}, &why, GpuLayout{2, 1}), "shm") << why;
  EXPECT_NE(why.find(nccl ? "2 ranks share 1 GPU" : "this build has none"), std::string::npos) << why;
  // Some ranks on the CPU: not a CUDA model.
  EXPECT_EQ(choose_comm("auto", {"a", "a"}, &why, GpuLayout{1, 1}), "shm") << why;
  EXPECT_EQ(why.find("CUDA"), std::string::npos) << why;
  if (!nccl) {
    auto e = tandem::test::error_of([] { choose_comm("nccl", {"a"}, nullptr, GpuLayout{1, 1}); });
    EXPECT_NE(e.find("--comm nccl: this build of tandem has no NCCL"), std::string::npos) << e;
    EXPECT_NE(e.find("use --comm gloo or auto"), std::string::npos) << e;
    EXPECT_THROW(tandem::comm::validate_comm("nccl"), tandem::Error);
  } else {
    EXPECT_EQ(choose_comm("nccl", {"a", "b"}, nullptr, GpuLayout{2, 2}), "nccl");
    auto e = tandem::test::error_of([] { choose_comm("nccl", {"a", "a"}, nullptr, GpuLayout{}); });
    EXPECT_NE(e.find("the model is not on a GPU"), std::string::npos) << e;
    e = tandem::test::error_of([] { choose_comm("nccl", {"a", "a"}, nullptr, GpuLayout{2, 1}); });
    EXPECT_NE(e.find("needs a GPU per rank"), std::string::npos) << e;
  }
  auto e = tandem::test::error_of([] { choose_comm("tcp", {"a"}); });
  EXPECT_NE(e.find("accepted: auto, gloo, shm, hybrid, nccl"), std::string::npos) << e;
}

TEST(Comm, NcclWithoutNcclSaysUseGloo) {
  if (tandem::comm::nccl_available()) GTEST_SKIP() << "this build has NCCL";
  auto e = tandem::test::error_of(
      [] { tandem::comm::make_nccl(c10::make_intrusive<c10d::HashStore>(), 0, 1); });
  EXPECT_NE(e.find("this LibTorch has no NCCL"), std::string::npos) << e;
  EXPECT_NE(e.find("use --comm gloo"), std::string::npos) << e;
  tandem::comm::RendezvousOptions ro;
  ro.rank = 0;
  ro.world_size = 1;
  ro.comm = "nccl";
  e = tandem::test::error_of([&] { tandem::comm::init_from_env(ro); });
  EXPECT_NE(e.find("--comm nccl: this build of tandem has no NCCL"), std::string::npos) << e;
}

// A world of one over NCCL on one GPU: all that a one-GPU machine can run.
TEST(Nccl, WorldOfOneOnOneGpu) {
  if (!tandem::comm::nccl_available()) GTEST_SKIP() << "this build has no NCCL";
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  tandem::comm::NcclOptions o;
  o.device = 0;
  o.timeout = std::chrono::milliseconds(60000);
  auto c = tandem::comm::make_nccl(c10::make_intrusive<c10d::HashStore>(), 0, 1, o);
  EXPECT_EQ(c->backend(), "nccl");
  const auto cuda = torch::TensorOptions().device(torch::kCUDA, 0);
  auto g = torch::arange(1000, cuda.dtype(torch::kFloat32));
  auto r = c->all_reduce_async(g);
  std::thread([&] { r->wait(c->timeout()); }).join();  // waited from another thread, read on this one
  EXPECT_TRUE(torch::equal(g.cpu(), torch::arange(1000, torch::kFloat32)));
  auto h = torch::tensor({3.0, -1.0}, torch::kFloat64);  // CPU: through the GPU and back
  c->all_reduce(h, ReduceOp::kMax);
  EXPECT_TRUE(torch::equal(h, torch::tensor({3.0, -1.0}, torch::kFloat64)));
  c->broadcast(h, 0);
  auto out = torch::zeros({2}, torch::kFloat64);
  c->all_gather(out, h);
  EXPECT_TRUE(torch::equal(out, h));
  auto gout = torch::zeros({1000}, cuda.dtype(torch::kFloat32));
  c->all_gather(gout, g);
  EXPECT_TRUE(torch::equal(gout, g));
  c->reduce(g, 0);
  c->barrier();
  auto e = tandem::test::error_of([&] { c->recv_any(h, 0); });
  EXPECT_NE(e.find("NCCL cannot receive from any rank"), std::string::npos) << e;
  EXPECT_EQ(c->sub_group({0}, "one")->size(), 1);
  if (torch::cuda::device_count() > 1) {
    auto other = torch::ones({2}, torch::TensorOptions().device(torch::kCUDA, 1));
    e = tandem::test::error_of([&] { c->all_reduce(other); });
    EXPECT_NE(e.find("takes CUDA tensors on this group's GPU (cuda:0)"), std::string::npos) << e;
  }
}

TEST(Comm, ShmRefusesUnsupportedTypesAndDevices) {
  tandem::comm::spawn(2, [&](int rank, CommunicatorPtr c) {
    auto b = torch::ones({4}, torch::kBool);
    auto e = tandem::test::error_of([&] { c->all_reduce(b); });
    EXPECT_NE(e.find("is not supported"), std::string::npos) << e;
    c->broadcast(b, 0);  // any type can be copied
  }, {}, "shm");
}

// ---- ranks as real processes ---------------------------------------------

namespace {

struct Proc {
  pid_t pid = -1;
  std::string log;
};

// Starts `tandem bench comm` as rank `rank` of `world` meeting in `store`.
Proc start_rank(int rank, int world, const std::string& store, const std::string& job, const std::string& log,
                const std::string& args) {
  Proc p;
  p.log = log;
  p.pid = ::fork();
  if (p.pid == 0) {
    ::setenv("RANK", std::to_string(rank).c_str(), 1);
    ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
    ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
    ::setenv("LOCAL_WORLD_SIZE", std::to_string(world).c_str(), 1);
    ::setenv("TANDEM_STORE_PATH", store.c_str(), 1);
    ::setenv("TANDEM_JOB_ID", job.c_str(), 1);
    std::string cmd = "exec " + std::string(TANDEM_EXE) + " bench comm " + args + " > " + log + " 2>&1";
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return p;
}

// Exit code (128+signal when signalled), or -1 when still running after `secs`.
int wait_exit(pid_t pid, double secs) {
  auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(secs);
  for (;;) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid)
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (std::chrono::steady_clock::now() > until) return -1;
    ::usleep(20000);
  }
}

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

int shm_files_of(const std::string& job) {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/dev/shm"))
    if (e.path().filename().string().rfind("tandem-" + job, 0) == 0) ++n;
  return n;
}

std::string unique_job(const char* what) { return std::string(what) + std::to_string(::getpid()); }

}  // namespace

class ShmFault : public ::testing::TestWithParam<int> {};

// SIGKILL (9) or SIGSTOP (19) one of three ranks in the middle of large
// all-reduces: the others throw CommError naming it, within the timeout, and
// nothing of the job is left in /dev/shm.
TEST_P(ShmFault, SurvivorsNameTheFailedRank) {
  const int sig = GetParam();
  tandem::test::TempDir dir;
  const std::string job = unique_job(sig == SIGKILL ? "kill" : "stop");
  const double timeout = sig == SIGKILL ? 60 : 4;
  const std::string args = "--comm shm --algos native --min-bytes 32M --max-bytes 32M --warmup 0 --iters 100000 --timeout " +
                           std::to_string(timeout);
  std::vector<Proc> ranks;
  for (int r = 0; r < 3; ++r)
    ranks.push_back(start_rank(r, 3, dir.file("store"), job, dir.file("rank" + std::to_string(r) + ".log"), args));
  // Well into the timed iterations: rank 0 names the communicator once every
  // rank has joined; then give the segment and the first operations a second.
  for (int i = 0; i < 600 && slurp(ranks[0].log).find("communicator shm") == std::string::npos; ++i) ::usleep(100000);
  ::sleep(2);
  ASSERT_EQ(wait_exit(ranks[1].pid, 0), -1) << slurp(ranks[1].log);
  auto t0 = std::chrono::steady_clock::now();
  ::kill(ranks[1].pid, sig);
  for (int r : {0, 2}) {
    int code = wait_exit(ranks[r].pid, timeout + 10);
    double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::string log = slurp(ranks[r].log);
    if (code == -1) ::kill(ranks[r].pid, SIGKILL), wait_exit(ranks[r].pid, 5);
    ASSERT_NE(code, -1) << "rank " << r << " still running after " << took << " s:\n" << log;
    EXPECT_NE(code, 0) << log;
    EXPECT_NE(log.find("rank 1 (pid " + std::to_string(ranks[1].pid) + ")"), std::string::npos) << log;
    EXPECT_NE(log.find(sig == SIGKILL ? "exited or was killed" : "is stopped"), std::string::npos) << log;
    EXPECT_LT(took, timeout + 5) << log;
  }
  ::kill(ranks[1].pid, SIGKILL);
  wait_exit(ranks[1].pid, 5);
  EXPECT_EQ(shm_files_of(job), 0);
}

INSTANTIATE_TEST_SUITE_P(Signals, ShmFault, ::testing::Values(SIGKILL, SIGSTOP));

TEST(ShmProcesses, TwoJobsAtOnceDoNotMeet) {
  tandem::test::TempDir dir;
  const std::string job = unique_job("two");
  std::vector<Proc> ranks;
  for (int j = 0; j < 2; ++j)
    for (int r = 0; r < 2; ++r)
      ranks.push_back(start_rank(r, 2, dir.file("store" + std::to_string(j)), job,
                                 dir.file("j" + std::to_string(j) + "r" + std::to_string(r) + ".log"),
                                 "--comm shm --algos native,ring --min-bytes 4K --max-bytes 4M --iters 20"));
  for (auto& p : ranks) {
    int code = wait_exit(p.pid, 120);
    EXPECT_EQ(code, 0) << slurp(p.log);
  }
  EXPECT_NE(slurp(ranks[0].log).find("shm"), std::string::npos);
  EXPECT_EQ(shm_files_of(job), 0);
}
