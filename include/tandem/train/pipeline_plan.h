#pragma once
// Resolves the data pipeline's dependent defaults in one place: workers,
// buffer size (--buffer-size auto), warm-up batches, and the sentence the log
// prints about them.
#include <string>
#include <vector>

#include "tandem/train/trainer.h"

namespace tandem::train {

struct PipelinePlan {
  int num_workers = 2;
  int buffer_size = 50;
  int warmup_batches = 4;
  std::string describe;
};

// RAM budget for `--buffer-size auto`: a quarter of the physical memory, at
// most 2 GiB, shared by the local ranks.
PipelinePlan plan_pipeline(const TrainOptions& opts, const std::vector<int64_t>& sample_shape);

}  // namespace tandem::train
