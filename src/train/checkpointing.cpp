// Checkpoints of a training run, and resuming from them. See checkpointing.h.
#include "checkpointing.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <type_traits>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "tandem/comm/env.h"
#include "tandem/models/weights.h"
#include "tandem/util/check.h"

namespace tandem::train {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kModelFile = "model.pt";
constexpr const char* kOptimFile = "optim.pt";
constexpr const char* kStateFile = "state.json";
constexpr const char* kProgressFile = "progress.json";

// The key of a parameter in torch::optim's state map: LibTorch 1.x keys it by
// the printed TensorImpl address, 2.x by the address itself.
template <class Map>
typename Map::key_type state_key(const Map&, at::TensorImpl* impl) {
  using Key = typename Map::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream s;
    s << impl;
    return s.str();
  } else {
    return static_cast<Key>(impl);
  }
}

// The momentum buffer of each named parameter that has one.
std::vector<std::pair<std::string, at::Tensor>> momentum_buffers(torch::nn::Module& module,
                                                                 torch::optim::SGD& opt) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : module.named_parameters(/*recurse=*/true))
    if (auto m = momentum_of(opt, p.value()); m.defined()) out.emplace_back(p.key(), m);
  return out;
}

std::string pickle(const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& [k, v] : tensors) dict.insert(k, v);
  const std::vector<char> bytes = torch::pickle_save(c10::IValue(dict));
  return std::string(bytes.begin(), bytes.end());
}

// A copy on the CPU that training cannot change while the writer serialises it.
at::Tensor snapshot(const at::Tensor& t) {
  auto c = t.detach().to(at::kCPU, /*non_blocking=*/false, /*copy=*/true);
  return c.is_contiguous() ? c : c.contiguous();
}

std::string to_hex(const at::Tensor& bytes) {
  static const char* digits = "0123456789abcdef";
  auto b = bytes.contiguous();
  const auto* p = b.data_ptr<uint8_t>();
  std::string s;
  s.reserve(static_cast<size_t>(b.numel()) * 2);
  for (int64_t i = 0; i < b.numel(); ++i) {
    s.push_back(digits[p[i] >> 4]);
    s.push_back(digits[p[i] & 15]);
  }
  return s;
}

at::Tensor from_hex(const std::string& s, const std::string& where) {
  TANDEM_CHECK(s.size() % 2 == 0, where, ": the RNG state is not a hex string");
  auto t = at::empty({static_cast<int64_t>(s.size() / 2)}, at::kByte);
  auto* p = t.data_ptr<uint8_t>();
  auto nib = [&](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    TANDEM_FAIL(where, ": the RNG state is not a hex string");
  };
  for (size_t i = 0; i < s.size() / 2; ++i) p[i] = static_cast<uint8_t>(nib(s[2 * i]) * 16 + nib(s[2 * i + 1]));
  return t;
}

int64_t read_progress(const std::string& dir) {
  std::ifstream f(fs::path(dir) / kProgressFile);
  if (!f) return -1;
  try {
    return json::parse(f).at("global_step").get<int64_t>();
  } catch (const std::exception&) {
    return -1;  // a torn record only costs the steps_redone count
  }
}

// Rank 0's choice for find_resume_point: "P<path>" or "N" (start fresh).
std::string pick_checkpoint(const TrainOptions& o, bool implicit, bool log) {
  const std::string where = (o.resume.empty() || o.resume == "latest") ? o.checkpoint_dir : o.resume;
  TANDEM_CHECK(!where.empty(), "--resume latest needs --checkpoint-dir D (or give --resume PATH)");
  if (fs::exists(fs::path(where) / "manifest.json")) {
    ckpt::verify(where);  // an explicit checkpoint: damage is an error, no fallback
    return "P" + where;
  }
  auto good = ckpt::latest_good(where, [log](const std::string& w) {
    if (log) std::fprintf(stderr, "[tandem] warning: %s\n", w.c_str());
  });
  if (good) return "P" + *good;
  TANDEM_CHECK(implicit, "--resume: no usable checkpoint in ", where,
               " (train with --checkpoint-dir to make some, or drop --resume)");
  return "N";
}

