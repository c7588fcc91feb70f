#include "tandem/models/resnet.h"

#include <torch/torch.h>

#include "tandem/models/linear.h"
#include "tandem/util/check.h"

namespace tandem::models {
namespace nn = torch::nn;
namespace {

nn::Conv2d conv3x3(int64_t in, int64_t out, int64_t stride = 1) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(false));
}
nn::Conv2d conv1x1(int64_t in, int64_t out, int64_t stride = 1) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, 1).stride(stride).bias(false));
}
nn::Sequential make_downsample(int64_t in, int64_t out, int64_t stride) {
  // Registered as "0" (conv) and "1" (bn): downsample.0.weight, downsample.1.running_mean.
  return nn::Sequential(conv1x1(in, out, stride), nn::BatchNorm2d(out));
}

template <typename Block>
nn::Sequential make_layer(int64_t& inplanes, int64_t planes, int64_t blocks, int64_t stride) {
  nn::Sequential layer;
  const bool down = stride != 1 || inplanes != planes * Block::Impl::expansion;
  layer->push_back(Block(inplanes, planes, stride, down));
  inplanes = planes * Block::Impl::expansion;
  for (int64_t i = 1; i < blocks; ++i) layer->push_back(Block(inplanes, planes, 1, false));
  return layer;
}

}  // namespace

BasicBlockImpl::BasicBlockImpl(int64_t inplanes, int64_t planes, int64_t stride, bool down) {
  conv1 = register_module("conv1", conv3x3(inplanes, planes, stride));
  bn1 = register_module("bn1", nn::BatchNorm2d(planes));
  conv2 = register_module("conv2", conv3x3(planes, planes));
  bn2 = register_module("bn2", nn::BatchNorm2d(planes));
  if (down) downsample = register_module("downsample", make_downsample(inplanes, planes * expansion, stride));
}

at::Tensor BasicBlockImpl::forward(at::Tensor x) {
  at::Tensor identity = downsample ? downsample->forward(x) : x;
  auto out = torch::relu(bn1->forward(conv1->forward(x)));
  out = bn2->forward(conv2->forward(out));
  return torch::relu(out + identity);
}

BottleneckImpl::BottleneckImpl(int64_t inplanes, int64_t planes, int64_t stride, bool down) {
  conv1 = register_module("conv1", conv1x1(inplanes, planes));
  bn1 = register_module("bn1", nn::BatchNorm2d(planes));
  conv2 = register_module("conv2", conv3x3(planes, planes, stride));
  bn2 = register_module("bn2", nn::BatchNorm2d(planes));
  conv3 = register_module("conv3", conv1x1(planes, planes * expansion));
  bn3 = register_module("bn3", nn::BatchNorm2d(planes * expansion));
  if (down) downsample = register_module("downsample", make_downsample(inplanes, planes * expansion, stride));
}

at::Tensor BottleneckImpl::forward(at::Tensor x) {
  at::Tensor identity = downsample ? downsample->forward(x) : x;
  auto out = torch::relu(bn1->forward(conv1->forward(x)));
  out = torch::relu(bn2->forward(conv2->forward(out)));
  out = bn3->forward(conv3->forward(out));
  return torch::relu(out + identity);
}

ResNetImpl::ResNetImpl(int depth, int64_t num_classes, int64_t in_channels)
    : depth_(depth), num_classes_(num_classes) {
  TANDEM_CHECK(num_classes >= 1, "resnet: num_classes must be >= 1, got ", num_classes);
  TANDEM_CHECK(in_channels >= 1, "resnet: in_channels must be >= 1, got ", in_channels);
  std::vector<int64_t> blocks;
  bool bottleneck = false;
  switch (depth) {
    case 18: blocks = {2, 2, 2, 2}; break;
    case 34: blocks = {3, 4, 6, 3}; break;
    case 50: blocks = {3, 4, 6, 3}; bottleneck = true; break;
    case 101: blocks = {3, 4, 23, 3}; bottleneck = true; break;
    case 152: blocks = {3, 8, 36, 3}; bottleneck = true; break;
    default: TANDEM_FAIL("resnet: unsupported depth ", depth, "; choose 18, 34, 50, 101 or 152");
  }
  conv1 = register_module(
      "conv1", nn::Conv2d(nn::Conv2dOptions(in_channels, 64, 7).stride(2).padding(3).bias(false)));
  bn1 = register_module("bn1", nn::BatchNorm2d(64));
  int64_t inplanes = 64;
  const int64_t planes[4] = {64, 128, 256, 512};
  nn::Sequential* layers[4] = {&layer1, &layer2, &layer3, &layer4};
  for (int i = 0; i < 4; ++i) {
    const int64_t stride = i == 0 ? 1 : 2;
    auto layer = bottleneck ? make_layer<Bottleneck>(inplanes, planes[i], blocks[i], stride)
                            : make_layer<BasicBlock>(inplanes, planes[i], blocks[i], stride);
    *layers[i] = register_module("layer" + std::to_string(i + 1), layer);
  }
  fc = register_module("fc", nn::Linear(512 * (bottleneck ? 4 : 1), num_classes));

  // torchvision init: Kaiming-normal (fan_out, relu) convs, BN weight 1 / bias 0,
  // Linear keeps PyTorch's default (Kaiming-uniform a=sqrt(5), uniform bias).
  torch::NoGradGuard no_grad;
  for (auto& m : modules(/*include_self=*/false)) {
    if (auto* conv = m->as<nn::Conv2d>()) {
      nn::init::kaiming_normal_(conv->weight, 0.0, torch::kFanOut, torch::kReLU);
    } else if (auto* bn = m->as<nn::BatchNorm2d>()) {
      nn::init::ones_(bn->weight);
      nn::init::zeros_(bn->bias);
    }
  }
}

at::Tensor ResNetImpl::forward(at::Tensor x) {
  x = torch::relu(bn1->forward(conv1->forward(x)));
  x = torch::max_pool2d(x, /*kernel_size=*/3, /*stride=*/2, /*padding=*/1);
  x = layer1->forward(x);
  x = layer2->forward(x);
  x = layer3->forward(x);
  x = layer4->forward(x);
  x = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1);
  return linear(*fc, x);
}

std::shared_ptr<torch::nn::Module> make_resnet(int depth, int64_t num_classes, int64_t in_channels) {
  return std::make_shared<ResNetImpl>(depth, num_classes, in_channels);
}

at::Tensor resnet_forward(torch::nn::Module& module, const at::Tensor& x) {
  auto* r = dynamic_cast<ResNetImpl*>(&module);
  TANDEM_CHECK(r != nullptr, "resnet_forward: module '", module.name(), "' is not a ResNet");
  return r->forward(x);
}

}  // namespace tandem::models
