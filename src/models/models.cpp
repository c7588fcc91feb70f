#include "tandem/models/models.h"

#include <torch/torch.h>

#include "tandem/models/linear.h"
#include "tandem/models/resnet.h"
#include "tandem/util/check.h"

namespace tandem::models {

namespace {
thread_local const LinearOverride* t_linear_override = nullptr;
}  // namespace

LinearOverrideScope::LinearOverrideScope(const LinearOverride* o) : previous_(t_linear_override) {
  t_linear_override = o;
}
LinearOverrideScope::~LinearOverrideScope() { t_linear_override = previous_; }

at::Tensor linear(torch::nn::LinearImpl& layer, const at::Tensor& x) {
  at::Tensor out;
  if (t_linear_override && t_linear_override->forward(layer, x, out)) return out;
  return layer.forward(x);
}

CnnImpl::CnnImpl(int64_t in_channels, int64_t height, int64_t width, int64_t num_classes) {
  conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(in_channels, 32, 3).padding(1)));
  conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3).padding(1)));
  fc1 = register_module("fc1", torch::nn::Linear(64 * (height / 4) * (width / 4), 128));
  fc2 = register_module("fc2", torch::nn::Linear(128, num_classes));
}

at::Tensor CnnImpl::forward(const at::Tensor& input) {
  auto x = torch::max_pool2d(torch::relu(conv1->forward(input)), 2);
  x = torch::max_pool2d(torch::relu(conv2->forward(x)), 2);
  x = torch::relu(linear(*fc1, x.flatten(1)));
  return linear(*fc2, x);
}

MlpImpl::MlpImpl(int64_t in_features, int64_t num_classes) {
  fc1 = register_module("fc1", torch::nn::Linear(in_features, 256));
  fc2 = register_module("fc2", torch::nn::Linear(256, 128));
  fc3 = register_module("fc3", torch::nn::Linear(128, num_classes));
}

at::Tensor MlpImpl::forward(const at::Tensor& input) {
  auto x = torch::relu(linear(*fc1, input.flatten(1)));
  x = torch::relu(linear(*fc2, x));
  return linear(*fc3, x);
}

int block_count(const std::string& name) {
  if (name == "mlp") return 3;
  if (name == "cnn") return 4;
  if (name == "resnet18") return 10;  // stem, 8 basic blocks, head
  if (name == "resnet50") return 18;  // stem, 16 bottlenecks, head
  return 0;
}

const std::vector<std::string>& model_names() {
  static const std::vector<std::string> names{"mlp", "cnn", "resnet18", "resnet50"};
  return names;
}

std::vector<at::Tensor> Block::parameters() const {
  std::vector<at::Tensor> out;
  for (const auto& m : modules)
    for (auto& p : m->parameters(/*recurse=*/true)) out.push_back(p);
  return out;
}

std::vector<at::Tensor> Block::buffers() const {
  std::vector<at::Tensor> out;
  for (const auto& m : modules)
    for (auto& b : m->buffers(/*recurse=*/true)) out.push_back(b);
  return out;
}

