#pragma once
// ResNet as in torchvision (v1.5: stride on the 3x3 conv of the bottleneck),
// with parameter/buffer names identical to torchvision's state_dict keys
// (conv1.weight, bn1.running_mean, layer1.0.conv1.weight,
// layer2.0.downsample.0.weight, fc.bias, ...), so weights load both ways.
// Depths: 18, 34 (BasicBlock), 50, 101, 152 (Bottleneck).
#include <cstdint>
#include <memory>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

namespace tandem::models {

struct BasicBlockImpl : torch::nn::Module {
  static constexpr int64_t expansion = 1;
  BasicBlockImpl(int64_t inplanes, int64_t planes, int64_t stride, bool downsample);
  at::Tensor forward(at::Tensor x);
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  torch::nn::Sequential downsample{nullptr};  // registered only when present
};
TORCH_MODULE(BasicBlock);

struct BottleneckImpl : torch::nn::Module {
  static constexpr int64_t expansion = 4;
  BottleneckImpl(int64_t inplanes, int64_t planes, int64_t stride, bool downsample);
  at::Tensor forward(at::Tensor x);
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  torch::nn::Sequential downsample{nullptr};
};
TORCH_MODULE(Bottleneck);

struct ResNetImpl : torch::nn::Module {
  // depth: 18, 34, 50, 101 or 152; throws tandem::Error otherwise.
  explicit ResNetImpl(int depth = 18, int64_t num_classes = 1000, int64_t in_channels = 3);
  // x: float [B, in_channels, H, W] -> logits [B, num_classes].
  at::Tensor forward(at::Tensor x);

  int depth() const { return depth_; }
  int64_t num_classes() const { return num_classes_; }

  torch::nn::Conv2d conv1{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr};
  torch::nn::Sequential layer1{nullptr}, layer2{nullptr}, layer3{nullptr}, layer4{nullptr};
  torch::nn::Linear fc{nullptr};

 private:
  int depth_;
  int64_t num_classes_;
};
TORCH_MODULE(ResNet);

// The module (a ResNetImpl). Call forward through
// std::dynamic_pointer_cast<ResNetImpl>(m)->forward(x) or resnet_forward().
std::shared_ptr<torch::nn::Module> make_resnet(int depth, int64_t num_classes, int64_t in_channels = 3);
// forward for a module made by make_resnet (throws tandem::Error for any other module).
at::Tensor resnet_forward(torch::nn::Module& module, const at::Tensor& x);

}  // namespace tandem::models
