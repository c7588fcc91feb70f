#pragma once
// Element-wise reductions over the inputs of several ranks (internal to comm/shm).
#include <cstddef>

#include <c10/core/ScalarType.h>

#include "tandem/comm/communicator.h"

namespace tandem::comm::shm {

// True for the element types reduce() handles: float32, float64, float16,
// bfloat16 (accumulated in float32), int32, int64.
bool reducible(at::ScalarType t);

// out[i] = in[0][i] op in[1][i] op ... op in[n-1][i], always in that order, so
// every rank that reduces the same inputs gets the same bits. `out` may alias
// any input. Vectorised; the widest instruction set of this CPU is picked at
// load time (function multiversioning), so the binary runs anywhere.
void reduce(at::ScalarType t, ReduceOp op, void* out, const void* const* in, int n, std::size_t count);

}  // namespace tandem::comm::shm
