// ResNet (torchvision-compatible names and sizes) and weights load/save,
// including state_dict files written by Python's torch.save.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <unistd.h>

#include "tandem/models/resnet.h"
#include "tandem/models/weights.h"
#include "tandem/util/check.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace tandem::models;

namespace {

using tandem::test::error_of;
using tandem::test::TempDir;

int64_t count_params(const torch::nn::Module& m) {
  int64_t n = 0;
  for (auto& p : m.parameters()) n += p.numel();
  return n;
}

std::map<std::string, at::Tensor> state(const torch::nn::Module& m) {
  std::map<std::string, at::Tensor> out;
  for (auto& p : m.named_parameters()) out[p.key()] = p.value();
  for (auto& b : m.named_buffers()) out[b.key()] = b.value();
  return out;
}

// A python3 that can import torch (python3-torch is a test dependency).
std::string python() {
  static const std::string found = [] {
    std::vector<std::string> candidates;
    if (const char* env = std::getenv("TANDEM_PYTHON")) candidates.push_back(env);
    candidates.insert(candidates.end(), {"python3", "/usr/bin/python3", "python"});
    for (auto& c : candidates)
      if (std::system((c + " -c 'import torch' >/dev/null 2>&1").c_str()) == 0) return c;
    return std::string();
  }();
  return found;
}

void run_python(const std::string& script_path, const std::string& script) {
  {
    std::ofstream f(script_path);
    f << script;
  }
  const std::string py = python();
  ASSERT_FALSE(py.empty()) << "no python3 with torch found (install python3-torch or set TANDEM_PYTHON)";
  const std::string cmd = py + " " + script_path;
  ASSERT_EQ(std::system(cmd.c_str()), 0) << "failed: " << cmd;
}

// Writes "name dtype d0 d1 ..." per tensor of the model, for Python to rebuild.
void write_manifest(const torch::nn::Module& m, const std::string& path) {
  std::ofstream f(path);
  for (auto& [name, t] : state(m)) {
    f << name << ' ' << (t.scalar_type() == at::kLong ? "int64" : "float32");
    for (auto s : t.sizes()) f << ' ' << s;
    f << '\n';
  }
}

// Value Python writes for element i (flattened, row-major) of tensor number k.
double expected_value(int64_t k, int64_t i) { return std::fmod(i * 0.001 + k * 0.5, 7.0) - 3.0; }

}  // namespace

TEST(ResNet, Resnet18ForwardBackward) {
  ResNet net(18, 10);
  auto x = torch::randn({2, 3, 64, 64});
  auto y = net->forward(x);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 10}));
  y.pow(2).sum().backward();
  for (auto& p : net->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_TRUE(torch::isfinite(p.value().grad()).all().item<bool>()) << p.key();
  }
  // Through the generic factory.
  auto m = make_resnet(18, 5, 1);
  m->eval();  // batch of one: BatchNorm needs eval mode
  EXPECT_EQ(resnet_forward(*m, torch::randn({1, 1, 32, 32})).sizes(), (std::vector<int64_t>{1, 5}));
  auto msg = error_of([] { make_resnet(19, 10); });
  EXPECT_NE(msg.find("depth 19"), std::string::npos) << msg;
}

TEST(ResNet, Resnet50Forward) {
  auto m = std::dynamic_pointer_cast<ResNetImpl>(make_resnet(50, 7));
  ASSERT_TRUE(m);
  m->eval();
  torch::NoGradGuard g;
  EXPECT_EQ(m->forward(torch::randn({1, 3, 64, 64})).sizes(), (std::vector<int64_t>{1, 7}));
}

