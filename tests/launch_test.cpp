// tandem launch: real processes, started, supervised and torn down.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tandem/launch/launcher.h"
#include "tandem/util/check.h"
#include "test_util.h"

namespace fs = std::filesystem;
using tandem::launch::LaunchOptions;

namespace {

using tandem::test::TempDir;

std::string slurp(const std::string& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::map<std::string, std::string> read_env(const std::string& p) {
  std::map<std::string, std::string> m;
  std::ifstream in(p);
  std::string line;
  while (std::getline(in, line)) {
    auto eq = line.find('=');
    if (eq != std::string::npos) m[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return m;
}

// Gone, or a zombie waiting for a parent that is not us (init may be slow).
bool process_gone(pid_t pid) {
  if (::kill(pid, 0) != 0) return errno == ESRCH;
  std::string stat = slurp("/proc/" + std::to_string(pid) + "/stat");
  auto close = stat.rfind(')');
  return close != std::string::npos && close + 2 < stat.size() && stat[close + 2] == 'Z';
}

std::vector<pid_t> read_pids(const std::string& dir, const std::string& prefix) {
  std::vector<pid_t> pids;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().rfind(prefix, 0) != 0) continue;
    std::ifstream in(e.path());
    pid_t p = 0;
    if (in >> p && p > 0) pids.push_back(p);
  }
  return pids;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

LaunchOptions sh(int nproc, const std::string& script, const std::string& out_dir) {
  LaunchOptions o;
  o.nproc_per_node = nproc;
  o.command = {"sh", "-c", script};
  o.extra_env["OUT"] = out_dir;
  return o;
}

// Runs a shell command line, returns (exit status, stdout+stderr).
std::pair<int, std::string> run_cli(const std::string& args) {
  std::string cmd = std::string(TANDEM_EXE) + " " + args + " 2>&1";
  FILE* f = ::popen(cmd.c_str(), "r");
  if (!f) return {-1, ""};
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  int st = ::pclose(f);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st), out};
}

}  // namespace

TEST(Launch, AllRanksSucceedWithTheirEnvironment) {
  TempDir t;
  auto o = sh(3,
              "env > \"$OUT/env.$RANK\"; "
              "stat -c %a \"$(dirname \"$TANDEM_STORE_PATH\")\" > \"$OUT/mode.$RANK\"",
              t.str());
  o.extra_env["TANDEM_TEST_EXTRA"] = "yes";
  std::ostringstream log;
  EXPECT_EQ(tandem::launch::launch(o, log), 0) << log.str();

  std::string store;
  for (int r = 0; r < 3; ++r) {
    auto env = read_env(t.str() + "/env." + std::to_string(r));
    ASSERT_FALSE(env.empty()) << "rank " << r << " wrote no environment";
    EXPECT_EQ(env["RANK"], std::to_string(r));
    EXPECT_EQ(env["LOCAL_RANK"], std::to_string(r));
    EXPECT_EQ(env["WORLD_SIZE"], "3");
    EXPECT_EQ(env["LOCAL_WORLD_SIZE"], "3");
    EXPECT_EQ(env["MASTER_ADDR"], "127.0.0.1");
    EXPECT_EQ(env["MASTER_PORT"], "29500");
    EXPECT_EQ(env["TANDEM_TEST_EXTRA"], "yes");
    ASSERT_FALSE(env["TANDEM_STORE_PATH"].empty());
    EXPECT_EQ(fs::path(env["TANDEM_STORE_PATH"]).filename(), "store");
    if (r == 0) store = env["TANDEM_STORE_PATH"];
    EXPECT_EQ(env["TANDEM_STORE_PATH"], store) << "all ranks share one store";
    // The private directory was 0700 while the job ran ...
    EXPECT_EQ(slurp(t.str() + "/mode." + std::to_string(r)), "700\n");
  }
  // ... and is gone now.
  EXPECT_FALSE(fs::exists(fs::path(store).parent_path())) << store;
}

