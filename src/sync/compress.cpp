// Gradient compressors and codecs. See tandem/sync/compress.h.
#include "tandem/sync/compress.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstring>
#include <map>
#include <sstream>

#include "tandem/util/check.h"

namespace tandem::sync {
namespace {

constexpr const char* kChoices = "none, fp16, bf16, int8, topk:F (0 < F <= 1, e.g. topk:0.01) or powersgd:R (R >= 1, e.g. powersgd:2)";

// int8: the largest magnitude maps to 127 (the range is symmetric, -127..127).
constexpr float kInt8Max = 127.0f;

// Stochastic rounding of x / scale into payload[0, n) as int8 and the scale
// into the 4 bytes after them; `noise` is float scratch of n elements.
void quantize_int8(const at::Tensor& x, at::Tensor& payload, at::Tensor& noise, at::Generator& gen) {
  const int64_t n = x.numel();
  const float amax = n ? x.abs().max().item<float>() : 0.0f;
  const float scale = amax > 0 && std::isfinite(amax) ? amax / kInt8Max : 1.0f;
  // floor(x / scale + u), u ~ U[0, 1): rounds up with probability equal to
  // the fractional part, so the expectation is exact.
  noise.uniform_(0, 1, gen);
  noise.add_(x, 1.0 / scale).floor_().clamp_(-kInt8Max, kInt8Max);
  payload.slice(0, 0, n).copy_(noise);
  std::memcpy(payload.data_ptr<int8_t>() + n, &scale, sizeof scale);
}

// acc += scale x (the int8 values of payload x their scale), in float32
// (add_ promotes the int8 values; no temporary).
void dequantize_add(const at::Tensor& payload, int64_t n, at::Tensor& acc, double scale) {
  float s = 0;
  std::memcpy(&s, payload.data_ptr<int8_t>() + n, sizeof s);
  acc.add_(payload.slice(0, 0, n), s * scale);
}

int64_t topk_count(double fraction, int64_t numel) {
  return std::min<int64_t>(numel, std::max<int64_t>(1, static_cast<int64_t>(std::ceil(fraction * numel))));
}

// acc: this rank's values (g + residual); leaves residual = acc minus the k
// entries sent, writes them as [k int32 indices | k float32 values (bit
// copies)] into payload.
// `magnitude` is float scratch, resized to acc's size when it differs.
void select_topk(at::Tensor& acc, int64_t k, at::Tensor& payload, at::Tensor& magnitude) {
  if (!magnitude.defined() || magnitude.numel() != acc.numel()) magnitude = at::empty_like(acc);
  at::abs_out(magnitude, acc);
  auto idx = std::get<1>(at::topk(magnitude, k, 0, /*largest=*/true, /*sorted=*/false));
  auto val = acc.index_select(0, idx);
  acc.index_fill_(0, idx, 0);  // acc becomes the residual
  payload.slice(0, 0, k).copy_(idx);
  payload.slice(0, k, 2 * k).copy_(val.view(at::kInt));
}

void add_topk(const at::Tensor& payload, int64_t k, at::Tensor& acc, double scale) {
  auto idx = payload.slice(0, 0, k).to(at::kLong);
  auto val = payload.slice(0, k, 2 * k).view(at::kFloat);
  if (scale == 1.0) acc.index_add_(0, idx, val);
  else acc.index_add_(0, idx, val * scale);
}

at::Generator make_generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

// ---- bucket compressors -------------------------------------------------

void average(at::Tensor& flat, Wire& wire) {
  wire.all_reduce(flat);
  flat.mul_(1.0 / wire.size());
}

class Uncompressed : public BucketCompressor {
 public:
  void reduce(at::Tensor& flat, Wire& wire) override { average(flat, wire); }
};

class HalfCompressor : public BucketCompressor {
 public:
  HalfCompressor(at::ScalarType type, int64_t numel, c10::Device device)
      : wire_(at::empty({numel}, at::TensorOptions().dtype(type).device(device))) {}
  void reduce(at::Tensor& flat, Wire& wire) override {
    // Divide first: the 16-bit sum of the world's shares cannot overflow
    // where the fp32 gradients fit.
    flat.mul_(1.0 / wire.size());
    wire_.copy_(flat);
    wire.all_reduce(wire_);
    flat.copy_(wire_);
  }

