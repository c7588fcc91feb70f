// tandem launch: fork one process per local rank, supervise, tear down on failure.
#include "tandem/launch/launcher.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iomanip>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>

#include "tandem/comm/env.h"
#include "tandem/util/check.h"

extern char** environ;

namespace tandem::launch {
namespace {

using Clock = std::chrono::steady_clock;

// ---- signals received by the launcher --------------------------------------

volatile std::sig_atomic_t g_received = 0;

extern "C" void on_launcher_signal(int sig) { g_received = sig; }

constexpr int kForwarded[] = {SIGINT, SIGTERM, SIGHUP};

// Installs the forwarding handlers (and SIGCHLD's default action, so that
// waitpid sees our children) for the lifetime of a launch; nested or
// concurrent launches share one installation.
class SignalScope {
 public:
  SignalScope() {
    std::lock_guard<std::mutex> lock(mu());
    if (depth()++ > 0) return;
    g_received = 0;
    struct sigaction sa {};
    sa.sa_handler = on_launcher_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: let the poll sleep end early
    for (size_t i = 0; i < std::size(kForwarded); ++i) sigaction(kForwarded[i], &sa, &saved()[i]);
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGCHLD, &dfl, &saved()[std::size(kForwarded)]);
  }
  ~SignalScope() {
    std::lock_guard<std::mutex> lock(mu());
    if (--depth() > 0) return;
    for (size_t i = 0; i < std::size(kForwarded); ++i) sigaction(kForwarded[i], &saved()[i], nullptr);
    sigaction(SIGCHLD, &saved()[std::size(kForwarded)], nullptr);
  }
  SignalScope(const SignalScope&) = delete;
  SignalScope& operator=(const SignalScope&) = delete;

 private:
  static std::mutex& mu() {
    static std::mutex m;
    return m;
  }
  static int& depth() {
    static int d = 0;
    return d;
  }
  static struct sigaction* saved() {
    static struct sigaction s[std::size(kForwarded) + 1];
    return s;
  }
};

// ---- the job's private directory --------------------------------------------

class PrivateDir {
 public:
  PrivateDir() {
    const char* tmp = std::getenv("TMPDIR");
    std::string base = (tmp && *tmp) ? tmp : "/tmp";
    std::string templ = base + "/tandem-launch-XXXXXX";
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    if (mkdtemp(buf.data()) == nullptr) {
      int err = errno;
      TANDEM_FAIL("tandem launch: cannot create a private directory under ", base, ": ",
                  std::strerror(err), " (point TMPDIR at a writable directory)");
    }
    path_ = buf.data();
    ::chmod(path_.c_str(), 0700);  // mkdtemp already uses 0700; be explicit
  }
  ~PrivateDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  PrivateDir(const PrivateDir&) = delete;
  PrivateDir& operator=(const PrivateDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// ---- helpers ------------------------------------------------------------------

bool is_executable_file(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(p.c_str(), X_OK) == 0;
}

// Resolves argv[0] the way execvp would, in the children's PATH.
std::string resolve_command(const std::string& cmd, const std::string& path_var) {
  if (cmd.find('/') != std::string::npos) {
    TANDEM_CHECK(is_executable_file(cmd), "tandem launch: cannot run '", cmd,
                 "': not an executable file");
    return cmd;
  }
  std::string path = path_var.empty() ? "/usr/local/bin:/usr/bin:/bin" : path_var;
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find(':', start);
    if (end == std::string::npos) end = path.size();
    std::string dir = path.substr(start, end - start);
    if (dir.empty()) dir = ".";
    std::string candidate = dir + "/" + cmd;
    if (is_executable_file(candidate)) return candidate;
    start = end + 1;
  }
  TANDEM_FAIL("tandem launch: command not found: '", cmd, "' (searched PATH=", path, ")");
}

struct Child {
  int rank = 0;
  int local_rank = 0;
  pid_t pid = -1;
  pid_t pgid = -1;  // == pid once the child is in its own group
  bool running = false;
};

// Signals the child's whole process group (grandchildren included); falls
// back to the child alone when the group is not set up.
void signal_child(const Child& c, int sig) {
  if (c.pgid > 0 && ::kill(-c.pgid, sig) == 0) return;
  if (c.running) ::kill(c.pid, sig);
}

bool group_exists(const Child& c) { return c.pgid > 0 && ::kill(-c.pgid, 0) == 0; }

void sleep_ms(int ms) {
  struct timespec ts {};
  ts.tv_sec = ms / 1000;
  ts.tv_nsec = static_cast<long>(ms % 1000) * 1000000L;
  ::nanosleep(&ts, nullptr);  // a signal may end it early: fine
}

std::string fmt_seconds(double s) {
  std::ostringstream os;
  os << std::setprecision(3) << s << " s";
  return os.str();
}

}  // namespace

std::string signal_name(int sig) {
  switch (sig) {
    case SIGHUP: return "SIGHUP";
    case SIGINT: return "SIGINT";
    case SIGQUIT: return "SIGQUIT";
    case SIGILL: return "SIGILL";
    case SIGTRAP: return "SIGTRAP";
    case SIGABRT: return "SIGABRT";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGKILL: return "SIGKILL";
    case SIGUSR1: return "SIGUSR1";
    case SIGSEGV: return "SIGSEGV";
    case SIGUSR2: return "SIGUSR2";
    case SIGPIPE: return "SIGPIPE";
    case SIGALRM: return "SIGALRM";
    case SIGTERM: return "SIGTERM";
    case SIGXCPU: return "SIGXCPU";
    case SIGXFSZ: return "SIGXFSZ";
    case SIGSYS: return "SIGSYS";
    default: return "signal " + std::to_string(sig);
  }
}

std::string self_executable() {
  std::vector<char> buf(256);
  for (;;) {
    ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size());
    if (n < 0) {
      int err = errno;
      TANDEM_FAIL("cannot find this program's path: readlink(/proc/self/exe): ", std::strerror(err));
    }
    if (static_cast<size_t>(n) < buf.size()) return std::string(buf.data(), static_cast<size_t>(n));
    buf.resize(buf.size() * 2);
  }
}

