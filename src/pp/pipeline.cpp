// A model's pipeline on one rank of D x K: the cut, the stage, the stage's
// data-parallel group. See include/tandem/pp/pipeline.h.
#include <cmath>
#include <cstdio>
#include <limits>
#include <unordered_map>

#include <torch/torch.h>

#include "tandem/pp/pipeline.h"
#include "tandem/sync/ring_sync.h"
#include "tandem/util/check.h"

namespace tandem::pp {
namespace {

// Every rank gets rank `root`'s values of `tensors` (float32 ones in one
// message; any other type, e.g. batch norm's step count, one by one).
void broadcast_tensors(const std::vector<at::Tensor>& tensors, int root, comm::Communicator& comm) {
  torch::NoGradGuard guard;
  std::vector<at::Tensor> floats;
  for (const auto& t : tensors) {
    if (t.scalar_type() == at::kFloat) {
      floats.push_back(t);
    } else {
      auto c = t.to(at::kCPU).contiguous();
      comm.broadcast(c, root);
      if (comm.rank() != root) t.copy_(c);
    }
  }
  if (floats.empty()) return;
  std::vector<at::Tensor> flat_parts;
  for (const auto& t : floats) flat_parts.push_back(t.detach().to(at::kCPU).reshape({-1}));
  auto flat = at::cat(flat_parts);
  comm.broadcast(flat, root);
  if (comm.rank() == root) return;
  int64_t off = 0;
  for (const auto& t : floats) {
    t.copy_(flat.slice(0, off, off + t.numel()).view(t.sizes()));
    off += t.numel();
  }
}

}  // namespace

Pipeline::Pipeline(models::Model model, comm::CommunicatorPtr comm, PipelineOptions o, std::vector<int64_t> sample_shape)
    : model_(std::move(model)), comm_(std::move(comm)), o_(std::move(o)) {
  const int K = o_.stages, W = comm_->size(), rank = comm_->rank();
  const int n = static_cast<int>(model_.blocks.size());
  // Checked before any communication, so that every rank fails alike.
  TANDEM_CHECK(K >= 1, "--pp must be >= 1 stage, got ", K);
  TANDEM_CHECK(W % K == 0, "--pp ", K, ": the world size ", W, " is not a multiple of the stage count; start "
               "D x ", K, " ranks (D data-parallel replicas of a ", K, "-stage pipeline)");
  TANDEM_CHECK(o_.micro_batches >= 1, "--micro-batches must be >= 1, got ", o_.micro_batches);
  TANDEM_CHECK(n >= K, "--pp ", K, ": the model has only ", n, " blocks to cut into stages; use --pp <= ", n);
  TANDEM_CHECK(o_.balance == "time" || o_.balance == "params", "--pp-balance '", o_.balance,
               "' is unknown: choose time (profiled) or params");
  TANDEM_CHECK(o_.sync == "ddp" || o_.sync == "ring", "pipeline stages synchronise their replicas with ddp or ring, "
               "not '", o_.sync, "'");
  TANDEM_CHECK(o_.micro_rows >= 1, "pipeline profile: micro_rows must be >= 1");
  const int s = rank % K;
  stage_index_ = s;
  replica_ = rank / K;
  replicas_ = W / K;

  // Each block's input shape, and the costs to cut by.
  const auto device = model_.module->parameters().empty() ? c10::Device(c10::kCPU)
                                                           : model_.module->parameters().front().device();
  std::vector<int64_t> shape{o_.micro_rows};
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  std::vector<std::vector<int64_t>> in_shape;
  {
    torch::NoGradGuard guard;
    const bool training = model_.module->is_training();
    model_.module->eval();  // no batch-norm statistics move
    at::Tensor x = at::zeros(shape, at::TensorOptions(device));
    for (const auto& b : model_.blocks) {
      in_shape.emplace_back(x.sizes().begin() + 1, x.sizes().end());
      x = b.forward(x);
    }
    model_.module->train(training);
  }
  if (o_.balance == "params") {
    costs_ = block_params(model_.blocks);
  } else {
    // Rank 0 measures, everyone cuts by its numbers. A failed profile
    // (out of memory, say) is sent as NaN, so that every rank fails now
    // instead of waiting for a broadcast until the timeout.
    auto t = at::zeros({n}, at::kDouble);
    std::string failure;
    if (rank == 0) {
      try {
        auto c = profile_blocks(model_.blocks, at::randn(shape, at::TensorOptions(device)));
        for (int i = 0; i < n; ++i) t[i] = c[static_cast<size_t>(i)];
      } catch (const std::exception& e) {
        failure = e.what();
        t.fill_(std::numeric_limits<double>::quiet_NaN());
      }
    }
    comm_->broadcast(t, 0);
    costs_.assign(t.data_ptr<double>(), t.data_ptr<double>() + n);
    TANDEM_CHECK(std::isfinite(costs_.front()), "--pp-balance time: profiling the model's blocks on rank 0 failed",
                 failure.empty() ? std::string(" (see rank 0's message)") : ": " + failure,
                 "; use --pp-balance params, or a smaller --batch-size");
  }
  cut_ = partition_min_max(costs_, K);
  if (o_.log) {
    const auto pred = predicted_stage_costs();
    std::string line;
    for (int k = 0; k < K; ++k) {
      char buf[160];
      const auto& first = model_.blocks[static_cast<size_t>(cut_[k])].name;
      const auto& lastb = model_.blocks[static_cast<size_t>(cut_[k + 1] - 1)].name;
      if (o_.balance == "time")
        std::snprintf(buf, sizeof buf, "%sstage %d = %s..%s (%.2f ms)", k ? ", " : "", k, first.c_str(), lastb.c_str(),
                      pred[static_cast<size_t>(k)] * 1e3);
      else
        std::snprintf(buf, sizeof buf, "%sstage %d = %s..%s (%.0f parameters)", k ? ", " : "", k, first.c_str(),
                      lastb.c_str(), pred[static_cast<size_t>(k)]);
      line += buf;
    }
    std::fprintf(stderr, "[tandem] pp: %d stage%s x %d replica%s, %s, %d micro-batches; cut by %s: %s\n", K,
                 K == 1 ? "" : "s", replicas_, replicas_ == 1 ? "" : "s", schedule_name(o_.schedule), o_.micro_batches,
                 o_.balance.c_str(), line.c_str());
  }

  StageOptions so;
  so.schedule = o_.schedule;
  so.stages = K;
  so.stage = s;
  so.micro_batches = o_.micro_batches;
  so.prev = s > 0 ? rank - 1 : -1;
  so.next = s < K - 1 ? rank + 1 : -1;
  so.input_shape = in_shape[static_cast<size_t>(cut_[s])];
  so.trace = o_.trace;
  std::vector<models::Block> mine(model_.blocks.begin() + cut_[s], model_.blocks.begin() + cut_[s + 1]);
  stage_ = std::make_unique<Stage>(std::move(mine), comm_, so);

  // The stage's data-parallel group: the same stage of every replica.
  std::vector<int> ranks;
  for (int d = 0; d < replicas_; ++d) ranks.push_back(d * K + s);
  group_ = comm_->sub_group(ranks, o_.name + ".stage" + std::to_string(s));
  if (replicas_ > 1) {
    stage_module_ = std::make_shared<torch::nn::Module>("PipelineStage");
    int i = 0;
    for (auto& p : stage_->parameters()) stage_module_->register_parameter("p" + std::to_string(i++), p);
    if (o_.sync == "ddp") gsync_ = std::make_unique<sync::DistributedDataParallel>(stage_module_, group_, o_.ddp);
    else gsync_ = std::make_unique<sync::RingSync>(stage_module_, group_, o_.ddp);
  }
}

Pipeline::~Pipeline() = default;

std::vector<double> Pipeline::predicted_stage_costs() const {
  std::vector<double> out;
  for (size_t k = 0; k + 1 < cut_.size(); ++k) {
    double c = 0;
    for (int i = cut_[k]; i < cut_[k + 1]; ++i) c += costs_[static_cast<size_t>(i)];
    out.push_back(c);
  }
  return out;
}

StageStats Pipeline::step(int64_t rows, const at::Tensor& input, const at::Tensor& target, const at::Tensor& mask) {
  for (auto& p : stage_->parameters()) p.mutable_grad() = at::Tensor();
  if (gsync_) gsync_->begin_step(false);  // the micro-batches accumulate locally...
  auto st = stage_->run(rows, input, target, mask, [this](bool last) {
    if (gsync_ && last) gsync_->begin_step(true);  // ...and the last backward averages over replicas
  });
  if (gsync_) gsync_->finish();
  return st;
}

void Pipeline::consolidate() {
  for (int k = 0; k < o_.stages; ++k) {
    std::vector<at::Tensor> tensors;
    for (int i = cut_[k]; i < cut_[k + 1]; ++i) {
      const auto& b = model_.blocks[static_cast<size_t>(i)];
      for (auto& p : b.parameters()) tensors.push_back(p);
      for (auto& t : b.buffers()) tensors.push_back(t);
    }
    broadcast_tensors(tensors, /*root: replica 0's stage k=*/k, *comm_);
  }
}

void Pipeline::broadcast_from_owners(std::vector<at::Tensor>& per_param) {
  const auto params = model_.module->parameters();
  TANDEM_CHECK(per_param.size() == params.size(), "broadcast_from_owners: ", per_param.size(), " tensors for ",
               params.size(), " parameters");
  std::unordered_map<const void*, size_t> index;
  for (size_t i = 0; i < params.size(); ++i) index[params[i].unsafeGetTensorImpl()] = i;
  for (int k = 0; k < o_.stages; ++k) {
    std::vector<at::Tensor> tensors;
    for (int i = cut_[k]; i < cut_[k + 1]; ++i)
      for (auto& p : model_.blocks[static_cast<size_t>(i)].parameters()) {
        auto it = index.find(p.unsafeGetTensorImpl());
        TANDEM_CHECK(it != index.end(), "broadcast_from_owners: a block parameter is not the model's");
        tensors.push_back(per_param[it->second]);
      }
    broadcast_tensors(tensors, k, *comm_);
  }
}

}  // namespace tandem::pp
