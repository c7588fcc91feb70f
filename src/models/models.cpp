#include "tandem/models/models.h"

#include <torch/torch.h>

#include "tandem/models/resnet.h"
#include "tandem/util/check.h"

namespace tandem::models {

CnnImpl::CnnImpl(int64_t in_channels, int64_t height, int64_t width, int64_t num_classes) {
  conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(in_channels, 32, 3).padding(1)));
  conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3).padding(1)));
  fc1 = register_module("fc1", torch::nn::Linear(64 * (height / 4) * (width / 4), 128));
  fc2 = register_module("fc2", torch::nn::Linear(128, num_classes));
}

at::Tensor CnnImpl::forward(const at::Tensor& input) {
  auto x = torch::max_pool2d(torch::relu(conv1->forward(input)), 2);
  x = torch::max_pool2d(torch::relu(conv2->forward(x)), 2);
  x = torch::relu(fc1->forward(x.flatten(1)));
  return fc2->forward(x);
}

MlpImpl::MlpImpl(int64_t in_features, int64_t num_classes) {
  fc1 = register_module("fc1", torch::nn::Linear(in_features, 256));
  fc2 = register_module("fc2", torch::nn::Linear(256, 128));
  fc3 = register_module("fc3", torch::nn::Linear(128, num_classes));
}

at::Tensor MlpImpl::forward(const at::Tensor& input) {
  auto x = torch::relu(fc1->forward(input.flatten(1)));
  x = torch::relu(fc2->forward(x));
  return fc3->forward(x);
}

const std::vector<std::string>& model_names() {
  static const std::vector<std::string> names{"mlp", "cnn", "resnet18", "resnet50"};
  return names;
}

Model make_model(const ModelSpec& spec) {
  TANDEM_CHECK(spec.input_shape.size() == 3, "model input shape must be [C,H,W]");
  const int64_t c = spec.input_shape[0], h = spec.input_shape[1], w = spec.input_shape[2];
  TANDEM_CHECK(spec.num_classes >= 1, "--num-classes must be >= 1, got ", spec.num_classes);
  if (spec.name == "cnn") {
    auto m = std::make_shared<CnnImpl>(c, h, w, spec.num_classes);
    return {m, [m](const at::Tensor& x) { return m->forward(x); }};
  }
  if (spec.name == "mlp") {
    auto m = std::make_shared<MlpImpl>(c * h * w, spec.num_classes);
    return {m, [m](const at::Tensor& x) { return m->forward(x); }};
  }
  if (spec.name == "resnet18" || spec.name == "resnet50") {
    auto m = make_resnet(spec.name == "resnet18" ? 18 : 50, spec.num_classes, c);
    return {m, [m](const at::Tensor& x) { return resnet_forward(*m, x); }};
  }
  std::string list;
  for (auto& n : model_names()) list += (list.empty() ? "" : ", ") + n;
  TANDEM_FAIL("unknown model '", spec.name, "': choose one of ", list);
}

}  // namespace tandem::models