 private:
  at::Tensor wire_;
};

class Int8Compressor : public BucketCompressor {
 public:
  Int8Compressor(int64_t numel, uint64_t seed)
      : n_(numel),
        payload_(at::empty({numel + 4}, at::kChar)),
        noise_(at::empty({numel}, at::kFloat)),
        gen_(make_generator(seed)) {}
  void reduce(at::Tensor& flat, Wire& wire) override {
    const int N = wire.size();
    if (!gathered_.defined()) gathered_ = at::empty({N * (n_ + 4)}, at::kChar);
    quantize_int8(flat, payload_, noise_, gen_);
    wire.all_gather(gathered_, payload_);
    // Every rank sums the shares in rank order, in float32: identical bytes.
    flat.zero_();
    for (int r = 0; r < N; ++r)
      dequantize_add(gathered_.slice(0, r * (n_ + 4), (r + 1) * (n_ + 4)), n_, flat, 1.0);
    flat.mul_(1.0 / N);
  }

 private:
  int64_t n_;
  at::Tensor payload_, gathered_, noise_;
  at::Generator gen_;
};

// Error feedback shared by top-k and PowerSGD: acc_ = g + residual before
// compression; what was sent is acc_ - residual_ after it.
class FeedbackCompressor : public BucketCompressor {
 public:
  explicit FeedbackCompressor(int64_t numel) {
    residual_ = at::zeros({numel}, at::kFloat);
    acc_ = at::empty({numel}, at::kFloat);
  }
  at::Tensor last_sent() const override { return acc_ - residual_; }
 protected:
  at::Tensor acc_;
};

class TopKCompressor : public FeedbackCompressor {
 public:
  TopKCompressor(double fraction, int64_t numel)
      : FeedbackCompressor(numel), k_(topk_count(fraction, numel)), payload_(at::empty({2 * k_}, at::kInt)) {}
  void reduce(at::Tensor& flat, Wire& wire) override {
    const int N = wire.size();
    if (!gathered_.defined()) gathered_ = at::empty({N * 2 * k_}, at::kInt);
    residual_.add_(flat);
    acc_.copy_(residual_);
    select_topk(residual_, k_, payload_, magnitude_);
    wire.all_gather(gathered_, payload_);
    flat.zero_();
    for (int r = 0; r < N; ++r) add_topk(gathered_.slice(0, r * 2 * k_, (r + 1) * 2 * k_), k_, flat, 1.0);
    flat.mul_(1.0 / N);
  }

 private:
  int64_t k_;
  at::Tensor payload_, gathered_, magnitude_;
};

class PowerSgdCompressor : public FeedbackCompressor {
 public:
  PowerSgdCompressor(int rank, const std::vector<BucketSlot>& slots, int64_t numel, uint64_t seed, double min_saving)
      : FeedbackCompressor(numel) {
    int64_t p_len = 0, q_len = 0, rest = 0;
    for (const auto& s : slots) {
      int64_t size = 1;
      for (auto d : s.shape) size *= d;
      if (s.shape.size() >= 2) {
        const int64_t n = s.shape[0], m = size / n;
        const int64_t r = std::min<int64_t>(rank, std::min(n, m));
        if (static_cast<double>(n) * m > min_saving * static_cast<double>(r) * (n + m)) {
          mats_.push_back({s.offset, n, m, r, p_len, q_len});
          p_len += n * r;
          q_len += m * r;
          continue;
        }
      }
      rest_.push_back({s.offset, size});
      rest += size;
    }
    p_ = at::empty({p_len + rest}, at::kFloat);
    q_ = at::empty({q_len}, at::kFloat);
    rest_at_ = p_len;
    // The first Q: standard normal from the shared seed, the same on every rank.
    auto gen = make_generator(seed);
    q_.normal_(0, 1, gen);
  }

