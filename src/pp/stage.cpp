// One pipeline stage running its schedule. See include/tandem/pp/pipeline.h.
#include <algorithm>

#include <torch/torch.h>

#include "tandem/pp/pipeline.h"
#include "tandem/util/check.h"
#include "tandem/util/clock.h"

namespace tandem::pp {
namespace {

// What a stage holds for one micro-batch between its forward and backward.
struct Micro {
  int64_t begin = 0, rows = 0;
  at::Tensor in, out, loss;     // out: the last block's output (logits on the last stage)
  comm::RequestPtr recv_act, recv_grad;
  at::Tensor act_buf, grad_buf;  // receive buffers (CPU: Gloo's point-to-point takes CPU tensors)
  comm::RequestPtr send_act;    // the output going to the next stage (kept until it has arrived)
  at::Tensor send_buf;
  int64_t held = 0;             // bytes of `in` and every block output
};

int64_t bytes_of(const at::Tensor& t) { return t.defined() ? t.numel() * static_cast<int64_t>(t.element_size()) : 0; }

}  // namespace

Stage::Stage(std::vector<models::Block> blocks, comm::CommunicatorPtr comm, StageOptions o)
    : blocks_(std::move(blocks)), comm_(std::move(comm)), o_(std::move(o)) {
  TANDEM_CHECK(!blocks_.empty(), "pipeline stage ", o_.stage, " has no blocks");
  TANDEM_CHECK(o_.stages >= 1 && o_.stage >= 0 && o_.stage < o_.stages, "pipeline stage ", o_.stage, " of ",
               o_.stages, " does not exist");
  TANDEM_CHECK(o_.micro_batches >= 1, "--micro-batches must be >= 1, got ", o_.micro_batches);
  TANDEM_CHECK(o_.stage == 0 || (o_.prev >= 0 && !o_.input_shape.empty()),
               "pipeline stage ", o_.stage, " needs the previous stage's rank and its input shape");
  TANDEM_CHECK(o_.stage == o_.stages - 1 || o_.next >= 0, "pipeline stage ", o_.stage, " needs the next stage's rank");
  for (const auto& b : blocks_)
    for (auto& p : b.parameters()) params_.push_back(p);
}


const StageOps& Stage::ops(int micro) {
  auto it = schedules_.find(micro);
  if (it == schedules_.end())
    it = schedules_.emplace(micro, make_schedule(o_.schedule, o_.stages, micro)[static_cast<size_t>(o_.stage)]).first;
  return it->second;
}

StageStats Stage::run(int64_t rows, const at::Tensor& input, const at::Tensor& target, const at::Tensor& mask,
                      const std::function<void(bool)>& before_backward) {
  namespace F = torch::nn::functional;
  TANDEM_CHECK(rows >= 1, "pipeline step on an empty batch");
  const bool first = o_.stage == 0, last = o_.stage == o_.stages - 1;
  TANDEM_CHECK(!first || (input.defined() && input.size(0) == rows), "pipeline stage 0 needs the batch's ", rows,
               " input rows");
  TANDEM_CHECK(!last || (target.defined() && target.size(0) == rows), "the last pipeline stage needs the batch's ",
               rows, " targets");
  const int M = static_cast<int>(std::min<int64_t>(o_.micro_batches, rows));
  const StageOps& schedule = ops(M);
  // Where the stage computes: its parameters' device (the input's for a stage without any).
  const c10::Device device = params_.empty() ? (input.defined() ? input.device() : c10::Device(c10::kCPU))
                                             : params_.front().device();
  auto cpu = [](const at::Tensor& t) { return t.is_cpu() ? t.contiguous() : t.to(at::kCPU).contiguous(); };

  // Micro-batch sizes differ by at most one; the first ones take the extra rows.
  std::vector<Micro> mb(static_cast<size_t>(M));
  for (int m = 0, begin = 0; m < M; ++m) {
    mb[m].begin = begin;
    mb[m].rows = rows / M + (m < rows % M ? 1 : 0);
    begin += static_cast<int>(mb[m].rows);
  }
  at::Tensor valid_t = last && mask.defined() ? mask.sum() : at::Tensor();
  const double valid = last ? (mask.defined() ? std::max(1.0, valid_t.item<double>()) : static_cast<double>(rows)) : 1.0;
  const int fwd_tag = o_.tag, bwd_tag = o_.tag + M;

  StageStats st;
  st.micro_batches = M;
  st.op_s.reserve(schedule.size());
  at::Tensor loss_sum, hits;  // last stage: read once, after the schedule
  comm::RequestPtr grad_send;  // the previous backward's input gradient, until it has arrived
  at::Tensor grad_send_buf;
  int64_t held = 0;
  const auto t_run = Clock::now();
  const std::string track = "stage " + std::to_string(o_.stage);
  auto trace = [&](const char* what, int micro, Clock::time_point a, Clock::time_point b) {
    if (o_.trace) o_.trace->span(std::string(what) + std::to_string(micro), track, a, b);
  };
  auto post_act = [&](int m) {
    if (first || m >= M || mb[m].recv_act) return;
    std::vector<int64_t> shape{mb[m].rows};
    shape.insert(shape.end(), o_.input_shape.begin(), o_.input_shape.end());
    mb[m].act_buf = at::empty(shape, at::kFloat);
    mb[m].recv_act = comm_->recv_async(mb[m].act_buf, o_.prev, fwd_tag + m);
  };
  auto wait = [&](comm::RequestPtr& r, const char* what, int micro) {
    const auto t0 = Clock::now();
    r->wait(comm_->timeout());
    r.reset();
    const auto t1 = Clock::now();
    st.wait_s += seconds(t1 - t0);
    trace(what, micro, t0, t1);
  };
  auto send = [&](at::Tensor t, int to, int tag, comm::RequestPtr& req, at::Tensor& keep) {
    keep = cpu(t);
    st.bytes_sent += bytes_of(keep);
    req = comm_->send_async(keep, to, tag);
  };

  for (const Op& op : schedule) {
    auto& u = mb[op.micro];
    if (op.kind == Op::kForward) {
      if (first) {
        u.in = input.slice(0, u.begin, u.begin + u.rows);
        // An input that asks for its gradient gets it computed here, as every
        // other stage's is, into a leaf of its own (nothing is before the
        // first stage to receive it); a view would accumulate into the whole batch.
        if (u.in.requires_grad()) u.in = u.in.detach().requires_grad_(true);
      } else {
        post_act(op.micro);
        post_act(op.micro + 1);  // one ahead: its transfer overlaps this forward
        wait(u.recv_act, "recv activation ", op.micro);
        u.in = u.act_buf.to(device).requires_grad_(true);
      }
      const auto t0 = Clock::now();
      at::Tensor x = u.in;
      u.held = bytes_of(x);
      for (const auto& b : blocks_) {
        x = b.forward(x);
        u.held += bytes_of(x);
      }
      u.out = x;
      if (last) {
        auto y = target.slice(0, u.begin, u.begin + u.rows).to(device);
        auto per = F::cross_entropy(x, y, F::CrossEntropyFuncOptions().reduction(torch::kNone));
        auto hit = x.argmax(1).eq(y);
        if (mask.defined()) {
          auto mk = mask.slice(0, u.begin, u.begin + u.rows).to(x.device());
          per = per * mk;
          hit = hit & mk.to(at::kBool);
        }
        u.loss = per.sum() / valid;
        auto l = u.loss.detach();
        loss_sum = loss_sum.defined() ? loss_sum + l : l;
        auto h = hit.sum();
        hits = hits.defined() ? hits + h : h;
      } else {
        // The gradient of this output comes back from the next stage: post its receive now.
        u.grad_buf = at::empty(x.sizes(), at::kFloat);
        u.recv_grad = comm_->recv_async(u.grad_buf, o_.next, bwd_tag + op.micro);
        send(x.detach(), o_.next, fwd_tag + op.micro, u.send_act, u.send_buf);
      }
      held += u.held;
      st.peak_activation_bytes = std::max(st.peak_activation_bytes, held);
      const auto t1 = Clock::now();
      st.busy_s += seconds(t1 - t0);
      st.op_s.push_back(seconds(t1 - t0));
      trace("F", op.micro, t0, t1);
    } else {
      const bool final_op = &op == &schedule.back();
      if (before_backward) before_backward(final_op);
      if (!last) {
        wait(u.recv_grad, "recv gradient ", op.micro);
        // Its gradient is back, so the next stage has the activation: the send is done.
        wait(u.send_act, "send activation ", op.micro);
      }
      const auto t0 = Clock::now();
      if (last) u.loss.backward();
      else u.out.backward(u.grad_buf.to(device));
      if (!first) {
        if (grad_send) wait(grad_send, "send gradient ", op.micro - 1);  // the previous one; usually arrived
        send(u.in.grad(), o_.prev, bwd_tag + op.micro, grad_send, grad_send_buf);
      }
      held -= u.held;
      u = Micro{};  // frees the activations
      const auto t1 = Clock::now();
      st.busy_s += seconds(t1 - t0);
      st.op_s.push_back(seconds(t1 - t0));
      trace("B", op.micro, t0, t1);
    }
  }
  if (grad_send) wait(grad_send, "send gradient ", M - 1);  // the tensor must live until delivered
  if (last) {
    st.loss = loss_sum.item<double>();
    st.correct = hits.item<double>();
    st.count = mask.defined() ? valid_t.item<double>() : static_cast<double>(rows);
  }
  st.span_s = seconds_since(t_run);
  return st;
}

}  // namespace tandem::pp