// A fresh run must not write into another run's checkpoints: a later restart
// would resume the other run, and pruning would keep its steps.
std::string check_fresh(const std::string& dir) {
  const auto old = ckpt::list_checkpoints(dir);
  TANDEM_CHECK(old.empty(), "--checkpoint-dir ", dir, " holds checkpoints of an earlier run (", old.back(),
               "): pass --resume to continue that run, or give an empty or new --checkpoint-dir");
  return "N";
}

}  // namespace

// What must match for a checkpoint to continue this run. `world` is part of
// it only for the parameter server (its shards); ddp and ring re-shard.
nlohmann::json fingerprint(const TrainOptions& o, const Roles& roles, int world, const std::vector<int64_t>& sample_shape,
                           int64_t num_classes, int64_t train_size) {
  json f{{"model", o.model},       {"dataset", o.dataset},       {"limit", o.limit},
         {"sample_shape", sample_shape}, {"num_classes", num_classes}, {"strategy", o.strategy},
         {"train_size", train_size}, {"seed", o.seed},         {"grad_accum", o.grad_accum}};
  if (roles.ps) f.update({{"ps_servers", o.ps_servers}, {"ps_mode", o.ps_mode}, {"world_size", world}});
  return f;
}

int restart_count() {
  // tandem's launcher, torchrun's, or Slurm's (srun --requeue).
  for (const char* name : {env::kRestartCount, env::kTorchElasticRestartCount, "SLURM_RESTART_COUNT"}) {
    const char* v = std::getenv(name);
    if (!v || !*v) continue;
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    TANDEM_CHECK(*end == '\0' && n >= 0, name, "='", v, "' is not a restart count (a number >= 0)");
    return static_cast<int>(n);
  }
  return 0;
}

Checkpointer::Checkpointer(const TrainOptions& o, const Roles& roles, comm::CommunicatorPtr comm,
                           nlohmann::json fingerprint)
    : o_(o), roles_(roles), comm_(std::move(comm)), dir_(o.checkpoint_dir), fingerprint_(std::move(fingerprint)) {
  if (!dir_.empty() && comm_->rank() == roles.log_rank) {
    std::error_code ec;
    fs::create_directories(dir_, ec);  // for the progress record (rank 0's writer makes it too)
  }
  if (dir_.empty() || comm_->rank() != 0) return;
  ckpt::WriterOptions wo;
  wo.keep = o.keep_checkpoints;
  wo.log = [quiet = o.quiet](const std::string& line) {
    if (!quiet) std::fprintf(stderr, "[tandem] %s\n", line.c_str());
  };
  writer_ = std::make_unique<ckpt::Writer>(dir_, wo);
}

Checkpointer::~Checkpointer() = default;  // the writer finishes the write in flight

int64_t Checkpointer::next_due(int64_t global_step) const {
  if (dir_.empty() || o_.checkpoint_every <= 0) return std::numeric_limits<int64_t>::max();
  return (global_step / o_.checkpoint_every + 1) * o_.checkpoint_every;
}

bool Checkpointer::due_at_epoch_end(int64_t global_step, bool last_epoch) const {
  if (dir_.empty()) return false;
  return last_epoch || o_.checkpoint_every <= 0 || global_step % o_.checkpoint_every == 0;
}

void Checkpointer::note_progress(int64_t global_step, bool now_or_never) {
  if (dir_.empty() || comm_->rank() != roles_.log_rank) return;
  const auto now = Clock::now();
  if (!now_or_never && now - last_progress_ < std::chrono::milliseconds(200)) return;
  last_progress_ = now;
  std::error_code ec;
  const std::string path = (fs::path(dir_) / kProgressFile).string();
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << json{{"global_step", global_step}}.dump() << "\n";
    if (!f) return;  // best effort: a missing record only costs the steps_redone count
  }
  fs::rename(tmp, path, ec);
}

void Checkpointer::flush() {
  if (!writer_) return;
  try {
    writer_->flush();
  } catch (const Error& e) {
    std::fprintf(stderr, "[tandem] warning: the last checkpoint was not written: %s\n", e.what());
  }
}

