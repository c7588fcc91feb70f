#include "tandem/collectives/ring_allreduce.h"

#include <algorithm>
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

  // One step: send segment `send_i` to the right, receive segment `recv_i` from
  // the left, and either add it (reduce-scatter) or store it (all-gather).
  // All sends are posted at once. All-gather receives land in place, all
  // posted at once; reduce-scatter receives land in the scratch window, chunk
  // c + kWindow being posted as soon as chunk c has been added. Chunks are
  // sent and received in order, so the oldest message in flight always has
  // its receive posted.
  auto step = [&](int s, int send_i, int recv_i, bool reduce) {
    const auto send_chunks = chunks(segment(numel, n, send_i), chunk);
    const auto recv_chunks = chunks(segment(numel, n, recv_i), chunk);
    const int tag0 = opts.tag_base + s * static_cast<int>(chunks_per_seg);
    const size_t nr = recv_chunks.size();
    std::vector<comm::RequestPtr> recvs(nr), sends(send_chunks.size());
    std::vector<at::Tensor> landing(nr), outgoing(send_chunks.size());
    auto post_recv = [&](size_t c) {
      const auto& rc = recv_chunks[c];
      if (reduce) {
        const int64_t off = static_cast<int64_t>(c % kWindow) * slot;
        landing[c] = scratch.slice(0, off, off + rc.size());
      } else {
        landing[c] = flat.slice(0, rc.begin, rc.end);
      }
      recvs[c] = comm.recv_async(landing[c], left, tag0 + static_cast<int>(c));
    };
    const size_t first = reduce ? std::min<size_t>(nr, kWindow) : nr;
    for (size_t c = 0; c < first; ++c) post_recv(c);
    for (size_t c = 0; c < send_chunks.size(); ++c) {
      outgoing[c] = flat.slice(0, send_chunks[c].begin, send_chunks[c].end);
      sends[c] = comm.send_async(outgoing[c], right, tag0 + static_cast<int>(c));
    }
    for (size_t c = 0; c < nr; ++c) {
      recvs[c]->wait(timeout);
      if (!reduce) continue;
      accumulate(flat.slice(0, recv_chunks[c].begin, recv_chunks[c].end), landing[c]);
      if (c + kWindow < nr) post_recv(c + kWindow);
    }
    for (auto& q : sends) q->wait(timeout);
  };

  int s = 0;
  for (int k = 0; k < n - 1; ++k, ++s) step(s, (r - k + n) % n, (r - k - 1 + 2 * n) % n, true);
  for (int k = 0; k < n - 1; ++k, ++s) step(s, (r + 1 - k + n) % n, (r - k + n) % n, false);
}

}  // namespace tandem::collectives
