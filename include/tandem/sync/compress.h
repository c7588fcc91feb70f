#pragma once
// Gradient compression: what a rank puts on the wire for one bucket, and how
// the ranks' compressed shares become the average gradient.
//
// Used by DDP and the ring (each bucket has its own BucketCompressor, run on
// the synchroniser's communication thread in bucket order) and by the
// parameter server's push (encode/decode of a shard, see Codec).
//
//   none        the fp32 bucket is all-reduced.
//   fp16, bf16  the bucket, divided by the world size first (the sum cannot
//               overflow where the gradients fit), travels as 16-bit floats
//               through the all-reduce; 2x fewer bytes.
//   int8        each rank scales its bucket by its own max |g| / 127 and rounds
//               stochastically (unbiased: E[q] = g / scale), sends the int8
//               values and its scale through an all-gather, and every rank
//               sums the world's shares in float32; about 4x fewer bytes on 2
//               ranks (an all-gather moves (N-1)/N x N x n bytes per rank,
//               so the saving shrinks as the world grows).
//   topk:F      error feedback: acc = g + residual; the ceil(F x n) entries of
//               acc largest in magnitude are sent as (int32 index, float32
//               value) pairs through an all-gather (the sum of sparse vectors
//               is not sparse, so there is no sparse all-reduce); every rank
//               adds all pairs into a dense zero bucket (duplicate indices
//               add up). residual = acc - sent.
//   powersgd:R  error feedback as above; each matrix-shaped gradient M (n x m,
//               a convolution's kernel as out x rest) is approximated as
//               P Q^T of rank r = min(R, n, m): P = M Q (Q from the previous
//               step, the same on every rank), all-reduce P, orthonormalise
//               it, Q = M^T P, all-reduce Q; the average is P Q^T / N.
//               Vectors (biases), and matrices too small for rank r to save
//               bytes, go uncompressed in the same all-reduce as the Ps.
//               residual = acc - average approximation (PyTorch's hook does
//               the same); with r = min(n, m) the result is the exact average.
//
// Every compressor leaves the same bytes on every rank: the decoding of the
// gathered or reduced data is a deterministic function of data every rank
// holds, so the models stay identical.
//
// Bytes: each compressor adds what this rank sends to Wire::bytes_sent, as a
// ring would send it: an all-reduce of b bytes sends 2(N-1)/N x b, an
// all-gather of b bytes per rank sends (N-1) x b.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "tandem/collectives/ring_allreduce.h"
#include "tandem/comm/communicator.h"

namespace tandem::sync {

struct CompressSpec {
  enum class Kind { kNone, kFp16, kBf16, kInt8, kTopK, kPowerSgd };
  Kind kind = Kind::kNone;
  double fraction = 0;  // topk
  int rank = 0;         // powersgd
  int64_t warmup = 0;   // steps sent uncompressed first
  bool none() const { return kind == Kind::kNone; }
  std::string str() const;  // the flag's spelling: "topk:0.01"
};
// none | fp16 | bf16 | int8 | topk:F (0 < F <= 1) | powersgd:R (R >= 1);
// tandem::Error naming `flag`, the bad value and the choices otherwise.
CompressSpec parse_compress(const std::string& s, const std::string& flag = "--compress");

// The collectives a compressor uses, blocking, on one thread: c10d's (through
// the Communicator) or tandem's ring.
class Wire {
 public:
  Wire(comm::CommunicatorPtr comm, bool ring, collectives::RingOptions ring_opts = {});
  int rank() const { return comm_->rank(); }
  int size() const { return comm_->size(); }
  // In place, sum over ranks.
  void all_reduce(at::Tensor& t);
  // out (size() x in.numel()) receives every rank's `in`, rank r's at r x in.numel().
  void all_gather(at::Tensor& out, const at::Tensor& in);
  int64_t bytes_sent = 0;

 private:
  comm::CommunicatorPtr comm_;
  bool ring_;
  collectives::RingOptions ring_opts_;
  at::Tensor bf16_gathered_;  // bfloat16 over Gloo: the gathered shares
};

// One bucket's compressor; it keeps the bucket's state (residual, Q).
class BucketCompressor {
 public:
  virtual ~BucketCompressor() = default;
  // flat: this rank's float32 gradient of the bucket. On return it holds the
  // average over ranks (identical bytes on every rank).
  virtual void reduce(at::Tensor& flat, Wire& wire) = 0;
  // With error feedback (topk, powersgd): this rank's share of the last
  // reduce, decompressed (what the others received from it; computed on
  // call, for tests), and the residual; sum(sent) + residual == sum(gradients).
  // Undefined tensors for the other compressors.
  virtual at::Tensor last_sent() const { return {}; }
  virtual at::Tensor residual() const { return residual_; }

 protected:
  at::Tensor residual_;
};

// A parameter of the bucket: its offset in the flat bucket and its shape.
struct BucketSlot {
  int64_t offset = 0;
  std::vector<int64_t> shape;
};

// `seed` must be the same on every rank (PowerSGD's first Q); int8's
// rounding noise is drawn per rank (the seed is mixed with `rank`).
// PowerSGD compresses a matrix only when its n x m elements exceed
// min_saving x r(n + m) (a rank that does not save bytes goes uncompressed;
// tests pass 0 to force the low-rank path). On a CUDA `device` only fp16
// and bf16 are offered (tandem::Error otherwise).
std::unique_ptr<BucketCompressor> make_bucket_compressor(const CompressSpec& spec,
                                                         const std::vector<BucketSlot>& slots, int64_t numel,
                                                         uint64_t seed, int rank, double min_saving = 1.0,
                                                         c10::Device device = c10::kCPU);

// Parameter-server push: a gradient shard encoded into a payload whose size
// depends only on the shard's size (so the server can post its receive),
// decoded by the server. fp16, bf16, int8 and topk (with error feedback on
// the worker); not powersgd (it needs an all-reduce among workers).
class Codec {
 public:
  virtual ~Codec() = default;
  virtual at::Tensor payload_like(int64_t numel) const = 0;  // an empty payload for a shard of numel
  // Worker: encodes `grad` (one shard; residual kept per shard index `shard`).
  virtual void encode(const at::Tensor& grad, at::Tensor& payload, int shard) = 0;
  // Server: adds the decoded payload to `acc` (scaled by `scale`).
  virtual void decode_add(const at::Tensor& payload, at::Tensor& acc, double scale) const = 0;
};
std::unique_ptr<Codec> make_codec(const CompressSpec& spec, uint64_t seed);

}  // namespace tandem::sync
