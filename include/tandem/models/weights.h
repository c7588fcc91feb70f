#pragma once
// Model weights on disk.
//
// save_weights writes a "tandem checkpoint": a PyTorch zip archive holding a
// plain dict {name: tensor} of every parameter and buffer (torch::pickle_save),
// which Python reads with torch.load(path).
//
// load_weights reads either that or a file written by Python's
// torch.save(model.state_dict()) (an OrderedDict, which LibTorch's own
// pickle_load cannot read), with a small unpickler of its own. Also accepted:
// a dict whose "state_dict" / "model" entry is the state dict, and keys all
// prefixed by "module." (DataParallel). Keys must match exactly: the first
// missing key, mis-shaped key (both shapes) or unexpected key is an error and
// nothing is copied. Values are copied (dtype-converted) under NoGradGuard.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

namespace tandem::models {

void save_weights(const torch::nn::Module& module, const std::string& path);
void load_weights(torch::nn::Module& module, const std::string& path);

// The named tensors in a weights file, in file order (after unwrapping
// "state_dict"/"model" and stripping "module."). Throws tandem::Error naming
// the file if it is missing or not a readable PyTorch zip archive.
std::vector<std::pair<std::string, at::Tensor>> read_weights(const std::string& path);

}  // namespace tandem::models