void Checkpointer::take(const TrainState& st, const EpochSums& sums, double train_seconds, Step& step) {
  if (dir_.empty()) return;
  const auto t0 = Clock::now();
  step.consolidate();
  // The epoch's sums so far, over all ranks (rank 0's include what it carried
  // from an earlier resume).
  const EpochSums total = sum_over_ranks(sums, *comm_);
  auto slowest = torch::tensor({train_seconds}, torch::kFloat64);
  comm_->all_reduce(slowest, comm::ReduceOp::kMax);
  // The parameter servers' momentum, gathered on rank 0 (server 0).
  auto& module = *step.model().module;
  at::Tensor flat_momentum;
  int64_t ps_updates = 0;
  if (roles_.ps) {
    int64_t n = 0;
    for (const auto& p : module.parameters()) n += p.numel();
    flat_momentum = at::zeros({n}, module.parameters().front().options().device(at::kCPU));
    if (auto* server = step.server()) {
      auto m = server->momentum();
      auto r = server->layout().shard(server->shard_index());
      if (m.defined()) flat_momentum.slice(0, r.begin, r.end).copy_(m);
      ps_updates = server->updates();
    }
    comm_->reduce(flat_momentum, 0);
  }
  if (comm_->rank() != 0) return;

  const int64_t position =
      st.start_position + (st.step - st.done_before) * o_.batch_size * static_cast<int64_t>(roles_.trainers);
  json state{{"epoch", st.epoch},
             {"step", st.step},
             {"global_step", st.global_step},
             {"position", position},
             {"elapsed", st.elapsed + slowest.item<double>()},
             {"sums", total.to_vector()},  // EpochSums::to_vector's layout
             {"result", to_json(st.result)},
             {"rng", to_hex(at::detail::getDefaultCPUGenerator().get_state())},
             {"ps_updates", ps_updates},
             {"lr", o_.lr},
             {"momentum", o_.momentum},
             {"batch_size", o_.batch_size},
             {"trainers", roles_.trainers},
             {"fingerprint", fingerprint_}};
  std::vector<std::pair<std::string, at::Tensor>> model_copy, optim_copy;
  for (const auto& p : module.named_parameters(true)) model_copy.emplace_back(p.key(), snapshot(p.value()));
  for (const auto& b : module.named_buffers(true)) model_copy.emplace_back(b.key(), snapshot(b.value()));
  if (roles_.ps)
    optim_copy.emplace_back("ps.momentum", flat_momentum);
  else
    for (auto& [name, m] : momentum_buffers(module, step.optimizer())) optim_copy.emplace_back(name, snapshot(m));

  ckpt::Snapshot snap;
  snap.step = st.global_step;
  snap.meta = {{"epoch", st.epoch}, {"step", st.step}, {"strategy", o_.strategy}, {"model", o_.model}};
  snap.files.push_back({kModelFile, [m = std::move(model_copy)] { return pickle(m); }});
  snap.files.push_back({kOptimFile, [m = std::move(optim_copy)] { return pickle(m); }});
  snap.files.push_back({kStateFile, [s = std::move(state)] { return s.dump() + "\n"; }});
  const auto t1 = Clock::now();
  try {
    writer_->submit(std::move(snap));  // waits only if the previous write is still going
  } catch (const Error& e) {
    // Only rank 0 writes: failing here would leave the others waiting in the
    // next collective. Training goes on; the earlier checkpoints stay.
    std::fprintf(stderr, "[tandem] warning: checkpoint of step %lld not written: %s\n",
                 static_cast<long long>(st.global_step), e.what());
    return;
  }
  const auto t2 = Clock::now();
  if (o_.quiet) return;
  std::fprintf(stderr, "[tandem] checkpoint of step %lld: training paused %.3f s (snapshot %.3f s); "
               "the write goes on in the background\n",
               static_cast<long long>(st.global_step), seconds(t2 - t0), seconds(t1 - t0));
  if (seconds(t2 - t1) > 0.1)
    std::fprintf(stderr, "[tandem] note: training waited %.1f s for the previous checkpoint's write: writing "
                 "takes longer than --checkpoint-every %lld steps; raise it (or use a faster disk)\n",
                 seconds(t2 - t1), static_cast<long long>(o_.checkpoint_every));
}