  void reduce(at::Tensor& flat, Wire& wire) override {
    const double inv = 1.0 / wire.size();
    // Error feedback on the compressed matrices only: the rest travels exactly.
    residual_.add_(flat);
    acc_.copy_(residual_);
    for (const auto& m : mats_) {
      auto p = pview(m);
      at::mm_out(p, mat(acc_, m), qview(m));
    }
    int64_t pos = rest_at_;
    for (const auto& r : rest_) {
      p_.slice(0, pos, pos + r.size).copy_(acc_.slice(0, r.offset, r.offset + r.size));
      pos += r.size;
    }
    wire.all_reduce(p_);
    for (const auto& m : mats_) {
      auto p = pview(m);
      p.copy_(std::get<0>(at::linalg_qr(p)));
      auto q = qview(m);
      at::mm_out(q, mat(acc_, m).t(), p);
    }
    wire.all_reduce(q_);
    q_.mul_(inv);  // Q stays the average: the next step's warm start, the same everywhere
    for (const auto& m : mats_) {
      auto out = mat(flat, m);
      at::mm_out(out, pview(m), qview(m).t());
      mat(residual_, m).copy_(mat(acc_, m)).sub_(out);
    }
    pos = rest_at_;
    for (const auto& r : rest_) {
      auto out = flat.slice(0, r.offset, r.offset + r.size);
      at::mul_out(out, p_.slice(0, pos, pos + r.size), inv);
      residual_.slice(0, r.offset, r.offset + r.size).zero_();
      pos += r.size;
    }
  }

 private:
  struct Mat {
    int64_t offset, n, m, r, p_at, q_at;
  };
  struct Rest {
    int64_t offset, size;
  };
  static at::Tensor mat(const at::Tensor& flat, const Mat& m) {
    return flat.slice(0, m.offset, m.offset + m.n * m.m).view({m.n, m.m});
  }
  at::Tensor pview(const Mat& m) const { return p_.slice(0, m.p_at, m.p_at + m.n * m.r).view({m.n, m.r}); }
  at::Tensor qview(const Mat& m) const { return q_.slice(0, m.q_at, m.q_at + m.m * m.r).view({m.m, m.r}); }

  std::vector<Mat> mats_;
  std::vector<Rest> rest_;
  at::Tensor p_, q_;
  int64_t rest_at_ = 0;
};

// The first `steps` reduces uncompressed (--compress-warmup), then `inner`.
class WarmupCompressor : public BucketCompressor {
 public:
  WarmupCompressor(std::unique_ptr<BucketCompressor> inner, int64_t steps) : inner_(std::move(inner)), left_(steps) {}
  void reduce(at::Tensor& flat, Wire& wire) override {
    if (left_ > 0) {
      --left_;
      average(flat, wire);
      return;
    }
    inner_->reduce(flat, wire);
  }
  at::Tensor last_sent() const override { return inner_->last_sent(); }
  at::Tensor residual() const override { return inner_->residual(); }

 private:
  std::unique_ptr<BucketCompressor> inner_;
  int64_t left_;
};

// ---- parameter-server codecs ----------------------------------------------

class HalfCodec : public Codec {
 public:
  explicit HalfCodec(at::ScalarType t) : type_(t) {}
  at::Tensor payload_like(int64_t numel) const override { return at::empty({numel}, at::TensorOptions().dtype(type_)); }
  void encode(const at::Tensor& grad, at::Tensor& payload, int) override { payload.copy_(grad); }
  void decode_add(const at::Tensor& payload, at::Tensor& acc, double scale) const override {
    acc.add_(payload, scale);  // promotes to float32, no temporary
  }

