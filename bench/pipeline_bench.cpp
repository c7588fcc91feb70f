// Pipelined vs serial loading (issue: dual-device data pipeline).
//
// A synthetic per-batch load cost is set equal to the measured compute cost
// of one training step (cnn, batch 64, one thread). Serial: no workers, no
// buffer, load then compute. Pipelined: one loader worker and a prefetch
// buffer. Target: pipelined epoch <= 1.10 x max(load, compute), i.e. >= 1.7x
// over serial. The load runs as a wait on separate hardware (default) or as
// busy work on this CPU (argument `cpu`). Second case: loading capacity above compute (load = compute/2),
// target stall fraction < 2%.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include <torch/torch.h>

#include "tandem/data/idx.h"
#include "tandem/data/loader.h"
#include "tandem/models/models.h"

using Clock = std::chrono::steady_clock;
using namespace tandem;

namespace {

double secs(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The synthetic load cost. kDevice: the loader waits while separate hardware
// works (the seeds' data device, or I/O) and uses no CPU here. kCpu: busy work
// on this machine's CPU, competing with the training step for the cores.
enum class LoadKind { kDevice, kCpu };
LoadKind g_kind = LoadKind::kDevice;

void spin(double s) {
  if (g_kind == LoadKind::kDevice) {
    std::this_thread::sleep_for(std::chrono::duration<double>(s));
    return;
  }
  auto end = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
  volatile double x = 0;
  while (Clock::now() < end)
    for (int i = 0; i < 200; ++i) x = x + 1e-9;
}

struct Result {
  double wall, stall;
};

Result run_epoch(std::shared_ptr<data::TensorDataset> ds, models::Model& m, torch::optim::SGD& opt, int workers,
                 int buffer, double load_cost, int64_t batches) {
  data::LoaderOptions o;
  o.batch_size = 64;
  o.num_workers = workers;
  o.buffer_size = buffer;
  o.transform = [load_cost](data::Batch&) { spin(load_cost); };
  data::Loader loader(ds, o);
  std::vector<int64_t> idx(batches * 64);
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int64_t>(i % ds->size());
  loader.start_epoch(idx, 0);
  auto t0 = Clock::now();
  while (auto b = loader.next()) {
    opt.zero_grad();
    torch::nn::functional::cross_entropy(m.forward(b->input), b->target).backward();
    opt.step();
  }
  double wall = secs(Clock::now() - t0);
  return {wall, loader.stats().wait_seconds / wall};
}

}  // namespace

int main(int argc, char** argv) {
  torch::set_num_threads(1);
  const int64_t batches = argc > 1 ? std::atoll(argv[1]) : 150;
  if (argc > 2 && std::strcmp(argv[2], "cpu") == 0) g_kind = LoadKind::kCpu;
  std::printf("load cost kind: %s\n", g_kind == LoadKind::kCpu ? "cpu (busy work on this machine's cores)"
                                                               : "device (waits while other hardware works)");
  auto ds = data::load_fashion_mnist(data::kFashionMnistDir, true, 64 * 64);
  torch::manual_seed(0);
  auto m = models::make_model({"cnn"});
  torch::optim::SGD opt(m.module->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  // Measure the compute cost of one step (data already in memory).
  auto warm = run_epoch(ds, m, opt, 0, 1, 0.0, 20);
  auto comp = run_epoch(ds, m, opt, 0, 1, 0.0, batches);
  const double compute = comp.wall / batches;
  std::printf("compute per step: %.2f ms (cnn, batch 64, 1 thread)\n", compute * 1e3);
  (void)warm;

  const double load = compute;  // equal costs: the case the seeds describe
  auto serial = run_epoch(ds, m, opt, 0, 1, load, batches);
  auto piped = run_epoch(ds, m, opt, 1, 50, load, batches);
  // Compute-only again, right after: the reference is the mean of the two runs
  // that bracket the pipelined one, so a drift in machine speed cancels.
  auto comp2 = run_epoch(ds, m, opt, 0, 1, 0.0, batches);
  const double compute_epoch = (comp.wall + comp2.wall) / 2;
  std::printf("compute-only epoch: %.2f s before, %.2f s after\n", comp.wall, comp2.wall);
  const double bound = std::max(batches * load, compute_epoch);
  std::printf("\nload = compute = %.2f ms per batch, %lld batches\n", load * 1e3, static_cast<long long>(batches));
  std::printf("  serial   (0 workers)            : %7.2f s  stall %5.1f%%\n", serial.wall, 100 * serial.stall);
  std::printf("  pipelined (1 worker, buffer 50) : %7.2f s  stall %5.1f%%\n", piped.wall, 100 * piped.stall);
  std::printf("  speedup over serial             : %7.2fx  (target >= 1.7x)\n", serial.wall / piped.wall);
  std::printf("  pipelined / max(load, compute)  : %7.3f   (target <= 1.10)\n", piped.wall / bound);

  auto fast = run_epoch(ds, m, opt, 1, 50, compute / 2, batches);
  std::printf("\nload = compute / 2 (loading capacity exceeds compute)\n");
  std::printf("  pipelined (1 worker, buffer 50) : %7.2f s  stall %5.2f%%  (target < 2%%)\n", fast.wall,
              100 * fast.stall);
  return 0;
}
