// Parameter server: end of epoch, every rank gets the servers' parameters.
#include <torch/torch.h>

#include "tandem/sync/ps.h"
#include "tandem/util/check.h"

namespace tandem::sync::ps {

void finalize_epoch(torch::nn::Module& module, comm::Communicator& comm, const PsOptions& opts) {
  validate(opts, comm.size());
  FlatParams fp(module);
  ShardLayout layout(fp.total(), opts.num_servers);
  auto flat = at::empty({fp.total()}, at::TensorOptions().dtype(fp.dtype()));
  const int r = comm.rank();
  if (is_server(r, opts)) fp.gather_params(flat, layout.shard(r));
  std::vector<at::Tensor> slices;
  for (int k = 0; k < opts.num_servers; ++k) {
    auto s = layout.shard(k);
    slices.push_back(flat.slice(0, s.begin, s.end));
  }
  detail::OpBatch ops(comm);
  for (int k = 0; k < opts.num_servers; ++k) ops.broadcast(slices[k], k);
  ops.wait();
  fp.scatter_params(flat, fp.all());
  // Buffers (batch-norm statistics) are only updated by workers' forwards.
  torch::NoGradGuard g;
  const int first_worker = opts.num_servers;
  for (auto& b : module.buffers()) {
    auto c = b.contiguous();
    ops.broadcast(c, first_worker);
    ops.wait();
    if (!c.is_same(b)) b.copy_(c);
  }
}

}  // namespace tandem::sync::ps