 private:
  at::ScalarType type_;
};

class Int8Codec : public Codec {
 public:
  explicit Int8Codec(uint64_t seed) : gen_(make_generator(seed)) {}
  at::Tensor payload_like(int64_t numel) const override { return at::empty({numel + 4}, at::kChar); }
  void encode(const at::Tensor& grad, at::Tensor& payload, int) override {
    if (!noise_.defined() || noise_.numel() != grad.numel()) noise_ = at::empty({grad.numel()}, at::kFloat);
    quantize_int8(grad, payload, noise_, gen_);
  }
  void decode_add(const at::Tensor& payload, at::Tensor& acc, double scale) const override {
    dequantize_add(payload, acc.numel(), acc, scale);
  }

 private:
  at::Generator gen_;
  at::Tensor noise_;
};

class TopKCodec : public Codec {
 public:
  explicit TopKCodec(double fraction) : fraction_(fraction) {}
  at::Tensor payload_like(int64_t numel) const override {
    return at::empty({2 * topk_count(fraction_, numel)}, at::kInt);
  }
  void encode(const at::Tensor& grad, at::Tensor& payload, int shard) override {
    auto& res = residual_[shard];
    if (!res.defined()) res = at::zeros({grad.numel()}, at::kFloat);
    res.add_(grad);
    select_topk(res, topk_count(fraction_, grad.numel()), payload, magnitude_);
  }
  void decode_add(const at::Tensor& payload, at::Tensor& acc, double scale) const override {
    add_topk(payload, payload.numel() / 2, acc, scale);
  }