namespace {

using Fn = std::function<at::Tensor(const at::Tensor&)>;
using Mods = std::vector<std::shared_ptr<torch::nn::Module>>;

std::vector<Block> cnn_blocks(const std::shared_ptr<CnnImpl>& m) {
  return {{"conv1", [c = m->conv1.ptr()](const at::Tensor& x) { return torch::max_pool2d(torch::relu(c->forward(x)), 2); },
           Mods{m->conv1.ptr()}},
          {"conv2", [c = m->conv2.ptr()](const at::Tensor& x) { return torch::max_pool2d(torch::relu(c->forward(x)), 2); },
           Mods{m->conv2.ptr()}},
          {"fc1", [f = m->fc1.ptr()](const at::Tensor& x) { return torch::relu(linear(*f, x.flatten(1))); },
           Mods{m->fc1.ptr()}},
          {"fc2", [f = m->fc2.ptr()](const at::Tensor& x) { return linear(*f, x); }, Mods{m->fc2.ptr()}}};
}

std::vector<Block> mlp_blocks(const std::shared_ptr<MlpImpl>& m) {
  return {{"fc1", [f = m->fc1.ptr()](const at::Tensor& x) { return torch::relu(linear(*f, x.flatten(1))); },
           Mods{m->fc1.ptr()}},
          {"fc2", [f = m->fc2.ptr()](const at::Tensor& x) { return torch::relu(linear(*f, x)); }, Mods{m->fc2.ptr()}},
          {"fc3", [f = m->fc3.ptr()](const at::Tensor& x) { return linear(*f, x); }, Mods{m->fc3.ptr()}}};
}

// The stem, every residual block, and the head, as ResNetImpl::forward runs them.
template <class Impl>
void add_residual_blocks(std::vector<Block>& out, const torch::nn::Sequential& layer, const std::string& name) {
  for (size_t i = 0; i < layer->size(); ++i) {
    auto b = layer->ptr<Impl>(i);
    out.push_back({name + "." + std::to_string(i), [b](const at::Tensor& x) { return b->forward(x); }, Mods{b}});
  }
}

std::vector<Block> resnet_blocks(const std::shared_ptr<torch::nn::Module>& module) {
  auto r = std::dynamic_pointer_cast<ResNetImpl>(module);
  TANDEM_CHECK(r, "resnet_blocks: not a ResNet");
  std::vector<Block> out;
  out.push_back({"stem",
                 [c = r->conv1.ptr(), bn = r->bn1.ptr()](const at::Tensor& x) {
                   return torch::max_pool2d(torch::relu(bn->forward(c->forward(x))), 3, 2, 1);
                 },
                 Mods{r->conv1.ptr(), r->bn1.ptr()}});
  const torch::nn::Sequential* layers[] = {&r->layer1, &r->layer2, &r->layer3, &r->layer4};
  for (int l = 0; l < 4; ++l) {
    const std::string name = "layer" + std::to_string(l + 1);
    if (r->depth() < 50) add_residual_blocks<BasicBlockImpl>(out, *layers[l], name);
    else add_residual_blocks<BottleneckImpl>(out, *layers[l], name);
  }
  out.push_back({"fc",
                 [f = r->fc.ptr()](const at::Tensor& x) { return linear(*f, torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1)); },
                 Mods{r->fc.ptr()}});
  return out;
}

}  // namespace

Model make_model(const ModelSpec& spec) {
  TANDEM_CHECK(spec.input_shape.size() == 3, "model input shape must be [C,H,W]");
  const int64_t c = spec.input_shape[0], h = spec.input_shape[1], w = spec.input_shape[2];
  TANDEM_CHECK(spec.num_classes >= 1, "--num-classes must be >= 1, got ", spec.num_classes);
  if (spec.name == "cnn") {
    auto m = std::make_shared<CnnImpl>(c, h, w, spec.num_classes);
    return {m, [m](const at::Tensor& x) { return m->forward(x); }, cnn_blocks(m)};
  }
  if (spec.name == "mlp") {
    auto m = std::make_shared<MlpImpl>(c * h * w, spec.num_classes);
    return {m, [m](const at::Tensor& x) { return m->forward(x); }, mlp_blocks(m)};
  }
  if (spec.name == "resnet18" || spec.name == "resnet50") {
    auto m = make_resnet(spec.name == "resnet18" ? 18 : 50, spec.num_classes, c);
    return {m, [m](const at::Tensor& x) { return resnet_forward(*m, x); }, resnet_blocks(m)};
  }
  std::string list;
  for (auto& n : model_names()) list += (list.empty() ? "" : ", ") + n;
  TANDEM_FAIL("unknown model '", spec.name, "': choose one of ", list);
}

}  // namespace tandem::models
