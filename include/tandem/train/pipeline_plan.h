#pragma once
// Resolves the data pipeline's dependent defaults in one place: workers,
// buffer size (--buffer-size auto), warm-up batches, and the sentence the log
// prints about them.
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "tandem/train/trainer.h"

namespace tandem::train {

struct PipelinePlan {
  int num_workers = 2;
  int buffer_size = 50;
  int warmup_batches = 4;
  std::string describe;
};

// Where the prefetch buffer lives. With a CPU data device that is host RAM;
// with a CUDA data device the loader workers upload every batch, so the whole
// buffer sits in that GPU's memory.
struct BufferMemory {
  std::string where = "RAM";
  double bytes = 0;         // what that memory has: physical RAM, or the GPU's free memory now
  int sharing_ranks = 1;    // local ranks that may put their buffers there
};

// The budget for `--buffer-size auto`: a quarter of `mem.bytes`, at most
// 2 GiB, divided among the ranks that share that memory.
PipelinePlan plan_pipeline(const TrainOptions& opts, const std::vector<int64_t>& sample_shape,
                           const BufferMemory& mem);

// Host RAM, or the free memory of `data_device` when it is a GPU, shared by
// the local ranks.
BufferMemory buffer_memory(const c10::Device& data_device, int local_world_size);

}  // namespace tandem::train
