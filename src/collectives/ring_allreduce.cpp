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
  auto tmp = at::empty({std::min(max_seg, numel)}, flat.options());
  auto timeout = comm.timeout();

  // One step: send segment `send_i` to the right, receive segment `recv_i` from
  // the left, and either add it (reduce-scatter) or store it (all-gather).
  auto step = [&](int s, int send_i, int recv_i, bool reduce) {
    auto send_chunks = chunks(segment(numel, n, send_i), chunk);
    auto recv_chunks = chunks(segment(numel, n, recv_i), chunk);
    const int tag0 = opts.tag_base + s * static_cast<int>(chunks_per_seg);
    std::vector<comm::RequestPtr> recvs, sends;
    std::vector<at::Tensor> landing;
    const int64_t recv_begin = recv_chunks.empty() ? 0 : recv_chunks.front().begin;
    for (size_t c = 0; c < recv_chunks.size(); ++c) {
      auto rc = recv_chunks[c];
      at::Tensor dst = reduce ? tmp.slice(0, rc.begin - recv_begin, rc.end - recv_begin) : flat.slice(0, rc.begin, rc.end);
      landing.push_back(dst);
      recvs.push_back(comm.recv_async(landing.back(), left, tag0 + static_cast<int>(c)));
    }
    std::vector<at::Tensor> outgoing;
    outgoing.reserve(send_chunks.size());
    for (size_t c = 0; c < send_chunks.size(); ++c) {
      outgoing.push_back(flat.slice(0, send_chunks[c].begin, send_chunks[c].end));
      sends.push_back(comm.send_async(outgoing.back(), right, tag0 + static_cast<int>(c)));
    }
    for (size_t c = 0; c < recvs.size(); ++c) {
      recvs[c]->wait(timeout);
      if (reduce) flat.slice(0, recv_chunks[c].begin, recv_chunks[c].end).add_(landing[c]);
    }
    for (auto& q : sends) q->wait(timeout);
  };

  int s = 0;
  for (int k = 0; k < n - 1; ++k, ++s) step(s, (r - k + n) % n, (r - k - 1 + 2 * n) % n, true);
  for (int k = 0; k < n - 1; ++k, ++s) step(s, (r + 1 - k + n) % n, (r - k + n) % n, false);
}

}  // namespace tandem::collectives