TEST(ResNet, TorchvisionNamesAndSizes) {
  ResNet r18(18, 1000);
  EXPECT_EQ(count_params(*r18), 11689512);
  auto s18 = state(*r18);
  EXPECT_EQ(s18.size(), 122u);  // len(torchvision.models.resnet18().state_dict())
  std::map<std::string, std::vector<int64_t>> want18{
      {"conv1.weight", {64, 3, 7, 7}},
      {"bn1.weight", {64}},
      {"bn1.running_mean", {64}},
      {"bn1.num_batches_tracked", {}},
      {"layer1.0.conv1.weight", {64, 64, 3, 3}},
      {"layer1.1.bn2.running_var", {64}},
      {"layer2.0.downsample.0.weight", {128, 64, 1, 1}},
      {"layer2.0.downsample.1.running_mean", {128}},
      {"layer4.1.conv2.weight", {512, 512, 3, 3}},
      {"fc.weight", {1000, 512}},
      {"fc.bias", {1000}}};
  for (auto& [k, shape] : want18) {
    ASSERT_TRUE(s18.count(k)) << k;
    EXPECT_EQ(s18[k].sizes(), shape) << k;
  }
  EXPECT_FALSE(s18.count("layer1.0.downsample.0.weight"));

  ResNet r50(50, 1000);
  EXPECT_EQ(count_params(*r50), 25557032);
  auto s50 = state(*r50);
  EXPECT_EQ(s50.size(), 320u);
  std::map<std::string, std::vector<int64_t>> want50{{"layer1.0.conv3.weight", {256, 64, 1, 1}},
                                                     {"layer1.0.downsample.0.weight", {256, 64, 1, 1}},
                                                     {"layer3.5.bn3.weight", {1024}},
                                                     {"layer4.2.conv2.weight", {512, 512, 3, 3}},
                                                     {"fc.weight", {1000, 2048}}};
  for (auto& [k, shape] : want50) {
    ASSERT_TRUE(s50.count(k)) << k;
    EXPECT_EQ(s50[k].sizes(), shape) << k;
  }
  // v1.5: the stride sits on the 3x3 conv of the first bottleneck of layers 2-4.
  auto* b = r50->layer2[0]->as<BottleneckImpl>();
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->conv1->options.stride()->at(0), 1);
  EXPECT_EQ(b->conv2->options.stride()->at(0), 2);
  // Grey input: conv1 takes one channel.
  ResNet grey(18, 10, 1);
  EXPECT_EQ(state(*grey)["conv1.weight"].sizes(), (std::vector<int64_t>{64, 1, 7, 7}));
}

TEST(Weights, SaveLoadRoundTrip) {
  TempDir dir;
  ResNet a(18, 10), b(18, 10);
  {
    torch::NoGradGuard g;
    for (auto& buf : a->named_buffers())
      if (buf.value().is_floating_point()) buf.value().uniform_(0.5, 1.5);
      else buf.value().fill_(17);
  }
  save_weights(*a, dir.file("w.pt"));
  load_weights(*b, dir.file("w.pt"));
  auto sa = state(*a), sb = state(*b);
  for (auto& [k, t] : sa) EXPECT_TRUE(torch::equal(t, sb[k])) << k;
  // The loaded parameters are still leaves that train.
  b->forward(torch::randn({2, 3, 64, 64})).sum().backward();
  EXPECT_TRUE(b->fc->weight.grad().defined());

  // And Python reads the tandem checkpoint with plain torch.load.
  std::ostringstream py;
  py << "import torch\n"
     << "d = torch.load('" << dir.file("w.pt") << "')\n"
     << "assert len(d) == 122, len(d)\n"
     << "assert tuple(d['fc.weight'].shape) == (10, 512)\n"
     << "assert int(d['bn1.num_batches_tracked']) == 17\n";
  run_python(dir.file("read.py"), py.str());
}

TEST(Weights, LoadsPythonStateDictOrderedDict) {
  TempDir dir;
  ResNet net(18, 10);
  write_manifest(*net, dir.file("manifest.txt"));
  // An OrderedDict with _metadata, as nn.Module.state_dict() returns; fc.weight
  // is stored transposed (non-contiguous) to exercise strides.
  std::ostringstream py;
  py << "import collections, torch\n"
     << "sd = collections.OrderedDict()\n"
     << "sd._metadata = collections.OrderedDict([('', {'version': 1})])\n"
     << "for k, line in enumerate(open('" << dir.file("manifest.txt") << "')):\n"
     << "    f = line.split(); name, dtype, shape = f[0], f[1], [int(s) for s in f[2:]]\n"
     << "    n = 1\n"
     << "    for s in shape: n *= s\n"
     << "    i = torch.arange(n, dtype=torch.float64)\n"
     << "    v = torch.fmod(i * 0.001 + k * 0.5, 7.0) - 3.0\n"
     << "    if dtype == 'int64':\n"
     << "        t = torch.tensor(1000 + k, dtype=torch.int64).reshape(shape)\n"
     << "    elif name == 'fc.weight':\n"
     << "        t = v.float().reshape(shape).t().contiguous().t()\n"
     << "        assert not t.is_contiguous()\n"
     << "    else:\n"
     << "        t = v.float().reshape(shape)\n"
     << "    sd[name] = t\n"
     << "torch.save(sd, '" << dir.file("py_state.pt") << "')\n"
     << "sd2 = collections.OrderedDict(('module.' + k, v) for k, v in sd.items())\n"
     << "torch.save({'epoch': 3, 'state_dict': sd2, 'opt': {'lr': 0.1}}, '" << dir.file("py_ckpt.pt") << "')\n";
  run_python(dir.file("make.py"), py.str());

  for (const char* file : {"py_state.pt", "py_ckpt.pt"}) {
    ResNet m(18, 10);
    load_weights(*m, dir.file(file));
    int64_t k = 0;
    for (auto& [name, t] : state(*m)) {
      if (t.scalar_type() == at::kLong) {
        EXPECT_EQ(t.item<int64_t>(), 1000 + k) << file << " " << name;
      } else {
        auto flat = t.detach().reshape({-1}).to(at::kDouble);
        for (int64_t i : {int64_t(0), flat.numel() / 2, flat.numel() - 1})
          EXPECT_NEAR(flat[i].item<double>(), expected_value(k, i), 1e-5) << file << " " << name << "[" << i << "]";
      }
      ++k;
    }
  }
}

