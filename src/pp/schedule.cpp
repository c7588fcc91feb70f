// Schedules, the min-max cut and the block profile. See include/tandem/pp/pipeline.h.
#include <algorithm>
#include <limits>

#include <torch/cuda.h>
#include <torch/torch.h>

#include "tandem/pp/pipeline.h"
#include "tandem/util/check.h"
#include "tandem/util/clock.h"

namespace tandem::pp {

ScheduleKind parse_schedule(const std::string& s) {
  if (s == "gpipe") return ScheduleKind::kGPipe;
  if (s == "1f1b") return ScheduleKind::k1F1B;
  TANDEM_FAIL("--schedule '", s, "' is unknown: choose gpipe (all forwards, then all backwards) or 1f1b "
              "(one forward, one backward; activations of at most K micro-batches)");
}

const char* schedule_name(ScheduleKind k) { return k == ScheduleKind::kGPipe ? "gpipe" : "1f1b"; }

std::vector<StageOps> make_schedule(ScheduleKind kind, int stages, int micro_batches) {
  TANDEM_CHECK(stages >= 1, "--pp must be >= 1 stage, got ", stages);
  TANDEM_CHECK(micro_batches >= 1, "--micro-batches must be >= 1, got ", micro_batches);
  std::vector<StageOps> out(static_cast<size_t>(stages));
  for (int s = 0; s < stages; ++s) {
    auto& ops = out[static_cast<size_t>(s)];
    int f = 0, b = 0;
    // GPipe: every forward first. 1F1B: as many forwards as the stages after
    // this one need to fill, then alternate, then drain.
    const int warmup = kind == ScheduleKind::kGPipe ? micro_batches : std::min(stages - 1 - s, micro_batches);
    while (f < warmup) ops.push_back({Op::kForward, f++});
    while (f < micro_batches) {
      ops.push_back({Op::kForward, f++});
      ops.push_back({Op::kBackward, b++});
    }
    while (b < micro_batches) ops.push_back({Op::kBackward, b++});
  }
  return out;
}

int max_in_flight(const StageOps& ops) {
  int held = 0, most = 0;
  for (const auto& op : ops) {
    held += op.kind == Op::kForward ? 1 : -1;
    most = std::max(most, held);
  }
  return most;
}

double theory_bubble(int stages, int micro_batches) {
  return static_cast<double>(stages - 1) / static_cast<double>(micro_batches + stages - 1);
}

std::vector<double> simulate_bubble(const std::vector<StageOps>& schedule, const std::vector<std::vector<double>>& op_s) {
  const size_t K = schedule.size();
  TANDEM_CHECK(K >= 1 && op_s.size() == K, "simulate_bubble: ", K, " stages, ", op_s.size(), " lists of op times");
  int M = 0;
  for (size_t s = 0; s < K; ++s) {
    TANDEM_CHECK(op_s[s].size() == schedule[s].size(), "simulate_bubble: stage ", s, " has ", schedule[s].size(),
                 " ops and ", op_s[s].size(), " op times");
    for (const auto& op : schedule[s]) M = std::max(M, op.micro + 1);
  }
  const double kNotYet = std::numeric_limits<double>::infinity();
  // When each stage's forward / backward of each micro-batch ends.
  std::vector<std::vector<double>> fwd_end(K, std::vector<double>(static_cast<size_t>(M), kNotYet)), bwd_end = fwd_end;
  std::vector<size_t> next(K, 0);
  std::vector<double> free_at(K, 0.0), busy(K, 0.0);
  // Sweeps the stages, running each one's next op whose input is done,
  // until none is left (make_schedule's schedules never deadlock; a list
  // that did would leave ops unrun and is refused).
  for (bool moved = true; moved;) {
    moved = false;
    for (size_t s = 0; s < K; ++s)
      while (next[s] < schedule[s].size()) {
        const Op op = schedule[s][next[s]];
        const auto m = static_cast<size_t>(op.micro);
        const double ready = op.kind == Op::kForward ? (s == 0 ? 0.0 : fwd_end[s - 1][m])
                                                     : (s + 1 == K ? fwd_end[s][m] : bwd_end[s + 1][m]);
        if (ready == kNotYet) break;
        const double t = op_s[s][next[s]];
        const double end = std::max(free_at[s], ready) + t;
        (op.kind == Op::kForward ? fwd_end : bwd_end)[s][m] = end;
        free_at[s] = end;
        busy[s] += t;
        ++next[s];
        moved = true;
      }
  }
  for (size_t s = 0; s < K; ++s)
    TANDEM_CHECK(next[s] == schedule[s].size(), "simulate_bubble: stage ", s, "'s ops wait on each other forever");
  const double span = *std::max_element(free_at.begin(), free_at.end());
  std::vector<double> idle(K, 0.0);
  for (size_t s = 0; s < K; ++s) idle[s] = span > 0 ? 1.0 - busy[s] / span : 0.0;
  return idle;
}

std::vector<int> partition_min_max(const std::vector<double>& costs, int stages) {
  const int n = static_cast<int>(costs.size());
  TANDEM_CHECK(stages >= 1, "--pp must be >= 1 stage, got ", stages);
  TANDEM_CHECK(stages <= n, "--pp ", stages, ": the model has only ", n, " blocks to cut into stages; use --pp <= ", n);
  std::vector<double> prefix(static_cast<size_t>(n) + 1, 0.0);
  for (int i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + costs[static_cast<size_t>(i)];
  auto sum = [&](int a, int b) { return prefix[b] - prefix[a]; };
  // best[k][i]: the smallest largest-stage cost of the first i blocks in k
  // stages; from[k][i]: where its last stage starts. O(K n^2): n is tens.
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> best(stages + 1, std::vector<double>(n + 1, inf));
  std::vector<std::vector<int>> from(stages + 1, std::vector<int>(n + 1, 0));
  best[0][0] = 0;
  for (int k = 1; k <= stages; ++k)
    for (int i = k; i <= n; ++i)
      for (int j = k - 1; j < i; ++j) {
        const double v = std::max(best[k - 1][j], sum(j, i));
        if (v < best[k][i]) {  // strict: the earliest cut wins ties
          best[k][i] = v;
          from[k][i] = j;
        }
      }
  std::vector<int> cut(static_cast<size_t>(stages) + 1);
  cut[stages] = n;
  for (int k = stages, i = n; k >= 1; --k) {
    i = from[k][i];
    cut[k - 1] = i;
  }
  return cut;
}

std::vector<double> block_params(const std::vector<models::Block>& blocks) {
  std::vector<double> out;
  for (const auto& b : blocks) {
    double n = 0;
    for (const auto& p : b.parameters()) n += static_cast<double>(p.numel());
    out.push_back(n);
  }
  return out;
}

std::vector<double> profile_blocks(const std::vector<models::Block>& blocks, const at::Tensor& input, int repeats) {
  TANDEM_CHECK(repeats >= 1, "profile_blocks: repeats must be >= 1");
  // Batch-norm statistics move in train mode: keep them as they were.
  std::vector<at::Tensor> saved;
  for (const auto& b : blocks)
    for (const auto& t : b.buffers()) saved.push_back(t.clone());
  std::vector<std::vector<double>> runs(blocks.size());
  // A device runs asynchronously: time what it did, not what was queued.
  const bool cuda = input.is_cuda();
  auto sync = [cuda] {
    if (cuda) torch::cuda::synchronize();
  };
  for (int rep = 0; rep <= repeats; ++rep) {
    at::Tensor x = input;
    for (size_t i = 0; i < blocks.size(); ++i) {
      auto in = x.detach().requires_grad_(i > 0);
      sync();
      const auto t0 = Clock::now();
      auto y = blocks[i].forward(in);
      auto g = torch::ones_like(y);
      y.backward(g);
      sync();
      if (rep > 0) runs[i].push_back(seconds_since(t0));  // the first run warms up
      x = y.detach();
    }
  }
  torch::NoGradGuard guard;
  size_t k = 0;
  for (const auto& b : blocks) {
    for (auto& p : b.parameters()) p.mutable_grad() = at::Tensor();
    for (auto& t : b.buffers()) t.copy_(saved[k++]);
  }
  std::vector<double> out;
  for (auto& r : runs) {
    std::sort(r.begin(), r.end());
    out.push_back(r[r.size() / 2]);
  }
  return out;
}

}  // namespace tandem::pp
