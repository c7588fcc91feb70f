// Wraps a user's own module in tandem's DistributedDataParallel and trains a
// few steps with two ranks as threads; checks that both ranks end equal.
#include <tandem/tandem.h>
#include <torch/torch.h>

#include <cstdio>

struct Net : torch::nn::Module {
  Net() { fc = register_module("fc", torch::nn::Linear(8, 2)); }
  at::Tensor forward(const at::Tensor& x) { return fc->forward(x); }
  torch::nn::Linear fc{nullptr};
};

int main() {
  torch::set_num_threads(1);
  std::vector<at::Tensor> finals(2);
  tandem::comm::spawn(2, [&](int rank, tandem::comm::CommunicatorPtr comm) {
    auto net = std::make_shared<Net>();
    tandem::sync::DistributedDataParallel ddp(net, comm);
    torch::optim::SGD opt(net->parameters(), 0.1);
    auto gen = at::detail::createCPUGenerator(rank);
    for (int step = 0; step < 3; ++step) {
      auto x = at::randn({4, 8}, gen);
      auto y = at::randint(0, 2, {4}, gen);
      opt.zero_grad();
      ddp.begin_step(true);
      torch::nn::functional::cross_entropy(net->forward(x), y).backward();
      ddp.finish();
      opt.step();
    }
    finals[rank] = net->fc->weight.detach().clone();
  });
  bool same = torch::allclose(finals[0], finals[1]);
  std::printf("consumer: 2 ranks trained with tandem DDP, parameters %s\n", same ? "identical" : "DIFFER");
  return same ? 0 : 1;
}
