// The pipeline-parallel step (--pp K). See step.h.
#include <torch/torch.h>

#include "step.h"
#include "tandem/util/check.h"

namespace tandem::train {

PipelineStep::PipelineStep(const TrainOptions& o, const Roles& roles, models::Model model, comm::CommunicatorPtr comm,
                           c10::Device model_device, const std::vector<int64_t>& sample_shape, obs::Trace* trace)
    : o_(o), model_(std::move(model)), comm_(std::move(comm)), device_(model_device) {
  pp::PipelineOptions po;
  po.stages = o.pp;
  po.micro_batches = o.micro_batches;
  po.schedule = pp::parse_schedule(o.schedule);
  po.balance = o.pp_balance;
  po.sync = o.strategy;
  po.ddp = ddp_options(o);
  po.micro_rows = std::max<int64_t>(1, o.batch_size / o.micro_batches);
  po.trace = trace;
  po.log = comm_->rank() == roles.log_rank && !o.quiet;
  pipe_ = std::make_unique<pp::Pipeline>(model_, comm_, po, sample_shape);
  // The whole model: parameters of other stages never get a gradient, and
  // SGD skips those.
  optimizer_ = std::make_unique<torch::optim::SGD>(model_.module->parameters(),
                                                   torch::optim::SGDOptions(o.lr).momentum(o.momentum));
}

StepOutput PipelineStep::run(data::Batch& batch, int64_t, int64_t) {
  StepOutput out;
  out.begin = Clock::now();
  out.synced = true;
  data::make_ready(batch, device_);
  const bool first = pipe_->stage() == 0, last = pipe_->last_stage();
  const bool async_copy = device_.is_cuda();
  at::Tensor x = first ? batch.input.to(device_, async_copy) : at::Tensor();
  at::Tensor y = last ? batch.target.to(device_, async_copy) : at::Tensor();
  out.xfer = out.fwd = Clock::now();
  const auto st = pipe_->step(batch.input.size(0), x, y, last ? batch.mask : at::Tensor());
  // Forward and backward interleave; the schedule is one span.
  out.bwd = out.sync = Clock::now();
  // Activations and gradients to the neighbours, and the stage's gradient average.
  out.bytes = st.bytes_sent + (pipe_->gsync() ? pipe_->gsync()->last_times().bytes : 0);
  out.opt = Clock::now();
  optimizer_->step();
  out.end = Clock::now();
  // Only the last stage sees the loss; the others count nothing, so that
  // the sums over ranks count every sample once per replica.
  if (last) {
    out.loss = st.loss;
    out.correct = st.correct;
    out.count = st.count;
  }
  busy_ += st.busy_s;
  wait_ += st.wait_s;
  span_ += st.span_s;
  steps_ += 1;
  peak_ = std::max(peak_, st.peak_activation_bytes);
  return out;
}

void PipelineStep::consolidate() {
  pipe_->consolidate();
  // The momentum too, so that a checkpoint written by rank 0 holds every
  // stage's. A rank keeps the others' copies but never steps them (no
  // gradient), and its own are the owner's already.
  const auto params = model_.module->parameters();
  std::vector<at::Tensor> momentum;
  for (const auto& p : params) {
    auto m = momentum_of(*optimizer_, p);
    momentum.push_back(m.defined() ? m : torch::zeros_like(p));
  }
  pipe_->broadcast_from_owners(momentum);
  // With dampening 0, a zero buffer steps exactly like none.
  for (size_t i = 0; i < params.size(); ++i) set_momentum(*optimizer_, params[i], momentum[i]);
}

nlohmann::json PipelineStep::describe() {
  const int K = o_.pp, W = comm_->size(), rank = comm_->rank();
  // Each rank's row: busy, wait, span, steps, peak bytes; summed over ranks.
  auto rows = torch::zeros({W, 5}, torch::kFloat64);
  rows[rank][0] = busy_;
  rows[rank][1] = wait_;
  rows[rank][2] = span_;
  rows[rank][3] = steps_;
  rows[rank][4] = static_cast<double>(peak_);
  comm_->all_reduce(rows);
  const auto r = rows.accessor<double, 2>();
  nlohmann::json stages = nlohmann::json::array();
  const auto& cut = pipe_->cut();
  const auto pred = pipe_->predicted_stage_costs();
  const auto& blocks = model_.blocks;
  double bubble_sum = 0;
  for (int s = 0; s < K; ++s) {
    double busy = 0, wait = 0, span = 0, steps = 0, peak = 0;
    for (int d = 0; d < W / K; ++d) {
      const int q = d * K + s;
      busy += r[q][0];
      wait += r[q][1];
      span += r[q][2];
      steps += r[q][3];
      peak = std::max(peak, r[q][4]);
    }
    const double bubble = span > 0 ? 1.0 - busy / span : 0.0;
    bubble_sum += bubble;
    nlohmann::json names = nlohmann::json::array();
    for (int i = cut[s]; i < cut[s + 1]; ++i) names.push_back(blocks[static_cast<size_t>(i)].name);
    stages.push_back({{"stage", s},
                      {"blocks", {cut[s], cut[s + 1]}},
                      {"block_names", names},
                      {"predicted", pred[static_cast<size_t>(s)]},
                      {"busy_per_step_s", steps > 0 ? busy / steps : 0.0},
                      {"wait_per_step_s", steps > 0 ? wait / steps : 0.0},
                      {"span_per_step_s", steps > 0 ? span / steps : 0.0},
                      {"bubble_fraction", bubble},
                      {"peak_activation_bytes", static_cast<int64_t>(peak)}});
  }
  return {{"stages", K},
          {"replicas", W / K},
          {"micro_batches", o_.micro_batches},
          {"schedule", o_.schedule},
          {"balance", o_.pp_balance},
          {"predicted_unit", o_.pp_balance == "time" ? "seconds" : "parameters"},
          {"cut", cut},
          {"per_stage", stages},
          {"bubble_fraction", bubble_sum / K},
          {"theory_bubble", pp::theory_bubble(K, o_.micro_batches)}};
}

}  // namespace tandem::train