std::optional<std::string> find_resume_point(const TrainOptions& o, comm::Communicator& comm, bool log) {
  // Resume when asked, or after a launcher restart of a checkpointed run.
  const bool implicit = o.resume.empty() && restart_count() > 0 && !o.checkpoint_dir.empty();
  const bool fresh = o.resume.empty() && !implicit && !o.checkpoint_dir.empty();
  if (o.resume.empty() && !implicit && !fresh) return std::nullopt;
  // Rank 0 decides; the others learn the outcome (path, none, or an error).
  constexpr int64_t kMax = 4096;
  auto msg = at::zeros({kMax}, at::kByte);
  if (comm.rank() == 0) {
    std::string outcome;  // "P<path>" | "N" | "E<error>"
    try {
      outcome = fresh ? check_fresh(o.checkpoint_dir) : pick_checkpoint(o, implicit, log);
    } catch (const std::exception& e) {
      outcome = std::string("E") + e.what();
    }
    if (static_cast<int64_t>(outcome.size()) > kMax) outcome.resize(kMax);
    std::memcpy(msg.data_ptr<uint8_t>(), outcome.data(), outcome.size());
  }
  comm.broadcast(msg, 0);
  const char* p = reinterpret_cast<const char*>(msg.data_ptr<uint8_t>());
  const std::string outcome(p, strnlen(p, kMax));
  if (outcome[0] == 'E') {
    if (comm.rank() == 0) TANDEM_FAIL(outcome.substr(1));
    TANDEM_FAIL("rank 0 could not resume: ", outcome.substr(1));
  }
  if (outcome[0] == 'N') {
    if (log && !fresh) std::fprintf(stderr, "[tandem] restart %d: no checkpoint yet in %s; starting from the beginning\n",
                          restart_count(), o.checkpoint_dir.c_str());
    return std::nullopt;
  }
  if (log) std::fprintf(stderr, "[tandem] resuming from %s\n", outcome.c_str() + 1);
  return outcome.substr(1);
}

TrainState load_state(const std::string& ckpt, const TrainOptions& o, const Roles& roles, int world, int rank,
                      const nlohmann::json& want, bool log) {
  const std::string where = (fs::path(ckpt) / kStateFile).string();
  json j;
  try {
    j = json::parse(ckpt::read_file(ckpt, kStateFile));
  } catch (const json::exception& e) {
    TANDEM_FAIL("checkpoint ", where, " is not valid JSON: ", e.what());
  }
  TrainState st;
  try {
    const json& have = j.at("fingerprint");
    for (const auto& [k, v] : want.items()) {
      const json h = have.contains(k) ? have.at(k) : json();
      TANDEM_CHECK(h == v, "cannot resume from ", ckpt, ": it was trained with ", k, " = ", h.dump(), ", this run has ",
                   v.dump(), (k == "world_size" ? " (the parameter server's shards need the same world size)" : ""),
                   "; start a new run (another --checkpoint-dir) or use the same setting");
    }
    if (log) {
      for (const char* k : {"lr", "momentum", "batch_size"}) {
        const json now = k == std::string("lr") ? json(o.lr) : k == std::string("momentum") ? json(o.momentum)
                                                                                              : json(o.batch_size);
        if (j.at(k) != now)
          std::fprintf(stderr, "[tandem] note: resuming with %s %s (the checkpoint used %s)\n", k,
                       now.dump().c_str(), j.at(k).dump().c_str());
      }
      if (!roles.ps && j.at("trainers").get<int>() != roles.trainers)
        std::fprintf(stderr, "[tandem] note: resuming %d ranks' run on %d: the rest of the epoch is re-sharded\n",
                     j.at("trainers").get<int>(), roles.trainers);
    }
    st.ps_updates = j.at("ps_updates").get<int64_t>();
    st.epoch = j.at("epoch").get<int>();
    st.step = j.at("step").get<int64_t>();
    st.global_step = j.at("global_step").get<int64_t>();
    st.start_position = j.at("position").get<int64_t>();
    st.done_before = st.step;
    st.elapsed = j.at("elapsed").get<double>();
    st.result = from_json(j.at("result"));
    if (log && st.epoch > o.epochs)
      std::fprintf(stderr, "[tandem] note: %s finished %d epoch%s; nothing is left to train with --epochs %d "
                   "(raise --epochs to train further)\n", ckpt.c_str(), st.epoch - 1, st.epoch == 2 ? "" : "s",
                   o.epochs);
    if (rank == 0) {
      st.carried = EpochSums::from_vector(j.at("sums").get<std::vector<double>>());
      // Per-step losses are summed over ranks and divided by the training
      // ranks at the epoch's end: rescale the earlier ranks' sums to this world.
      const double scale = static_cast<double>(roles.trainers) / j.at("trainers").get<double>();
      if (scale != 1.0)
        for (auto& l : st.carried.step_losses) l *= scale;
    }
    st.rng = from_hex(j.at("rng").get<std::string>(), where);
  } catch (const json::exception& e) {
    TANDEM_FAIL("checkpoint ", where, " lacks a field or has a wrong one: ", e.what());
  }
  // Progress recorded after this checkpoint was taken was lost by the failure.
  const int64_t reached = o.checkpoint_dir.empty() ? -1 : read_progress(o.checkpoint_dir);
  if (reached > st.global_step) st.result.steps_redone += reached - st.global_step;
  st.result.restarts = restart_count();
  return st;
}

