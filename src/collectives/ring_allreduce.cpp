#include "tandem/collectives/ring_allreduce.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "tandem/util/check.h"

namespace tandem::collectives {
namespace {

struct Range {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};

Range segment(int64_t numel, int n, int i) {
  return {numel * i / n, numel * (i + 1) / n};
}

// Splits a range into chunks of at most `chunk` elements. Both neighbours call
// this for the same segment, so they agree on the chunk boundaries.
std::vector<Range> chunks(Range r, int64_t chunk) {
  std::vector<Range> out;
  for (int64_t b = r.begin; b < r.end; b += chunk) out.push_back({b, std::min(r.end, b + chunk)});
  return out;
}

// Reduce-scatter chunks in flight per step: each lands in one of this many
// chunk-sized buffers, reused round-robin, so the scratch memory stays small
// and cache-warm whatever the tensor size.
constexpr int64_t kWindow = 4;

template <typename T>
void add_loop(T* __restrict dst, const T* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// dst += src on this thread: intra-op (OpenMP) threads would compete with the
// transport's threads for the cores that move the next chunks.
void accumulate(const at::Tensor& dst, const at::Tensor& src) {
  switch (dst.scalar_type()) {
    case at::kFloat: add_loop(dst.data_ptr<float>(), src.data_ptr<float>(), dst.numel()); break;
    case at::kDouble: add_loop(dst.data_ptr<double>(), src.data_ptr<double>(), dst.numel()); break;
    default: {
      auto d = dst;
      d.add_(src);
    }
  }
}

}  // namespace

void ring_all_reduce(comm::Communicator& comm, at::Tensor& t, const RingOptions& opts) {
  const int n = comm.size();
  if (n == 1 || t.numel() == 0) return;
  TANDEM_CHECK(t.is_contiguous(), "ring_all_reduce: tensor must be contiguous");
  const int r = comm.rank();
  const int right = (r + 1) % n, left = (r + n - 1) % n;
  auto flat = t.view({-1});
  const int64_t numel = flat.numel();
  const int64_t chunk = std::max<int64_t>(1, static_cast<int64_t>(opts.chunk_bytes / flat.element_size()));
  const int64_t max_seg = (numel + n - 1) / n;
  const int64_t chunks_per_seg = (max_seg + chunk - 1) / chunk;
  const int64_t slot = std::min(chunk, max_seg);
  auto scratch = at::empty({std::min(chunks_per_seg, kWindow) * slot}, flat.options());
  auto timeout = comm.timeout();
  TANDEM_CHECK(opts.tag_base + 2 * (n - 1) * chunks_per_seg <= std::numeric_limits<int>::max(),
               "ring all-reduce: ", numel, " elements in chunks of ", chunk,
               " need more message tags than an int holds; use a larger chunk size");

  // Steps 0..n-2 reduce-scatter, n-1..2n-3 all-gather. In step s this rank
  // sends segment send_seg(s) to the right and receives recv_seg(s) from the
  // left; the segment received in step s is the one sent in step s+1.
  const int num_steps = 2 * (n - 1);
  auto send_seg = [&](int s) { return s < n - 1 ? (r - s + n) % n : (r + 1 - (s - n + 1) + 2 * n) % n; };
  auto recv_seg = [&](int s) { return s < n - 1 ? (r - s - 1 + 2 * n) % n : (r - (s - n + 1) + 2 * n) % n; };
  auto tag = [&](int s, size_t c) { return opts.tag_base + s * static_cast<int>(chunks_per_seg) + static_cast<int>(c); };

  struct Incoming {
    std::vector<Range> chunks;
    std::vector<at::Tensor> landing;
    std::vector<comm::RequestPtr> reqs;
  };
  std::vector<Incoming> in(num_steps);
  for (int s = 0; s < num_steps; ++s) {
    in[s].chunks = chunks(segment(numel, n, recv_seg(s)), chunk);
    in[s].landing.resize(in[s].chunks.size());
    in[s].reqs.resize(in[s].chunks.size());
  }
  // Reduce-scatter receives land in the scratch window (chunk c in slot
  // c % kWindow); all-gather receives land in place.
  auto post_recv = [&](int s, size_t c) {
    const auto& rc = in[s].chunks[c];
    if (s < n - 1) {
      const int64_t off = static_cast<int64_t>(c % kWindow) * slot;
      in[s].landing[c] = scratch.slice(0, off, off + rc.size());
    } else {
      in[s].landing[c] = flat.slice(0, rc.begin, rc.end);
    }
    in[s].reqs[c] = comm.recv_async(in[s].landing[c], left, tag(s, c));
  };
  // Every all-gather receive is posted up front, so that the left neighbour
  // can send each finished segment as soon as it has it. Landing in place
  // early is safe: the final value of a segment reaches this rank only after
  // this rank's own contribution to it has been added and sent.
  for (int s = n - 1; s < num_steps; ++s)
    for (size_t c = 0; c < in[s].chunks.size(); ++c) post_recv(s, c);

  // Per step, all sends are posted at once; reduce-scatter receives keep
  // kWindow chunks posted, chunk c + kWindow being posted as soon as chunk c
  // has been added. Chunks are sent and received in order, per tag.
  for (int s = 0; s < num_steps; ++s) {
    const bool reduce = s < n - 1;
    auto& cur = in[s];
    const size_t nr = cur.chunks.size();
    if (reduce)
      for (size_t c = 0; c < std::min<size_t>(nr, kWindow); ++c) post_recv(s, c);
    const auto send_chunks = chunks(segment(numel, n, send_seg(s)), chunk);
    std::vector<at::Tensor> outgoing(send_chunks.size());
    std::vector<comm::RequestPtr> sends(send_chunks.size());
    for (size_t c = 0; c < send_chunks.size(); ++c) {
      outgoing[c] = flat.slice(0, send_chunks[c].begin, send_chunks[c].end);
      sends[c] = comm.send_async(outgoing[c], right, tag(s, c));
    }
    for (size_t c = 0; c < nr; ++c) {
      cur.reqs[c]->wait(timeout);
      if (!reduce) continue;
      accumulate(flat.slice(0, cur.chunks[c].begin, cur.chunks[c].end), cur.landing[c]);
      if (c + kWindow < nr) post_recv(s, c + kWindow);
    }
    for (auto& q : sends) q->wait(timeout);
  }
}

void ring_all_gather(comm::Communicator& comm, at::Tensor& out, const at::Tensor& in, const RingOptions& opts) {
  const int n = comm.size();
  const int64_t m = in.numel();
  TANDEM_CHECK(out.is_contiguous() && out.scalar_type() == in.scalar_type() && out.numel() == n * m,
               "ring_all_gather: output must be contiguous and hold world size x ", m, " elements of the input's type, got ",
               out.numel());
  const int r = comm.rank();
  auto flat = out.view({-1});
  flat.slice(0, r * m, (r + 1) * m).copy_(in.reshape({-1}));
  if (n == 1 || m == 0) return;
  const int right = (r + 1) % n, left = (r + n - 1) % n;
  auto block = [&](int i) { return flat.slice(0, i * m, (i + 1) * m); };
  // Step s receives the block of rank r-s-1 and sends the block of rank r-s.
  std::vector<at::Tensor> landing(n - 1), outgoing(n - 1);
  std::vector<comm::RequestPtr> recvs(n - 1), sends(n - 1);
  for (int s = 0; s < n - 1; ++s) {
    landing[s] = block((r - s - 1 + n) % n);
    recvs[s] = comm.recv_async(landing[s], left, opts.tag_base + s);
  }
  for (int s = 0; s < n - 1; ++s) {
    if (s > 0) recvs[s - 1]->wait(comm.timeout());
    outgoing[s] = block((r - s + n) % n);
    sends[s] = comm.send_async(outgoing[s], right, opts.tag_base + s);
  }
  recvs[n - 2]->wait(comm.timeout());
  for (auto& q : sends) q->wait(comm.timeout());
}

}  // namespace tandem::collectives
