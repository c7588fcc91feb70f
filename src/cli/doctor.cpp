// `tandem doctor`: the seeds' validation tool. Checks, step by step with a
// pass/fail mark and the reason, that this machine can run the requested
// configuration. Exit code 0 only if every check passes.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>

#include <torch/cuda.h>
#include <torch/torch.h>
#include <torch/version.h>

#include "commands.h"
#include "tandem/comm/env.h"
#include "tandem/comm/rendezvous.h"
#include "tandem/data/idx.h"
#include "tandem/data/loader.h"
#include "tandem/device/device.h"
#include "tandem/device/policy.h"
#include "tandem/models/models.h"
#include "tandem/util/check.h"
#include "tandem/util/clock.h"
#include "train_options.h"

namespace tandem::cli {
namespace {

struct Doctor {
  int failed = 0;
  void mark(const char* status, const std::string& what, const std::string& why) {
    std::printf("  [%s] %-34s %s\n", status, what.c_str(), why.c_str());
    std::fflush(stdout);
  }
  template <typename F>
  void check(const std::string& what, F&& fn) {
    try {
      std::string detail = fn();
      mark("PASS", what, detail);
    } catch (const std::exception& e) {
      ++failed;
      mark("FAIL", what, e.what());
    }
  }
  void not_available(const std::string& what, const std::string& why) { mark("n/a ", what, why); }
  // Works, but slower than it should: reported, does not fail the run.
  void warn(const std::string& what, const std::string& why) { mark("WARN", what, why); }
};

std::string fmt(const char* f, double a, double b = 0) {
  char buf[200];
  std::snprintf(buf, sizeof buf, f, a, b);
  return buf;
}

// Every rank of `doctor --nproc N`: meet, all-reduce, check the sum.
int allreduce_rank() {
  auto c = comm::init_from_env();
  auto t = torch::full({1 << 20}, static_cast<float>(c->rank() + 1));
  auto t0 = Clock::now();
  c->all_reduce(t);
  double ms = 1e3 * seconds_since(t0);
  const float want = c->size() * (c->size() + 1) / 2.0f;
  bool ok = torch::equal(t, torch::full({1 << 20}, want));
  if (c->rank() == 0)
    std::printf("      all-reduce of 4 MiB across %d ranks: %s in %.1f ms\n", c->size(), ok ? "correct" : "WRONG", ms);
  return ok ? 0 : 4;
}

}  // namespace

void register_doctor(CLI::App& app) {
  auto* sub = app.add_subcommand("doctor", "Check this machine for a tandem run: LibTorch build, devices, model "
                                           "creation, transfers, a simulated pipeline, and (--nproc) ranks");
  struct Flags {
    std::string data_device, model_device;
    int nproc = 0;
    bool rank_check = false;
  };
  auto f = std::make_shared<Flags>();
  sub->add_option("--data-device", f->data_device, "Data device to check: cpu, cuda, cuda:N");
  sub->add_option("--model-device", f->model_device, "Model device to check: cpu, cuda, cuda:N");
  sub->add_option("--nproc", f->nproc, "Also start N local ranks and all-reduce across them");
  sub->add_flag("--rank-check", f->rank_check, "(internal) run as one rank of the --nproc check")->group("");
  sub->callback([f] {
    if (f->rank_check) {
      int code = allreduce_rank();
      if (code) std::exit(code);
      return;
    }
    Doctor d;
    std::printf("tandem doctor\n");
    d.check("LibTorch", [] {
      std::string s = "version " TORCH_VERSION ", c10d Gloo: ";
#ifdef USE_C10D_GLOO
      s += "yes";
#else
      s += "NO";
#endif
      s += ", NCCL: ";
#ifdef USE_C10D_NCCL
      s += "yes";
#else
      s += "no";
#endif
      s += ", CUDA: " + std::string(torch::cuda::is_available() ? "yes" : "no");
      return s;
    });
    {
      // The fc layers' matrix multiplies go to BLAS: the cnn's fc1 shape, with
      // this process's thread count (changing it here would outlive the check).
      auto a = torch::randn({64, 3136}), w = torch::randn({3136, 128});
      auto c = torch::mm(a, w);
      auto t0 = Clock::now();
      int reps = 0;
      do {
        c = torch::mm(a, w);
        ++reps;
      } while (seconds_since(t0) < 0.2);
      const double gflops = 2.0 * 64 * 3136 * 128 * reps / seconds_since(t0) / 1e9;
      const int threads = torch::get_num_threads();
      const auto blas = device::blas_info();
      std::string line = fmt("%.1f GFLOP/s on %.0f thread", gflops, threads) + (threads == 1 ? "; " : "s; ") +
                         blas.describe();
      if (blas.reference) d.warn("CPU matrix multiply (BLAS)", line + "; " + device::blas_fix());
      else d.mark("PASS", "CPU matrix multiply (BLAS)", line);
    }
    d.mark("PASS", "host allocator", device::tune_host_allocator());  // idempotent: reports main()'s choice
    const int ncuda = device::cuda_device_count();
    if (ncuda == 0)
      d.not_available("CUDA devices", "none visible (CPU-only LibTorch or no driver); CPU training works");
    else
      d.check("CUDA devices", [&] { return std::to_string(ncuda) + " visible"; });
    d.mark("PASS", "CPU features", device::cpu_info().describe());
    device::DeviceChoice serve_device;
    d.check("device policy (--device auto)", [&] {
      serve_device = device::choose_device("auto");
      return serve_device.reason;
    });
    d.check("inference policy (cnn, untrained)", [&] {
      // What `tandem serve --precision auto --max-batch auto` would decide on
      // speed; the served model's own accuracy check happens at its start-up.
      device::PolicyOptions po;
      po.require_accuracy_check = false;
      po.probe_ms = 100;
      const device::IntraOpThreads threads(device::usable_cpus());  // as serve times its candidates
      auto c = device::choose([] { return models::make_model({"cnn"}); }, serve_device.device, po, {}, nullptr);
      std::string trials;
      for (const auto& t : c.trials)
        trials += std::string(trials.empty() ? "" : "; ") + device::to_string(t.precision) + " " +
                  (t.ran ? fmt("%.2f ms", t.ms_per_batch) : std::string("refused"));
      device::InstanceOptions io;
      io.cpus = device::usable_cpus();
      io.max_batch = c.max_batch;
      io.max_batch_auto = true;
      io.probe_ms = 100;
      const auto inst = device::plan_instances(c.forward, serve_device.device, io, nullptr);
      return std::string("precision ") + device::to_string(c.precision) + ", max batch " +
             std::to_string(c.max_batch) + " (seed default " + std::to_string(c.seed_batch) + "), " +
             std::to_string(inst.instances) + (inst.instances == 1 ? " instance x " : " instances x ") +
             std::to_string(inst.threads) + " threads; batch " + std::to_string(c.probe_batch) + ": " + trials;
    });
    d.mark("PASS", "training precision",
           device::cpu_info().native_bf16()
               ? "--precision bf16 runs with autocast on this CPU (native bf16); fp16 with a loss scaler needs CUDA"
               : "--precision bf16 runs on this CPU without native bf16 (emulated, likely slower); fp16 needs "
                 "CUDA");
    device::Plan plan;
    d.check("requested devices", [&] {
      plan = device::plan(f->data_device, f->model_device);
      return plan.describe();
    });
    d.check("model on the model device", [&] {
      auto m = models::make_model({"cnn"});
      m.module->to(plan.model);
      auto y = m.forward(torch::randn({8, 1, 28, 28}, torch::TensorOptions().device(plan.model)));
      TANDEM_CHECK(y.size(1) == 10 && y.device() == plan.model, "forward gave a wrong shape or device");
      return "cnn created and run on " + plan.model.str();
    });
    d.check("transfer " + plan.data.str() + " -> " + plan.model.str(), [&] {
      auto src = torch::randn({16 << 20}, torch::TensorOptions().device(plan.data));  // 64 MiB
      if (plan.data.is_cpu() && plan.model.is_cuda()) src = src.pin_memory();
      // Into a buffer allocated once: a fresh 64 MiB host allocation per copy
      // would time the kernel's page faults (110 ms of them on this VM), not the copy.
      auto dst = torch::empty(src.sizes(), torch::TensorOptions().dtype(src.dtype()).device(plan.model));
      dst.copy_(src);
      const bool cuda = plan.model.is_cuda() || plan.data.is_cuda();
      if (cuda) torch::cuda::synchronize();
      auto t0 = Clock::now();
      for (int i = 0; i < 3; ++i) dst.copy_(src, /*non_blocking=*/true);
      if (cuda) torch::cuda::synchronize();
      double s = seconds_since(t0) / 3;
      TANDEM_CHECK(torch::equal(dst.cpu(), src.cpu()), "the copy differs from the source");
      return fmt("64 MiB in %.2f ms: %.2f GB/s", s * 1e3, 0.064 * 1.048576 / s);
    });
    d.check("simulated pipeline", [&] {
      auto images = torch::randint(0, 255, {4096, 28, 28}, torch::kUInt8);
      auto labels = torch::randint(0, 10, {4096}, torch::kInt64);
      auto ds = std::make_shared<data::TensorDataset>(images, labels, 0.5, 0.5, 10, "synthetic");
      data::LoaderOptions lo;
      lo.batch_size = 64;
      lo.num_workers = 2;
      lo.buffer_size = 8;
      data::Loader loader(ds, lo);
      std::vector<int64_t> idx(4096);
      for (int64_t i = 0; i < 4096; ++i) idx[i] = i;
      loader.start_epoch(idx, 0);
      loader.wait_ready(4, 2.0);
      auto m = models::make_model({"mlp"});
      m.module->to(plan.model);
      torch::optim::SGD opt(m.module->parameters(), 0.01);
      auto t0 = Clock::now();
      int64_t n = 0;
      while (auto b = loader.next()) {
        opt.zero_grad();
        torch::nn::functional::cross_entropy(m.forward(b->input.to(plan.model)), b->target.to(plan.model)).backward();
        opt.step();
        ++n;
      }
      double wall = seconds_since(t0);
      TANDEM_CHECK(n == 64, "delivered ", n, " batches, expected 64");
      return fmt("64 batches in %.2f s, stall %.1f%% of the time", wall, 100 * loader.stats().wait_seconds / wall);
    });
    if (f->nproc > 0) {
      d.check("rendezvous + all-reduce, " + std::to_string(f->nproc) + " ranks", [&] {
        int code = relaunch_local(f->nproc, {"doctor", "--rank-check"});
        TANDEM_CHECK(code == 0, "a rank failed with exit code ", code);
        return std::string("ranks met on loopback (FileStore) and summed correctly");
      });
    }
    std::printf("%s\n", d.failed ? "doctor: some checks FAILED" : "doctor: all checks passed");
    if (d.failed) std::exit(1);
  });
}

}  // namespace tandem::cli