void validate(const LaunchOptions& o) {
  TANDEM_CHECK(o.nproc_per_node >= 1, "tandem launch: --nproc-per-node must be at least 1 (got ",
               o.nproc_per_node, ")");
  TANDEM_CHECK(o.nproc_per_node <= 4096, "tandem launch: --nproc-per-node ", o.nproc_per_node,
               " is more processes than tandem will start on one node (at most 4096)");
  TANDEM_CHECK(o.nnodes >= 1, "tandem launch: --nnodes must be at least 1 (got ", o.nnodes, ")");
  TANDEM_CHECK(o.node_rank >= 0 && o.node_rank < o.nnodes, "tandem launch: --node-rank must be in [0, ",
               o.nnodes, ") for --nnodes ", o.nnodes, " (got ", o.node_rank, ")");
  TANDEM_CHECK(static_cast<long long>(o.nnodes) * o.nproc_per_node <= 1000000,
               "tandem launch: world size --nnodes x --nproc-per-node is too large");
  TANDEM_CHECK(o.master_port >= 1 && o.master_port <= 65535,
               "tandem launch: --master-port must be in 1..65535 (got ", o.master_port, ")");
  TANDEM_CHECK(!o.master_addr.empty(), "tandem launch: --master-addr must not be empty");
  TANDEM_CHECK(o.grace_seconds >= 0 && o.grace_seconds <= 3600,
               "tandem launch: the grace period must be in [0, 3600] seconds (got ", o.grace_seconds, ")");
  TANDEM_CHECK(o.max_restarts >= 0, "tandem launch: --max-restarts must be >= 0 (got ", o.max_restarts, ")");
  TANDEM_CHECK(o.max_restarts == 0 || o.nnodes == 1,
               "tandem launch: --max-restarts restarts the ranks of one node; with --nnodes ", o.nnodes,
               " the nodes would restart apart. Run a single node, or restart the whole job from outside "
               "(e.g. srun --requeue) with --checkpoint-dir and --resume");
  TANDEM_CHECK(!o.command.empty() && !o.command[0].empty(),
               "nothing to launch: give the command after --, e.g. `tandem launch --nproc-per-node 2 -- ./train`");
  for (const auto& [k, v] : o.extra_env) {
    TANDEM_CHECK(!k.empty() && k.find('=') == std::string::npos,
                 "tandem launch: invalid environment variable name '", k, "'");
  }
}

// Removes what ranks of this job that were killed before they unlinked it
// left in /dev/shm (segments are named tandem-<job id>-...; see comm/shm.h).
class ShmSweep {
 public:
  ShmSweep() {
    std::random_device rd;
    char buf[32];
    std::snprintf(buf, sizeof buf, "%08x%04x", rd(), rd() & 0xffff);
    id_ = buf;
  }
  ~ShmSweep() {
    std::error_code ec;
    const std::string prefix = "tandem-" + id_ + "-";
    for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) {
      auto name = e.path().filename().string();
      if (name.rfind(prefix, 0) == 0) std::filesystem::remove(e.path(), ec);
    }
  }
  const std::string& id() const { return id_; }

 private:
  std::string id_;
};

