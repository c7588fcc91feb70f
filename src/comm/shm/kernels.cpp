#include "kernels.h"

#include <algorithm>
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "tandem/util/check.h"

namespace tandem::comm::shm {
namespace {

constexpr std::size_t kBlock = 1024;  // elements accumulated in L1 before they are stored

struct Sum {
  template <class A>
  static A apply(A a, A b) { return a + b; }
};
struct Max {
  template <class A>
  static A apply(A a, A b) { return b > a ? b : a; }
};
struct Min {
  template <class A>
  static A apply(A a, A b) { return b < a ? b : a; }
};

// Acc: the type sums are carried in (float for the 16-bit types). A block is
// accumulated in a local array first, because `out` may be one of the inputs.
template <class T, class Acc, class Op>
__attribute__((always_inline)) inline void reduce_typed(void* out_v, const void* const* in_v, int n,
                                                        std::size_t count) {
  auto* out = static_cast<T*>(out_v);
  Acc acc[kBlock];
  for (std::size_t base = 0; base < count; base += kBlock) {
    const std::size_t m = std::min(kBlock, count - base);
    const T* __restrict a0 = static_cast<const T*>(in_v[0]) + base;
    if (n == 1) {
      for (std::size_t i = 0; i < m; ++i) acc[i] = static_cast<Acc>(a0[i]);
    } else {
      const T* __restrict a1 = static_cast<const T*>(in_v[1]) + base;
      for (std::size_t i = 0; i < m; ++i) acc[i] = Op::apply(static_cast<Acc>(a0[i]), static_cast<Acc>(a1[i]));
    }
    for (int k = 2; k < n; ++k) {
      const T* __restrict ak = static_cast<const T*>(in_v[k]) + base;
      for (std::size_t i = 0; i < m; ++i) acc[i] = Op::apply(acc[i], static_cast<Acc>(ak[i]));
    }
    T* o = out + base;  // may be one of the inputs: no __restrict
    for (std::size_t i = 0; i < m; ++i) o[i] = static_cast<T>(acc[i]);
  }
}

template <class T, class Acc>
__attribute__((always_inline)) inline void dispatch_op(ReduceOp op, void* out, const void* const* in, int n,
                                                       std::size_t count) {
  switch (op) {
    case ReduceOp::kMax: return reduce_typed<T, Acc, Max>(out, in, n, count);
    case ReduceOp::kMin: return reduce_typed<T, Acc, Min>(out, in, n, count);
    default: return reduce_typed<T, Acc, Sum>(out, in, n, count);
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TANDEM_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TANDEM_MULTIVERSION
#endif

TANDEM_MULTIVERSION void reduce_f32(ReduceOp op, void* out, const void* const* in, int n, std::size_t count) {
  dispatch_op<float, float>(op, out, in, n, count);
}
TANDEM_MULTIVERSION void reduce_f64(ReduceOp op, void* out, const void* const* in, int n, std::size_t count) {
  dispatch_op<double, double>(op, out, in, n, count);
}
TANDEM_MULTIVERSION void reduce_f16(ReduceOp op, void* out, const void* const* in, int n, std::size_t count) {
  dispatch_op<c10::Half, float>(op, out, in, n, count);
}
TANDEM_MULTIVERSION void reduce_bf16(ReduceOp op, void* out, const void* const* in, int n, std::size_t count) {
  dispatch_op<c10::BFloat16, float>(op, out, in, n, count);
}
TANDEM_MULTIVERSION void reduce_i32(ReduceOp op, void* out, const void* const* in, int n, std::size_t count) {
  dispatch_op<std::int32_t, std::int32_t>(op, out, in, n, count);
}
TANDEM_MULTIVERSION void reduce_i64(ReduceOp op, void* out, const void* const* in, int n, std::size_t count) {
  dispatch_op<std::int64_t, std::int64_t>(op, out, in, n, count);
}

}  // namespace

bool reducible(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
    case at::kDouble:
    case at::kHalf:
    case at::kBFloat16:
    case at::kInt:
    case at::kLong: return true;
    default: return false;
  }
}

void reduce(at::ScalarType t, ReduceOp op, void* out, const void* const* in, int n, std::size_t count) {
  switch (t) {
    case at::kFloat: return reduce_f32(op, out, in, n, count);
    case at::kDouble: return reduce_f64(op, out, in, n, count);
    case at::kHalf: return reduce_f16(op, out, in, n, count);
    case at::kBFloat16: return reduce_bf16(op, out, in, n, count);
    case at::kInt: return reduce_i32(op, out, in, n, count);
    case at::kLong: return reduce_i64(op, out, in, n, count);
    default: TANDEM_FAIL("shared-memory all-reduce: element type ", c10::toString(t), " is not supported "
                         "(float32/64, float16, bfloat16, int32/64 are); use --comm gloo");
  }
}

}  // namespace tandem::comm::shm
