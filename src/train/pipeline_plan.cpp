#include "tandem/train/pipeline_plan.h"

#include <unistd.h>

#include <algorithm>

#include "tandem/device/device.h"

namespace tandem::train {

BufferMemory buffer_memory(const c10::Device& data_device, int local_world_size) {
  BufferMemory m;
  const int ranks = std::max(1, local_world_size);
  if (data_device.is_cuda()) {
    m.where = "free memory of " + data_device.str();
    m.bytes = static_cast<double>(device::free_memory_bytes(data_device));
    // Every local rank may name this GPU (cuda:0 on all of them), so share it
    // among all; a bare `cuda` spreads the ranks and this then errs low.
    m.sharing_ranks = ranks;
    if (m.bytes > 0) return m;
    m.where = "RAM (free memory of " + data_device.str() + " unknown)";  // a build without CUDA, or the query failed
  }
  m.bytes = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  m.sharing_ranks = ranks;
  return m;
}

PipelinePlan plan_pipeline(const TrainOptions& o, const std::vector<int64_t>& shape, const BufferMemory& mem) {
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
    const double budget = std::min(mem.bytes / 4, 2.0 * (1 << 30)) / std::max(1, mem.sharing_ranks);
    const int by_memory = static_cast<int>(budget / std::max(1.0, batch_bytes));
    const int by_workers = 4 * std::max(1, p.num_workers);  // enough to ride out one slow batch per worker
    p.buffer_size = std::max(1, std::min(by_memory, std::max(by_workers, 8)));
    why = "buffer auto = " + std::to_string(p.buffer_size) + " batches (min(budget " +
          std::to_string(static_cast<long long>(budget / (1 << 20))) + " MiB of " + mem.where + " / " +
          std::to_string(static_cast<long long>(batch_bytes / 1024)) + " KiB per batch = " +
          std::to_string(by_memory) + ", max(4 x workers, 8) = " + std::to_string(std::max(by_workers, 8)) + "))";
  }
  p.warmup_batches = o.warmup_batches >= 0 ? o.warmup_batches : std::min(p.buffer_size, 2 * std::max(1, p.num_workers));
  p.describe = why + ", " + std::to_string(p.num_workers) + " loader worker" + (p.num_workers == 1 ? "" : "s") +
               (p.num_workers == 0 ? " (serial loading)" : "") + ", warm-up " + std::to_string(p.warmup_batches) +
               " batches or " + std::to_string(o.model_start_delay).substr(0, 4) + " s";
  return p;
}

}  // namespace tandem::train
