#pragma once
// Ring all-reduce written on the communicator's point-to-point send/recv.
//
// The buffer is cut into `size` balanced segments. Reduce-scatter: in n-1
// steps each rank sends one segment to its right neighbour and adds the one
// from its left, after which rank r holds the full sum of segment r+1.
// All-gather: n-1 more steps pass the finished segments around. Each rank
// sends and receives 2(n-1)/n of the buffer in total (docs/algorithms.md).
// Within a step the segment travels in chunks: every send is posted at once;
// reduce-scatter keeps a window of 4 chunk receives posted into a small
// scratch buffer and adds each chunk as soon as it lands, so the addition
// overlaps the transfer of later chunks. All-gather receives are all posted at
// the start and land in place, so a finished segment flows on without waiting
// for the previous step to end.
// Works for any size >= 1 and any element count (segments may be empty).
#include <cstddef>

#include "tandem/comm/communicator.h"

namespace tandem::collectives {

struct RingOptions {
  size_t chunk_bytes = 1 << 20;  // transfer unit within a step
  int tag_base = 1 << 20;        // tags used: tag_base .. tag_base + 2(n-1)*chunks
};

// In place: t becomes the elementwise sum over ranks. t must be contiguous,
// float or double (or any dtype with add_), the same numel on every rank.
void ring_all_reduce(comm::Communicator& comm, at::Tensor& t, const RingOptions& opts = {});

// out (size x in.numel() elements, in's type) receives every rank's `in`,
// rank r's at r x in.numel(). n-1 steps: in step s each rank forwards to its
// right neighbour the block it received in step s-1 (its own in step 0), so
// each sends (n-1) x in.numel() elements. Receives are posted up front and
// land in place. Uses tags tag_base .. tag_base + n-2.
void ring_all_gather(comm::Communicator& comm, at::Tensor& out, const at::Tensor& in, const RingOptions& opts = {});

}  // namespace tandem::collectives
