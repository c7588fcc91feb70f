#include "tandem/sync/ring_sync.h"

namespace tandem::sync {

RingSync::RingSync(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, DdpOptions opts,
                   collectives::RingOptions ring)
    : BucketedSync(std::move(module), std::move(comm), opts, /*ring=*/true, ring) {}

comm::RequestPtr RingSync::launch(at::Tensor& flat) {
  return on_comm_thread([this, flat]() mutable { wire_->all_reduce(flat); });
}

}  // namespace tandem::sync
