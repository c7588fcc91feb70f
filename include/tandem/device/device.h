#pragma once
// Devices: parsing, checks with remedies, and the data/model device plan.
#include <string>

#include <c10/core/Device.h>

namespace tandem::device {

// "cpu", "cuda", "cuda:N" (also a bare index N, for the seeds' --data-gpu N).
// A bare "cuda" is cuda:(local_rank mod devices), so the local ranks of a job
// spread over the host's GPUs. Throws tandem::Error naming the flag, e.g.
// "--model-device cuda:3: this machine has 1 CUDA device: cuda:0".
c10::Device parse(const std::string& spec, const std::string& flag, int local_rank = 0);

int cuda_device_count();

struct Plan {
  c10::Device data{c10::kCPU};
  c10::Device model{c10::kCPU};
  bool dual = false;  // data and model on different devices
  std::string describe() const;
};

// Neither given: single-device buffered mode on the CPU. Only the model
// device given: the data device is the CPU (dual mode when that is a GPU);
// only the data device given: the model goes there too.
Plan plan(const std::string& data_spec, const std::string& model_spec, int local_rank = 0);

}  // namespace tandem::device