void restore_rng(const at::Tensor& state) {
  at::Generator gen = at::detail::getDefaultCPUGenerator();  // a handle sharing the default generator
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

void load_model(const std::string& ckpt, torch::nn::Module& model) {
  models::load_weights(model, (fs::path(ckpt) / kModelFile).string());
}

void load_optimizer(const std::string& ckpt, const TrainState& st, Step& step, const Roles& roles) {
  const std::string path = (fs::path(ckpt) / kOptimFile).string();
  std::map<std::string, at::Tensor> saved;
  for (auto& [k, v] : models::read_weights(path)) saved.emplace(k, v);
  auto& module = *step.model().module;
  if (roles.ps) {
    // Checked on every rank, so that no rank fails alone.
    auto it = saved.find("ps.momentum");
    TANDEM_CHECK(it != saved.end(), "checkpoint file ", path, " has no parameter-server momentum (ps.momentum)");
    auto* server = step.server();
    if (!server) return;  // workers keep no optimiser state
    const int64_t updates = st.ps_updates;
    auto r = server->layout().shard(server->shard_index());
    TANDEM_CHECK(it->second.numel() == server->layout().total(), "checkpoint file ", path, ": ps.momentum has ",
                 it->second.numel(), " elements, the model ", server->layout().total());
    const bool has = updates > 0 && roles.pso.momentum != 0;
    server->restore(has ? it->second.slice(0, r.begin, r.end) : at::Tensor(), updates);
    return;
  }
  auto& opt = step.optimizer();
  torch::NoGradGuard guard;
  for (const auto& p : module.named_parameters(true)) {
    auto it = saved.find(p.key());
    if (it == saved.end()) continue;  // no step had a gradient for it yet
    TANDEM_CHECK(it->second.sizes() == p.value().sizes(), "checkpoint file ", path, ": momentum of ", p.key(),
                 " has shape ", it->second.sizes(), ", the parameter ", p.value().sizes());
    set_momentum(opt, p.value(), it->second.to(p.value().options()).clone());
  }
}

at::Tensor momentum_of(torch::optim::SGD& opt, const at::Tensor& p) {
  auto& state = opt.state();
  auto it = state.find(state_key(state, p.unsafeGetTensorImpl()));
  if (it == state.end()) return {};
  return static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer();
}

void set_momentum(torch::optim::SGD& opt, const at::Tensor& p, const at::Tensor& m) {
  auto& state = opt.state();
  auto s = std::make_unique<torch::optim::SGDParamState>();
  s->momentum_buffer(m);
  state[state_key(state, p.unsafeGetTensorImpl())] = std::move(s);
}

}  // namespace tandem::train
