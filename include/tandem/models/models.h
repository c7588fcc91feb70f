#pragma once
// Model factory by name: mlp, cnn (Fashion-MNIST sized), resnet18, resnet50.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn.h>

namespace tandem::models {

// One piece of a model's forward, for cutting the model into pipeline
// stages (pp/): applying a model's blocks in order is its forward. A block
// uses the model's own submodules (`modules`: the parameters and buffers it
// touches), so a stage trains the model's tensors under their usual names.
struct Block {
  std::string name;  // e.g. "conv1", "layer2.0", "fc"
  std::function<at::Tensor(const at::Tensor&)> forward;
  std::vector<std::shared_ptr<torch::nn::Module>> modules;
  std::vector<at::Tensor> parameters() const;
  std::vector<at::Tensor> buffers() const;
};

// A module plus its forward: torch::nn::Module has no virtual forward, so the
// factory pairs them. The trainer and the synchronisers see only this.
struct Model {
  std::shared_ptr<torch::nn::Module> module;
  std::function<at::Tensor(const at::Tensor&)> forward;
  std::vector<Block> blocks;  // the forward as a sequence (see Block)
};

struct ModelSpec {
  std::string name = "cnn";
  int64_t num_classes = 10;
  std::vector<int64_t> input_shape{1, 28, 28};  // [C, H, W]
};

const std::vector<std::string>& model_names();
// How many blocks make_model gives the named model (0 for an unknown name).
int block_count(const std::string& name);
// Throws tandem::Error naming the unknown model and the accepted names.
Model make_model(const ModelSpec& spec);

// cnn: conv(1->32,3x3,pad1)-relu-maxpool2, conv(32->64,3x3,pad1)-relu-maxpool2,
// linear(3136->128)-relu, linear(128->10) (for 28x28 inputs).
struct CnnImpl : torch::nn::Module {
  CnnImpl(int64_t in_channels, int64_t height, int64_t width, int64_t num_classes);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

// mlp: flatten, linear(C*H*W -> 256)-relu, linear(256 -> 128)-relu, linear(128 -> classes).
struct MlpImpl : torch::nn::Module {
  MlpImpl(int64_t in_features, int64_t num_classes);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, fc3{nullptr};
};

}  // namespace tandem::models