namespace {

// How one attempt of the group ended.
struct Attempt {
  int exit_code = 0;
  bool rank_failed = false;  // a rank failed on its own (not our signal, not a start error): restartable
};

Attempt run_group(const LaunchOptions& o, int attempt, std::ostream& log) {
  ShmSweep shm_sweep;
  const int nproc = o.nproc_per_node;
  const int world = o.nnodes * nproc;

  std::unique_ptr<PrivateDir> dir;
  if (o.nnodes == 1) dir = std::make_unique<PrivateDir>();

  // The environment shared by all ranks: ours minus the variables we set.
  std::map<std::string, std::string> base;
  for (char** e = environ; e && *e; ++e) {
    const char* eq = std::strchr(*e, '=');
    if (!eq) continue;
    base[std::string(*e, static_cast<size_t>(eq - *e))] = std::string(eq + 1);
  }
  base.erase(env::kStorePath);  // a stale one would point the ranks elsewhere
  base[env::kWorldSize] = std::to_string(world);
  base[env::kLocalWorldSize] = std::to_string(nproc);
  base[env::kMasterAddr] = o.master_addr;
  base[env::kMasterPort] = std::to_string(o.master_port);
  if (dir) base[env::kStorePath] = dir->path() + "/store";
  base[env::kJobId] = shm_sweep.id();
  base[env::kRestartCount] = std::to_string(attempt);
  base[env::kTorchElasticRestartCount] = std::to_string(attempt);
  base[env::kTorchElasticMaxRestarts] = std::to_string(o.max_restarts);
  // Per-rank values below take precedence over extra_env only for these two.
  for (const auto& [k, v] : o.extra_env) base[k] = v;

  const std::string exe = resolve_command(o.command[0], base.count("PATH") ? base["PATH"] : "");

  // argv and envp are built before fork: the child only calls async-signal-safe functions.
  std::vector<char*> argv;
  for (const auto& a : o.command) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<std::vector<std::string>> envs(nproc);
  std::vector<std::vector<char*>> envps(nproc);
  for (int l = 0; l < nproc; ++l) {
    auto m = base;
    m[env::kRank] = std::to_string(o.node_rank * nproc + l);
    m[env::kLocalRank] = std::to_string(l);
    for (const auto& [k, v] : m) envs[l].push_back(k + "=" + v);
    for (auto& s : envs[l]) envps[l].push_back(s.data());
    envps[l].push_back(nullptr);
  }

  std::vector<Child> children(nproc);
  int running = 0;
  int exit_code = 0;
  bool rank_failed = false;
  bool stopping = false, killed = false;
  Clock::time_point kill_at{}, give_up_at{};
  const auto grace = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.grace_seconds));

  auto begin_stop = [&](int sig, const std::string& why) {
    stopping = true;
    if (running > 0) {
      log << "tandem launch: " << why << "; stopping the " << running << " running rank"
          << (running == 1 ? "" : "s") << " (" << signal_name(sig) << ", then SIGKILL after "
          << fmt_seconds(o.grace_seconds) << ")" << std::endl;
    }
    for (const auto& c : children) signal_child(c, sig);
    kill_at = Clock::now() + grace;
    give_up_at = kill_at + std::chrono::seconds(10);
  };

  // Ranks run in their own process groups, i.e. in the background as far as a
  // terminal is concerned: reading it would stop them (SIGTTIN). Give them
  // /dev/null instead when stdin is a terminal.
  int null_fd = -1;
  if (::isatty(STDIN_FILENO)) null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  struct FdCloser {
    int& fd;
    ~FdCloser() {
      if (fd >= 0) ::close(fd);
    }
  } close_null{null_fd};

  // Start the ranks.
  std::string start_error;
  sigset_t all, old;
  sigfillset(&all);
  for (int l = 0; l < nproc; ++l) {
    Child& c = children[l];
    c.rank = o.node_rank * nproc + l;
    c.local_rank = l;
    // Block signals across fork so the child cannot run our handler before it resets it.
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid = ::fork();
    if (pid == 0) {
      ::setpgid(0, 0);
      if (null_fd >= 0) ::dup2(null_fd, STDIN_FILENO);  // dup2 clears O_CLOEXEC on the copy
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      sigemptyset(&dfl.sa_mask);
      for (int s : {SIGINT, SIGTERM, SIGHUP, SIGCHLD, SIGPIPE, SIGQUIT}) sigaction(s, &dfl, nullptr);
      sigset_t none;
      sigemptyset(&none);
      pthread_sigmask(SIG_SETMASK, &none, nullptr);
      ::execve(exe.c_str(), argv.data(), envps[l].data());
      const char msg[] = "tandem launch: exec failed for the rank's command\n";
      ssize_t ignored = ::write(STDERR_FILENO, msg, sizeof msg - 1);
      (void)ignored;
      ::_exit(127);
    }
    int fork_errno = errno;
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    if (pid < 0) {
      start_error = std::string("cannot start rank ") + std::to_string(c.rank) + ": fork: " + std::strerror(fork_errno);
      break;
    }
    c.pid = pid;
    c.running = true;
    ++running;
    // Also from the parent, so that the group exists before we may signal it
    // (EACCES: the child has exec'd, having done it itself).
    ::setpgid(pid, pid);
    c.pgid = pid;
  }
  if (!start_error.empty()) begin_stop(SIGTERM, start_error);

  // Supervise.
  while (running > 0) {
    for (auto& c : children) {
      if (!c.running) continue;
      int st = 0;
      pid_t r = ::waitpid(c.pid, &st, WNOHANG);
      if (r == 0) continue;
      if (r < 0 && errno == EINTR) continue;
      c.running = false;
      --running;
      if (r < 0) {  // ECHILD: somebody else reaped it; nothing to report
        continue;
      }
      int code = 0;
      std::string what;
      if (WIFEXITED(st)) {
        code = WEXITSTATUS(st);
        what = "exited with code " + std::to_string(code);
      } else if (WIFSIGNALED(st)) {
        code = 128 + WTERMSIG(st);
        what = "was killed by signal " + signal_name(WTERMSIG(st));
      }
      if (code != 0 && !stopping) {
        log << "tandem launch: rank " << c.rank << " (pid " << c.pid << ") " << what << std::endl;
        exit_code = code;
        rank_failed = true;
        begin_stop(SIGTERM, "rank " + std::to_string(c.rank) + " failed");
      }
    }
    if (running == 0) break;
    if (!stopping && g_received != 0) {
      int sig = g_received;
      exit_code = 128 + sig;
      rank_failed = false;
      begin_stop(sig, "received " + signal_name(sig));
    }
    if (stopping && !killed && Clock::now() >= kill_at) {
      log << "tandem launch: " << running << " rank" << (running == 1 ? "" : "s") << " still running after "
          << fmt_seconds(o.grace_seconds) << "; sending SIGKILL" << std::endl;
      for (const auto& c : children) signal_child(c, SIGKILL);
      killed = true;
    }
    if (killed && Clock::now() >= give_up_at) {
      for (const auto& c : children)
        if (c.running)
          log << "tandem launch: rank " << c.rank << " (pid " << c.pid << ") did not exit after SIGKILL; giving up on it"
              << std::endl;
      rank_failed = false;  // a rank that cannot be stopped must not meet a restarted group
      break;
    }
    sleep_ms(50);
  }

  // No orphans: whatever is left in the ranks' process groups (background
  // grandchildren) goes too. After a failure it already had its SIGTERM.
  if (stopping) {
    for (const auto& c : children) signal_child(c, SIGKILL);
  } else {
    bool any = false;
    for (const auto& c : children)
      if (group_exists(c)) {
        ::kill(-c.pgid, SIGTERM);
        any = true;
      }
    if (any) {
      auto deadline = Clock::now() + grace;
      for (;;) {
        bool left = false;
        for (const auto& c : children) left = left || group_exists(c);
        if (!left || Clock::now() >= deadline) break;
        sleep_ms(50);
      }
      for (const auto& c : children)
        if (c.pgid > 0) ::kill(-c.pgid, SIGKILL);
    }
  }

  if (!start_error.empty()) TANDEM_FAIL("tandem launch: ", start_error);
  // A signal that reached us while the group was stopping ends the job too.
  return {exit_code, rank_failed && g_received == 0};
}

}  // namespace

int launch(const LaunchOptions& o, std::ostream& log) {
  validate(o);
  SignalScope signals;
  for (int attempt = 0;; ++attempt) {
    const auto t0 = Clock::now();
    Attempt a = run_group(o, attempt, log);
    if (a.exit_code == 0) {
      if (attempt > 0)
        log << "tandem launch: the job succeeded after " << attempt << " restart" << (attempt == 1 ? "" : "s")
            << std::endl;
      return 0;
    }
    if (!a.rank_failed || attempt >= o.max_restarts || g_received != 0) {
      if (a.rank_failed && o.max_restarts > 0)
        log << "tandem launch: giving up after " << attempt << " restart" << (attempt == 1 ? "" : "s")
            << " (--max-restarts " << o.max_restarts << ")" << std::endl;
      return a.exit_code;
    }
    log << "tandem launch: restarting the group on a fresh rendezvous (restart " << attempt + 1 << " of "
        << o.max_restarts << ", the attempt ran " << fmt_seconds(std::chrono::duration<double>(Clock::now() - t0).count())
        << ")" << std::endl;
  }
}

}  // namespace tandem::launch