TEST(Launch, MultiNodeRanksAndNoStorePath) {
  TempDir t;
  auto o = sh(2, "env > \"$OUT/env.$RANK\"", t.str());
  o.nnodes = 3;
  o.node_rank = 2;
  o.master_addr = "10.1.2.3";
  o.master_port = 1234;
  ::setenv("TANDEM_STORE_PATH", "/nonexistent/stale", 1);
  std::ostringstream log;
  int code = tandem::launch::launch(o, log);
  ::unsetenv("TANDEM_STORE_PATH");
  EXPECT_EQ(code, 0) << log.str();
  for (int l = 0; l < 2; ++l) {
    auto env = read_env(t.str() + "/env." + std::to_string(4 + l));
    ASSERT_FALSE(env.empty());
    EXPECT_EQ(env["RANK"], std::to_string(4 + l));
    EXPECT_EQ(env["LOCAL_RANK"], std::to_string(l));
    EXPECT_EQ(env["WORLD_SIZE"], "6");
    EXPECT_EQ(env["LOCAL_WORLD_SIZE"], "2");
    EXPECT_EQ(env["MASTER_ADDR"], "10.1.2.3");
    EXPECT_EQ(env["MASTER_PORT"], "1234");
    EXPECT_EQ(env.count("TANDEM_STORE_PATH"), 0u);
  }
}

TEST(Launch, FailingRankStopsTheOthersAndLeavesNoProcess) {
  TempDir t;
  // Ranks 0 and 2 sleep in a grandchild; rank 1 fails once they are all up.
  auto o = sh(3,
              "echo $$ > \"$OUT/pid.$RANK\"; "
              "if [ \"$RANK\" = 1 ]; then "
              "  i=0; while [ ! -s \"$OUT/gpid.0\" ] || [ ! -s \"$OUT/gpid.2\" ]; do "
              "    i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.05; done; "
              "  exit 3; "
              "fi; "
              "sleep 60 & echo $! > \"$OUT/gpid.$RANK\"; wait",
              t.str());
  std::ostringstream log;
  auto t0 = std::chrono::steady_clock::now();
  int code = tandem::launch::launch(o, log);
  double took = seconds_since(t0);
  EXPECT_EQ(code, 3) << log.str();
  EXPECT_LT(took, 10.0);
  EXPECT_NE(log.str().find("rank 1 (pid"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("exited with code 3"), std::string::npos) << log.str();

  auto pids = read_pids(t.str(), "pid.");
  auto gpids = read_pids(t.str(), "gpid.");
  EXPECT_EQ(pids.size(), 3u);
  EXPECT_EQ(gpids.size(), 2u);
  pids.insert(pids.end(), gpids.begin(), gpids.end());
  // Grandchildren were reparented to init; give it a moment to reap them.
  for (pid_t p : pids) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!process_gone(p) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_TRUE(process_gone(p)) << "pid " << p << " survived the launcher";
  }
}

TEST(Launch, RankIgnoringSigtermIsKilledAfterGrace) {
  TempDir t;
  auto o = sh(2,
              "if [ \"$RANK\" = 0 ]; then sleep 0.3; exit 7; fi; "
              "trap '' TERM; echo $$ > \"$OUT/pid.$RANK\"; sleep 60 & echo $! > \"$OUT/gpid.$RANK\"; wait; sleep 60",
              t.str());
  o.grace_seconds = 0.5;
  std::ostringstream log;
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(tandem::launch::launch(o, log), 7) << log.str();
  EXPECT_LT(seconds_since(t0), 10.0);
  EXPECT_NE(log.str().find("SIGKILL"), std::string::npos) << log.str();
  for (pid_t p : read_pids(t.str(), "")) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!process_gone(p) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_TRUE(process_gone(p)) << "pid " << p << " survived the launcher";
  }
}

