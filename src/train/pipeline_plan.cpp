#include "tandem/train/pipeline_plan.h"

#include <unistd.h>

#include <algorithm>

namespace tandem::train {

PipelinePlan plan_pipeline(const TrainOptions& o, const std::vector<int64_t>& shape) {
  PipelinePlan p;
  p.num_workers = o.num_workers;
  int64_t sample_bytes = 4;
  for (auto d : shape) sample_bytes *= d;
  const double batch_bytes = static_cast<double>(sample_bytes) * o.batch_size;
  std::string why;
  if (o.buffer_size > 0) {
    p.buffer_size = o.buffer_size;
    why = "buffer " + std::to_string(p.buffer_size) + " batches";
  } else {
    const double ram = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
    const double budget = std::min(ram / 4, 2.0 * (1 << 30)) / std::max(1, o.local_world_size);
    const int by_ram = static_cast<int>(budget / std::max(1.0, batch_bytes));
    const int by_workers = 4 * std::max(1, p.num_workers);  // enough to ride out one slow batch per worker
    p.buffer_size = std::max(1, std::min(by_ram, std::max(by_workers, 8)));
    why = "buffer auto = " + std::to_string(p.buffer_size) + " batches (min(RAM budget " +
          std::to_string(static_cast<long long>(budget / (1 << 20))) + " MiB / " +
          std::to_string(static_cast<long long>(batch_bytes / 1024)) + " KiB per batch = " + std::to_string(by_ram) +
          ", max(4 x workers, 8) = " + std::to_string(std::max(by_workers, 8)) + "))";
  }
  p.warmup_batches = o.warmup_batches >= 0 ? o.warmup_batches : std::min(p.buffer_size, 2 * std::max(1, p.num_workers));
  p.describe = why + ", " + std::to_string(p.num_workers) + " loader worker" + (p.num_workers == 1 ? "" : "s") +
               (p.num_workers == 0 ? " (serial loading)" : "") + ", warm-up " + std::to_string(p.warmup_batches) +
               " batches or " + std::to_string(o.model_start_delay).substr(0, 4) + " s";
  return p;
}

}  // namespace tandem::train