 private:
  double fraction_;
  std::map<int, at::Tensor> residual_;
  at::Tensor magnitude_;
};

}  // namespace

std::string CompressSpec::str() const {
  switch (kind) {
    case Kind::kNone: return "none";
    case Kind::kFp16: return "fp16";
    case Kind::kBf16: return "bf16";
    case Kind::kInt8: return "int8";
    case Kind::kTopK: {
      std::ostringstream os;
      os << "topk:" << fraction;
      return os.str();
    }
    case Kind::kPowerSgd: return "powersgd:" + std::to_string(rank);
  }
  return "?";
}

CompressSpec parse_compress(const std::string& s, const std::string& flag) {
  CompressSpec c;
  const auto colon = s.find(':');
  const std::string name = s.substr(0, colon);
  const std::string arg = colon == std::string::npos ? "" : s.substr(colon + 1);
  auto no_arg = [&] { TANDEM_CHECK(colon == std::string::npos, flag, " ", s, ": ", name, " takes no parameter; choose ", kChoices); };
  if (name == "none") no_arg(), c.kind = CompressSpec::Kind::kNone;
  else if (name == "fp16") no_arg(), c.kind = CompressSpec::Kind::kFp16;
  else if (name == "bf16") no_arg(), c.kind = CompressSpec::Kind::kBf16;
  else if (name == "int8") no_arg(), c.kind = CompressSpec::Kind::kInt8;
  else if (name == "topk") {
    c.kind = CompressSpec::Kind::kTopK;
    char* end = nullptr;
    c.fraction = std::strtod(arg.c_str(), &end);
    TANDEM_CHECK(!arg.empty() && end && *end == '\0' && c.fraction > 0 && c.fraction <= 1, flag, " ", s,
                 ": the fraction F of topk:F must be a number in (0, 1], e.g. topk:0.01");
  } else if (name == "powersgd") {
    c.kind = CompressSpec::Kind::kPowerSgd;
    char* end = nullptr;
    const long r = std::strtol(arg.c_str(), &end, 10);
    TANDEM_CHECK(!arg.empty() && end && *end == '\0' && r >= 1 && r <= 1 << 20, flag, " ", s,
                 ": the rank R of powersgd:R must be a whole number >= 1, e.g. powersgd:2");
    c.rank = static_cast<int>(r);
  } else {
    TANDEM_FAIL(flag, " ", s, ": unknown gradient compression; choose ", kChoices);
  }
  return c;
}

Wire::Wire(comm::CommunicatorPtr comm, bool ring, collectives::RingOptions ring_opts)
    : comm_(std::move(comm)), ring_(ring), ring_opts_(ring_opts) {}

void Wire::all_reduce(at::Tensor& t) {
  const int n = size();
  if (n == 1) return;
  if (!ring_ && t.scalar_type() == at::kBFloat16 && comm_->backend() != "shm") {
    // Gloo in LibTorch 1.x has no bfloat16 type: every rank's share is
    // gathered (its bits carried as float16, which Gloo only copies) and
    // summed in float32, in rank order, so every rank gets the same bytes.
    // On 2 ranks this sends what a ring does.
    const int64_t m = t.numel();
    if (!bf16_gathered_.defined() || bf16_gathered_.numel() != n * m) bf16_gathered_ = at::empty({n * m}, at::kHalf);
    all_gather(bf16_gathered_, t.reshape({-1}).view(at::kHalf));
    t.copy_(bf16_gathered_.view(at::kBFloat16).view({n, m}).to(at::kFloat).sum(0).view(t.sizes()));
    return;
  }
  bytes_sent += 2 * (n - 1) * t.numel() * static_cast<int64_t>(t.element_size()) / n;
  if (ring_) collectives::ring_all_reduce(*comm_, t, ring_opts_);
  else comm_->all_reduce(t);
}

void Wire::all_gather(at::Tensor& out, const at::Tensor& in) {
  const int n = size();
  bytes_sent += (n - 1) * in.numel() * static_cast<int64_t>(in.element_size());
  if (ring_) collectives::ring_all_gather(*comm_, out, in, ring_opts_);
  else if (n == 1) out.copy_(in.reshape({-1}));
  else comm_->all_gather(out, in);
}

std::unique_ptr<BucketCompressor> make_bucket_compressor(const CompressSpec& spec, const std::vector<BucketSlot>& slots,
                                                         int64_t numel, uint64_t seed, int rank, double min_saving,
                                                         c10::Device device) {
  using K = CompressSpec::Kind;
  const bool half = spec.kind == K::kFp16 || spec.kind == K::kBf16;
  TANDEM_CHECK(device.is_cpu() || half || spec.none(), "--compress ", spec.str(),
               " works on CPU gradients; with a model on ", device.str(), " use fp16 or bf16");
  std::unique_ptr<BucketCompressor> c;
  switch (spec.kind) {
    case K::kNone: c = std::make_unique<Uncompressed>(); break;
    case K::kFp16: c = std::make_unique<HalfCompressor>(at::kHalf, numel, device); break;
    case K::kBf16: c = std::make_unique<HalfCompressor>(at::kBFloat16, numel, device); break;
    // Rounding noise independent across ranks (and buckets), reproducible per seed.
    case K::kInt8: c = std::make_unique<Int8Compressor>(numel, seed * 1000003u + static_cast<uint64_t>(rank)); break;
    case K::kTopK: c = std::make_unique<TopKCompressor>(spec.fraction, numel); break;
    case K::kPowerSgd: c = std::make_unique<PowerSgdCompressor>(spec.rank, slots, numel, seed, min_saving); break;
  }
  if (spec.warmup > 0 && !spec.none()) c = std::make_unique<WarmupCompressor>(std::move(c), spec.warmup);
  return c;
}

std::unique_ptr<Codec> make_codec(const CompressSpec& spec, uint64_t seed) {
  using K = CompressSpec::Kind;
  switch (spec.kind) {
    case K::kFp16: return std::make_unique<HalfCodec>(at::kHalf);
    case K::kBf16: return std::make_unique<HalfCodec>(at::kBFloat16);
    case K::kInt8: return std::make_unique<Int8Codec>(seed);
    case K::kTopK: return std::make_unique<TopKCodec>(spec.fraction);
    case K::kNone: return nullptr;
    case K::kPowerSgd:
      TANDEM_FAIL("--compress ", spec.str(), " needs an all-reduce among the workers, which the parameter server "
                  "does not have; with --strategy ps use fp16, bf16, int8 or topk:F");
  }
  return nullptr;
}

}  // namespace tandem::sync