TEST(Launch, RankKilledBySignalIsReported) {
  TempDir t;
  auto o = sh(2, "if [ \"$RANK\" = 1 ]; then kill -9 $$; fi; sleep 60", t.str());
  std::ostringstream log;
  EXPECT_EQ(tandem::launch::launch(o, log), 128 + SIGKILL) << log.str();
  EXPECT_NE(log.str().find("rank 1 (pid"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("was killed by signal SIGKILL"), std::string::npos) << log.str();
}

// --max-restarts: a rank killed on the first attempt restarts the whole
// group with a fresh store and job id and the attempt's index in
// TANDEM_RESTART_COUNT / TORCHELASTIC_RESTART_COUNT; the second attempt
// succeeds, so the job does. Without restarts left, the failure stands.
TEST(Launch, MaxRestartsStartsTheGroupAgain) {
  TempDir t;
  auto o = sh(2,
              "env > \"$OUT/env.$TANDEM_RESTART_COUNT.$RANK\"; "
              "if [ \"$TANDEM_RESTART_COUNT\" = 0 ] && [ \"$RANK\" = 1 ]; then kill -9 $$; fi; sleep 0.2",
              t.str());
  o.max_restarts = 2;
  std::ostringstream log;
  EXPECT_EQ(tandem::launch::launch(o, log), 0) << log.str();
  EXPECT_NE(log.str().find("restarting the group on a fresh rendezvous (restart 1 of 2"), std::string::npos)
      << log.str();
  EXPECT_NE(log.str().find("succeeded after 1 restart"), std::string::npos) << log.str();
  auto first = read_env(t.file("env.0.0")), second = read_env(t.file("env.1.0"));
  EXPECT_EQ(second["TORCHELASTIC_RESTART_COUNT"], "1");
  EXPECT_EQ(second["TORCHELASTIC_MAX_RESTARTS"], "2");
  EXPECT_NE(first["TANDEM_JOB_ID"], second["TANDEM_JOB_ID"]);
  EXPECT_NE(first["TANDEM_STORE_PATH"], second["TANDEM_STORE_PATH"]);
  EXPECT_FALSE(fs::exists(t.file("env.2.0")));  // no third attempt

  TempDir t2;
  auto always = sh(2, "if [ \"$RANK\" = 1 ]; then exit 5; fi; sleep 0.2", t2.str());
  always.max_restarts = 1;
  std::ostringstream log2;
  EXPECT_EQ(tandem::launch::launch(always, log2), 5) << log2.str();
  EXPECT_NE(log2.str().find("giving up after 1 restart (--max-restarts 1)"), std::string::npos) << log2.str();
}

TEST(Launch, SigtermToTheLauncherIsForwarded) {
  TempDir t;
  auto o = sh(2, "echo $$ > \"$OUT/pid.$RANK\"; sleep 60", t.str());
  std::ostringstream log;
  int code = -1;
  std::thread th([&] { code = tandem::launch::launch(o, log); });
  // Once both ranks are up, the launcher's handler is installed.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (read_pids(t.str(), "pid.").size() < 2 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_EQ(read_pids(t.str(), "pid.").size(), 2u);
  auto t0 = std::chrono::steady_clock::now();
  ::kill(::getpid(), SIGTERM);
  th.join();
  EXPECT_LT(seconds_since(t0), 10.0);
  EXPECT_EQ(code, 128 + SIGTERM) << log.str();
  EXPECT_NE(log.str().find("received SIGTERM"), std::string::npos) << log.str();
  for (pid_t p : read_pids(t.str(), "pid.")) EXPECT_TRUE(process_gone(p)) << p;
  // The handler was restored: the default action would kill us, so check it is not ours.
  struct sigaction now {};
  sigaction(SIGTERM, nullptr, &now);
  EXPECT_EQ(now.sa_handler, SIG_DFL);
}

TEST(Launch, PrivateDirectoryIsRemovedAfterFailure) {
  TempDir t;
  auto o = sh(2, "echo \"$TANDEM_STORE_PATH\" > \"$OUT/store.$RANK\"; touch \"$TANDEM_STORE_PATH\"; exit 1",
              t.str());
  std::ostringstream log;
  EXPECT_EQ(tandem::launch::launch(o, log), 1);
  std::string store = slurp(t.str() + "/store.0");
  ASSERT_FALSE(store.empty());
  store.pop_back();
  EXPECT_FALSE(fs::exists(fs::path(store).parent_path())) << store;
}

TEST(Launch, BadOptionsAreErrors) {
  auto expect_error = [](LaunchOptions o, const std::string& needle) {
    std::ostringstream log;
    try {
      tandem::launch::launch(o, log);
      ADD_FAILURE() << "no error; wanted: " << needle;
    } catch (const tandem::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  LaunchOptions ok;
  ok.command = {"true"};
  auto o = ok;
  o.nproc_per_node = 0;
  expect_error(o, "--nproc-per-node");
  o = ok;
  o.nnodes = 2;
  o.node_rank = 2;
  expect_error(o, "--node-rank");
  o = ok;
  o.node_rank = -1;
  expect_error(o, "--node-rank");
  o = ok;
  o.master_port = 0;
  expect_error(o, "--master-port");
  o = ok;
  o.master_port = 65536;
  expect_error(o, "--master-port");
  o = ok;
  o.max_restarts = -1;
  expect_error(o, "--max-restarts must be >= 0");
  o = ok;
  o.nnodes = 2;
  o.max_restarts = 1;
  expect_error(o, "--max-restarts restarts the ranks of one node");
  o = ok;
  o.command.clear();
  expect_error(o, "nothing to launch: give the command after --");
  o = ok;
  o.command = {"tandem-no-such-command-xyz"};
  expect_error(o, "command not found");
  o = ok;
  o.command = {"/nonexistent/prog"};
  expect_error(o, "/nonexistent/prog");
}

TEST(Launch, SelfExecutable) {
  std::string exe = tandem::launch::self_executable();
  EXPECT_TRUE(fs::path(exe).is_absolute());
  EXPECT_TRUE(fs::equivalent(exe, "/proc/self/exe"));
}

TEST(LaunchCli, PassesThroughTheExitCodeAndNamesTheRank) {
  auto [code, out] = run_cli("launch --nproc_per_node 2 -- sh -c 'if [ \"$RANK\" = 1 ]; then exit 5; fi; sleep 60'");
  EXPECT_EQ(code, 5) << out;
  EXPECT_NE(out.find("tandem launch: rank 1 (pid"), std::string::npos) << out;
  EXPECT_NE(out.find("exited with code 5"), std::string::npos) << out;
}

TEST(LaunchCli, SucceedsAndLeavesTheCommandsFlagsAlone) {
  auto [code, out] = run_cli(
      "launch --nproc-per-node 2 --master-port 29999 -- sh -c "
      "'echo \"rank=$RANK/$WORLD_SIZE port=$MASTER_PORT args=$*\"' x --nnodes 7 --help");
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("rank=0/2 port=29999 args=--nnodes 7 --help"), std::string::npos) << out;
  EXPECT_NE(out.find("rank=1/2 port=29999 args=--nnodes 7 --help"), std::string::npos) << out;
}

TEST(LaunchCli, ErrorsAndHelp) {
  auto [code, out] = run_cli("launch --nproc-per-node 2");
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("nothing to launch"), std::string::npos) << out;
  std::tie(code, out) = run_cli("launch --nproc-per-node 0 -- true");
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("--nproc-per-node"), std::string::npos) << out;
  std::tie(code, out) = run_cli("launch --help");
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("--nproc-per-node"), std::string::npos) << out;
  EXPECT_NE(out.find("--master-port"), std::string::npos) << out;
}