TEST(Weights, LoadsRealPythonModuleStateDict) {
  TempDir dir;
  // The same small network on both sides; Python saves nn.Module.state_dict().
  struct Small : torch::nn::Module {
    Small() {
      conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 4, 3)));
      bn1 = register_module("bn1", torch::nn::BatchNorm2d(4));
      fc = register_module("fc", torch::nn::Linear(4, 2));
    }
    torch::nn::Conv2d conv1{nullptr};
    torch::nn::BatchNorm2d bn1{nullptr};
    torch::nn::Linear fc{nullptr};
  };
  std::ostringstream py;
  py << "import torch\nfrom torch import nn\n"
     << "class Small(nn.Module):\n"
     << "    def __init__(self):\n"
     << "        super().__init__()\n"
     << "        self.conv1 = nn.Conv2d(3, 4, 3); self.bn1 = nn.BatchNorm2d(4); self.fc = nn.Linear(4, 2)\n"
     << "torch.manual_seed(0)\n"
     << "m = Small()\n"
     << "m.train(); m.bn1(m.conv1(torch.randn(8, 3, 5, 5)))\n"  // updates running stats
     << "torch.save(m.state_dict(), '" << dir.file("small.pt") << "')\n"
     << "with open('" << dir.file("sums.txt") << "', 'w') as f:\n"
     << "    for k, v in m.state_dict().items(): f.write('%s %.9g\\n' % (k, v.double().sum().item()))\n";
  run_python(dir.file("small.py"), py.str());
  Small m;
  load_weights(m, dir.file("small.pt"));
  auto s = state(m);
  std::ifstream sums(dir.file("sums.txt"));
  std::string name;
  double sum = 0;
  int n = 0;
  while (sums >> name >> sum) {
    ASSERT_TRUE(s.count(name)) << name;
    EXPECT_NEAR(s[name].to(at::kDouble).sum().item<double>(), sum, 1e-5 * (1 + std::abs(sum))) << name;
    ++n;
  }
  EXPECT_EQ(n, 9);  // conv w/b, bn weight/bias/running_mean/running_var/num_batches_tracked, fc w/b
}

TEST(Weights, MismatchesNameTheKey) {
  TempDir dir;
  ResNet r1000(18, 1000);
  save_weights(*r1000, dir.file("r1000.pt"));
  ResNet r10(18, 10);
  auto msg = error_of([&] { load_weights(*r10, dir.file("r1000.pt")); });
  EXPECT_NE(msg.find("fc.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[1000, 512]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[10, 512]"), std::string::npos) << msg;

  ResNet r50(50, 10);
  msg = error_of([&] { load_weights(*r50, dir.file("r1000.pt")); });
  EXPECT_NE(msg.find("r1000.pt"), std::string::npos) << msg;

  // Python files with a key removed / a key added.
  write_manifest(*r10, dir.file("manifest.txt"));
  std::ostringstream py;
  py << "import collections, torch\n"
     << "sd = collections.OrderedDict()\n"
     << "for line in open('" << dir.file("manifest.txt") << "'):\n"
     << "    f = line.split()\n"
     << "    sd[f[0]] = torch.zeros([int(s) for s in f[2:]], dtype=torch.int64 if f[1] == 'int64' else torch.float32)\n"
     << "missing = collections.OrderedDict((k, v) for k, v in sd.items() if k != 'layer3.1.bn2.running_var')\n"
     << "torch.save(missing, '" << dir.file("missing.pt") << "')\n"
     << "sd['extra.weight'] = torch.zeros(3)\n"
     << "torch.save(sd, '" << dir.file("extra.pt") << "')\n";
  run_python(dir.file("mismatch.py"), py.str());
  msg = error_of([&] { load_weights(*r10, dir.file("missing.pt")); });
  EXPECT_NE(msg.find("layer3.1.bn2.running_var"), std::string::npos) << msg;
  msg = error_of([&] { load_weights(*r10, dir.file("extra.pt")); });
  EXPECT_NE(msg.find("extra.weight"), std::string::npos) << msg;

  msg = error_of([&] { load_weights(*r10, dir.file("nope.pt")); });
  EXPECT_NE(msg.find("nope.pt"), std::string::npos) << msg;
  {
    std::ofstream f(dir.file("garbage.pt"));
    f << "this is not a zip archive";
  }
  msg = error_of([&] { load_weights(*r10, dir.file("garbage.pt")); });
  EXPECT_NE(msg.find("garbage.pt"), std::string::npos) << msg;
}
