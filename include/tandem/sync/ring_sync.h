#pragma once
// RingSync: the DDP buckets and hooks, each bucket summed by tandem's own ring
// all-reduce (collectives/ring_allreduce.h) instead of the c10d collective.
// The synchroniser's communication thread runs the rings in bucket order, so
// they overlap backward exactly like the c10d path. The thread owns all
// point-to-point traffic of this communicator while the sync object lives.
#include "tandem/collectives/ring_allreduce.h"
#include "tandem/sync/ddp.h"

namespace tandem::sync {

class RingSync : public BucketedSync {
 public:
  RingSync(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, DdpOptions opts = {},
           collectives::RingOptions ring = {});
  std::string name() const override { return "all_reduce"; }

 protected:
  comm::RequestPtr launch(at::Tensor& flat) override;
};

}  // namespace tandem::sync
