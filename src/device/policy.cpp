#include "tandem/device/policy.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <unordered_map>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/QEngine.h>
#include <torch/cuda.h>

#include "tandem/device/device.h"
#include "tandem/models/linear.h"
#include "tandem/util/check.h"
#include "tandem/util/parse.h"

namespace tandem::device {

const char* to_string(Precision p) {
  switch (p) {
    case Precision::kBf16: return "bf16";
    case Precision::kFp16: return "fp16";
    case Precision::kInt8: return "int8";
    default: return "fp32";
  }
}

Precision parse_precision(const std::string& s, const std::string& flag) {
  for (auto p : {Precision::kFp32, Precision::kBf16, Precision::kFp16, Precision::kInt8})
    if (s == to_string(p)) return p;
  TANDEM_FAIL(flag, " '", s, "': accepted values are fp32, bf16, fp16, int8", flag == "--precision" ? " and auto" : "");
}

DeviceChoice choose_device(const std::string& spec, const std::string& flag, int local_rank) {
  DeviceChoice c;
  if (spec != "auto") {
    c.device = parse(spec, flag, local_rank);
    c.reason = flag + " " + spec;
    return c;
  }
  if (cuda_device_count() > 0) {
    c.device = parse("cuda", flag, local_rank);
    c.reason = "auto: LibTorch sees " + std::to_string(cuda_device_count()) + " CUDA device(s); using " +
               c.device.str();
    return c;
  }
  c.device = c10::Device(c10::kCPU);
  if (!at::hasCUDA()) {
    c.reason = "auto: the CPU (this LibTorch was built without CUDA)";
  } else if (!std::filesystem::exists("/proc/driver/nvidia/version")) {
    c.reason = "auto: the CPU (LibTorch has CUDA, but no NVIDIA driver is loaded)";
  } else {
    const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
    c.reason = std::string("auto: the CPU (the NVIDIA driver is loaded but no CUDA device is visible") +
               (visible ? std::string("; CUDA_VISIBLE_DEVICES='") + visible + "'" : std::string()) + ")";
  }
  return c;
}

CpuInfo cpu_info() {
  CpuInfo c;
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);) {
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    key.erase(key.find_last_not_of(" \t") + 1);
    std::string value = line.substr(colon + 1);
    value.erase(0, value.find_first_not_of(" \t"));
    if (key == "model name" && c.model.empty()) c.model = value;
    if (key == "flags") {
      std::istringstream words(value);
      for (std::string w; words >> w;) {
        c.avx512_bf16 |= w == "avx512_bf16";
        c.amx_bf16 |= w == "amx_bf16";
        c.avx512_vnni |= w == "avx512_vnni";
      }
      break;  // every core has the same flags
    }
  }
  for (auto e : at::globalContext().supportedQEngines()) {
    if (e == at::kNoQEngine) continue;
    std::string name = c10::toString(e);
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::tolower(ch); });
    c.quantized_engines.push_back(name);
  }
  return c;
}

std::string CpuInfo::describe() const {
  std::ostringstream os;
  os << (model.empty() ? "unknown CPU" : model) << "; native bf16: "
     << (amx_bf16 ? "yes (AMX)" : avx512_bf16 ? "yes (AVX512-BF16)" : "no")
     << "; int8 dot products: " << (avx512_vnni ? "yes (AVX512-VNNI)" : "no") << "; quantised engines: ";
  if (quantized_engines.empty()) os << "none";
  for (size_t i = 0; i < quantized_engines.size(); ++i) os << (i ? ", " : "") << quantized_engines[i];
  return os.str();
}

std::vector<Precision> candidates(const c10::Device& dev, const CpuInfo& cpu) {
  if (dev.is_cuda()) return {Precision::kFp16, Precision::kFp32};
  std::vector<Precision> out;
  if (cpu.native_bf16()) out.push_back(Precision::kBf16);
  if (!cpu.quantized_engines.empty()) out.push_back(Precision::kInt8);
  out.push_back(Precision::kFp32);
  return out;
}

namespace {

// The quantised engine int8 runs on: the first this build has, x86 kernels first.
at::QEngine pick_qengine() {
  const auto& have = at::globalContext().supportedQEngines();
  for (auto e : {at::kX86, at::kFBGEMM, at::kONEDNN, at::kQNNPACK})
    if (std::find(have.begin(), have.end(), e) != have.end()) return e;
  return at::kNoQEngine;
}

// Note [int8 linear layers]
// Dynamic quantisation as PyTorch's quantize_dynamic does it for nn.Linear:
// each weight is quantised once, per tensor and symmetric (scale =
// max|w| / 127, zero point 0), and prepacked for the engine; at run time the
// activations are quantised per batch from their own range, multiplied in
// int8 and returned in float. The operators are called through the
// dispatcher (quantized::linear_prepack / linear_dynamic) because LibTorch's
// C++ frontend has no wrapper for them; the packed weight is an opaque
// custom-class IValue.
class Int8Linears : public models::LinearOverride {
 public:
  // reduce_range: the x86 and fbgemm kernels accumulate in 16 bits on CPUs
  // without VNNI, so activations use 7 bits there, as PyTorch's dynamic
  // Linear does for them; onednn and qnnpack take the full 8.
  Int8Linears(torch::nn::Module& module, bool reduce_range) : reduce_range_(reduce_range) {
    auto& dispatcher = c10::Dispatcher::singleton();
    auto prepack = dispatcher.findSchemaOrThrow("quantized::linear_prepack", "");
    for (auto& m : module.modules(/*include_self=*/true)) {
      auto* linear = m->as<torch::nn::LinearImpl>();
      if (!linear) continue;
      at::Tensor w = linear->weight.detach().to(at::kFloat).contiguous();
      const double scale = std::max(w.abs().max().item<double>(), 1e-8) / 127.0;
      at::Tensor qw = at::quantize_per_tensor(w, scale, 0, at::kQInt8);
      torch::jit::Stack stack{qw, linear->bias.defined() ? c10::IValue(linear->bias.detach().to(at::kFloat))
                                                         : c10::IValue()};
      prepack.callBoxed(&stack);
      packed_.emplace(linear, std::move(stack.at(0)));
    }
    TANDEM_CHECK(!packed_.empty(), "--precision int8 quantises linear layers, and this model has none");
  }
  bool forward(const torch::nn::LinearImpl& layer, const at::Tensor& x, at::Tensor& out) const override {
    auto it = packed_.find(&layer);
    if (it == packed_.end()) return false;
    torch::jit::Stack stack{x.contiguous(), it->second, reduce_range_};
    dynamic_.callBoxed(&stack);
    out = stack.at(0).toTensor();
    return true;
  }
  size_t layers() const { return packed_.size(); }

 private:
  std::unordered_map<const torch::nn::LinearImpl*, c10::IValue> packed_;
  bool reduce_range_;
  c10::OperatorHandle dynamic_{c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "")};
};

bool synchronise_if_cuda(const c10::Device& dev) {
  if (dev.is_cuda()) torch::cuda::synchronize(dev.index());
  return dev.is_cuda();
}

}  // namespace

Forward prepare(models::Model& model, Precision p, const c10::Device& dev) {
  TANDEM_CHECK(model.module && model.forward, "policy: the model has no module or no forward function");
  auto module = model.module;
  auto forward = model.forward;
  module->eval();
  if (p == Precision::kInt8) {
    TANDEM_CHECK(!dev.is_cuda(), "--precision int8 runs on the CPU only (dynamic quantisation); on ", dev.str(),
                 " use fp16 or auto");
    const at::QEngine engine = pick_qengine();
    TANDEM_CHECK(engine != at::kNoQEngine, "--precision int8: this LibTorch has no quantised engine; use bf16 or fp32");
    // Process-wide and not thread-safe: set once, before any quantised op runs.
    if (at::globalContext().qEngine() != engine) at::globalContext().setQEngine(engine);
    auto linears = std::make_shared<Int8Linears>(*module, engine == at::kX86 || engine == at::kFBGEMM);
    return [module, forward, linears](const at::Tensor& x) {
      c10::InferenceMode guard;
      models::LinearOverrideScope scope(linears.get());
      return forward(x.to(at::kFloat)).to(at::kFloat);
    };
  }
  const at::ScalarType dtype =
      p == Precision::kBf16 ? at::kBFloat16 : p == Precision::kFp16 ? at::kHalf : at::kFloat;
  module->to(dev, dtype);
  return [module, forward, dev, dtype](const at::Tensor& x) {
    c10::InferenceMode guard;
    return forward(x.to(dev, dtype)).to(at::kFloat);
  };
}

double time_forward(const Forward& f, const at::Tensor& x, double budget_ms) {
  const c10::Device dev = x.device();
  f(x);  // warm-up: first-call allocations, kernel selection, packing
  synchronise_if_cuda(dev);
  std::vector<double> ms;
  const auto start = std::chrono::steady_clock::now();
  while (ms.size() < 3 ||
         (std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() < budget_ms &&
          ms.size() < 1000)) {
    const auto t0 = std::chrono::steady_clock::now();
    f(x);
    synchronise_if_cuda(dev);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  return ms[ms.size() / 2];
}

double accuracy(const Forward& f, const Validation& val, int batch) {
  TANDEM_CHECK(val.defined(), "policy: accuracy needs validation rows");
  const int64_t n = val.x.size(0);
  int64_t correct = 0;
  for (int64_t b = 0; b < n; b += batch) {
    const int64_t e = std::min<int64_t>(n, b + batch);
    at::Tensor logits = f(val.x.slice(0, b, e)).to(at::kCPU);
    correct += logits.argmax(1).eq(val.y.slice(0, b, e)).sum().item<int64_t>();
  }
  return static_cast<double>(correct) / static_cast<double>(n);
}

namespace {

std::string fmt(const char* f, double a, double b = 0, double c = 0) {
  char buf[256];
  std::snprintf(buf, sizeof buf, f, a, b, c);
  return buf;
}

// The chain an explicit --precision falls back along: itself, then the
// candidates after it, fp32 last.
std::vector<Precision> chain_from(Precision first, const std::vector<Precision>& auto_order) {
  std::vector<Precision> out{first};
  auto it = std::find(auto_order.begin(), auto_order.end(), first);
  for (it = it == auto_order.end() ? auto_order.end() : it + 1; it != auto_order.end(); ++it) out.push_back(*it);
  if (out.back() != Precision::kFp32) out.push_back(Precision::kFp32);
  return out;
}

}  // namespace

Choice choose(const std::function<models::Model()>& make, const c10::Device& dev, const PolicyOptions& o,
              const Validation& val, std::ostream* log) {
  TANDEM_CHECK(o.max_batch >= 0, "--max-batch must be >= 1 or auto, got ", o.max_batch);
  TANDEM_CHECK(o.max_latency_ms > 0, "--max-latency-ms must be > 0, got ", o.max_latency_ms);
  TANDEM_CHECK(o.input_shape.size() == 3, "policy: the input shape must be [C, H, W]");
  Choice c;
  c.device = dev;
  c.seed_batch = dev.is_cuda() ? 16 : 4;  // the seed's defaults
  c.probe_batch = o.max_batch > 0 ? o.max_batch : c.seed_batch;
  const bool automatic = o.precision == "auto";
  const auto auto_order = candidates(dev, cpu_info());
  std::vector<Precision> order = automatic ? auto_order : chain_from(parse_precision(o.precision), auto_order);
  const bool checkable = val.defined();
  if (automatic && !checkable && o.require_accuracy_check) order = {Precision::kFp32};

  auto input = [&](int64_t batch) {
    if (checkable && val.x.size(0) >= batch) return val.x.slice(0, 0, batch).to(dev);
    return at::randn({batch, o.input_shape[0], o.input_shape[1], o.input_shape[2]}).to(dev);
  };
  const at::Tensor x_probe = input(c.probe_batch);
  auto say = [&](const std::string& line) {
    if (log) *log << "[tandem policy] " << line << "\n" << std::flush;
  };

  // fp32 first: the baseline of speed and accuracy, and the last resort.
  Trial base;
  base.precision = Precision::kFp32;
  models::Model base_model = make();
  Forward base_forward = prepare(base_model, Precision::kFp32, dev);
  base.ms_per_batch = time_forward(base_forward, x_probe, o.probe_ms);
  base.speedup = 1.0;
  base.ran = true;
  const bool lower_tried = order.size() > 1 || order.front() != Precision::kFp32;
  if (checkable && lower_tried) base.accuracy = accuracy(base_forward, val, std::max(c.probe_batch, 64));
  say(fmt("fp32: %.3f ms per batch of %.0f", base.ms_per_batch, c.probe_batch) +
      (base.accuracy >= 0 ? fmt(", accuracy %.4f", base.accuracy) : std::string()));

  for (Precision p : order) {
    if (p == Precision::kFp32) {
      base.chosen = true;
      c.forward = base_forward;
      c.precision = p;
      if (c.precision_reason.empty())
        c.precision_reason = automatic ? (checkable ? "auto: fp32, no lower precision passed (see the trials)"
                                                    : "auto: fp32, no validation data to check a lower precision's "
                                                      "accuracy against")
                                       : (o.precision == "fp32" ? "--precision fp32"
                                                                : "--precision " + o.precision +
                                                                      " fell back to fp32 (see the trials)");
      break;
    }
    Trial t;
    t.precision = p;
    Forward f;
    try {
      models::Model m = make();
      f = prepare(m, p, dev);
      t.ms_per_batch = time_forward(f, x_probe, o.probe_ms);
      if (checkable) t.accuracy = accuracy(f, val, std::max(c.probe_batch, 64));
      t.ran = true;
    } catch (const std::exception& e) {
      std::string what = e.what();
      if (auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
      t.note = "refused: " + what;
    }
    if (t.ran) {
      t.speedup = base.ms_per_batch / t.ms_per_batch;
      const double drop = checkable ? base.accuracy - t.accuracy : 0;
      if (automatic && t.speedup < o.min_speedup) {
        t.note = fmt("not faster: %.2fx fp32's speed (needs %.2fx)", t.speedup, o.min_speedup) +
                 (checkable ? fmt("; accuracy %.4f", t.accuracy) : std::string());
      } else if (checkable && drop > o.max_accuracy_drop) {
        t.note = fmt("accuracy %.4f, %.2f points below fp32 (at most %.2f allowed)", t.accuracy, 100 * drop,
                     100 * o.max_accuracy_drop);
      } else {
        t.chosen = true;
        t.note = fmt("%.2fx fp32's speed", t.speedup) +
                 (checkable ? fmt(", accuracy %.4f (fp32 %.4f)", t.accuracy, base.accuracy)
                            : std::string(", accuracy unchecked (no validation data)"));
      }
    }
    say(std::string(to_string(p)) + ": " + (t.ran ? fmt("%.3f ms per batch; ", t.ms_per_batch) : std::string()) +
        t.note);
    c.trials.push_back(t);
    if (t.chosen) {
      c.forward = f;
      c.precision = p;
      c.precision_reason = (automatic ? "auto: " : "--precision " + o.precision + ": ") + std::string(to_string(p)) +
                           ", " + t.note;
      break;
    }
  }
  c.trials.insert(c.trials.begin(), base);
  say("precision " + std::string(to_string(c.precision)) + " (" + c.precision_reason + ")");

  if (o.max_batch > 0) {
    c.max_batch = o.max_batch;
    c.batch_reason = "--max-batch " + std::to_string(o.max_batch);
  } else {
    // The largest power of two whose forward pass stays under the latency bound.
    int best = 0;
    for (int b = 1; b <= o.max_batch_limit; b *= 2) {
      double ms = 0;
      try {
        ms = time_forward(c.forward, input(b), std::min(o.probe_ms, 4 * o.max_latency_ms));
      } catch (const std::exception& e) {  // out of memory, most likely: the previous size is the answer
        say("batch " + std::to_string(b) + " failed: " + std::string(e.what()).substr(0, 200));
        break;
      }
      c.batch_ms.emplace_back(b, ms);
      if (ms > o.max_latency_ms) break;
      best = b;
    }
    c.max_batch = std::max(best, 1);
    c.batch_reason = fmt("auto: %.0f, the largest power of two whose forward pass stays under %.1f ms", c.max_batch,
                         o.max_latency_ms) +
                     (best == 0 ? " (batch 1 is already over it)" : std::string()) +
                     fmt("; the seed's default here is %.0f", c.seed_batch);
  }
  say("max batch " + std::to_string(c.max_batch) + " (" + c.batch_reason + ")");
  return c;
}

namespace {

// Sets this thread's intra-op threads. In LibTorch (OpenMP) the count is
// per thread, but set_num_threads also stores a process-wide default that a
// thread applies to itself on its first parallel op (lazy initialisation):
// that first op must come before, or it would overwrite the setting with
// whatever another thread stored last.
void set_thread_intra_op(int threads) {
  (void)at::get_num_threads();  // this thread's lazy initialisation, now
  at::set_num_threads(threads);
}

}  // namespace

IntraOpThreads::IntraOpThreads(int threads) : before_(at::get_num_threads()) { at::set_num_threads(threads); }
IntraOpThreads::~IntraOpThreads() { at::set_num_threads(before_); }

void set_instance_threads(int threads) {
  thread_local int set = 0;
  if (set == threads) return;
  set_thread_intra_op(threads);
  set = threads;
}

double concurrent_throughput(const Forward& f, const at::Tensor& x, int instances, int threads, double budget_ms) {
  TANDEM_CHECK(instances >= 1 && threads >= 1, "policy: instances and threads must be >= 1");
  const c10::Device dev = x.device();
  // Each thread warms up, then all start together and count their passes
  // until the deadline; a pass that overruns it still counts (rows over the
  // time they took).
  std::mutex mu;
  std::condition_variable cv;
  int ready = 0;
  bool go = false;
  std::chrono::steady_clock::time_point start, deadline;
  std::vector<int64_t> passes(static_cast<size_t>(instances), 0);
  std::vector<std::chrono::steady_clock::time_point> ends(static_cast<size_t>(instances));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(instances));
  auto body = [&](size_t i) {
    try {
      set_thread_intra_op(threads);
      f(x);
      synchronise_if_cuda(dev);
    } catch (...) {
      errors[i] = std::current_exception();
    }
    {
      std::unique_lock<std::mutex> lock(mu);
      if (++ready == instances) {
        start = std::chrono::steady_clock::now();
        deadline = start + std::chrono::microseconds(static_cast<int64_t>(budget_ms * 1000));
        go = true;
        cv.notify_all();
      }
      cv.wait(lock, [&] { return go; });
    }
    ends[i] = start;
    if (errors[i]) return;
    try {
      do {
        f(x);
        synchronise_if_cuda(dev);
        ++passes[i];
      } while (std::chrono::steady_clock::now() < deadline);
    } catch (...) {
      errors[i] = std::current_exception();
    }
    ends[i] = std::chrono::steady_clock::now();
  };
  // The threads' settings also become the default of threads not yet
  // initialised: restored when this returns.
  const IntraOpThreads restore(at::get_num_threads());
  std::vector<std::thread> pool;
  std::exception_ptr spawn_error;
  try {
    for (int i = 0; i < instances; ++i) pool.emplace_back(body, static_cast<size_t>(i));
  } catch (...) {  // no thread for every instance: release those waiting, then fail
    spawn_error = std::current_exception();
    std::lock_guard<std::mutex> lock(mu);
    start = deadline = std::chrono::steady_clock::now();
    go = true;
    cv.notify_all();
  }
  for (auto& t : pool) t.join();
  if (spawn_error) std::rethrow_exception(spawn_error);
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  int64_t total = 0;
  auto last = start;
  for (int i = 0; i < instances; ++i) {
    total += passes[static_cast<size_t>(i)];
    last = std::max(last, ends[static_cast<size_t>(i)]);
  }
  const double s = std::chrono::duration<double>(last - start).count();
  return s > 0 ? static_cast<double>(total * x.size(0)) / s : 0;
}

InstancePlan plan_instances(const Forward& f, const c10::Device& dev, const InstanceOptions& o, std::ostream* log) {
  TANDEM_CHECK(o.threads >= 0, "--threads must be >= 0 (0: the CPUs divided among the instances), got ", o.threads);
  TANDEM_CHECK(o.max_batch >= 1, "policy: the max batch must be >= 1, got ", o.max_batch);
  TANDEM_CHECK(o.input_shape.size() == 3, "policy: the input shape must be [C, H, W]");
  const int cpus = std::max(1, o.cpus);
  int explicit_n = 0;
  if (o.instances != "auto") {
    const auto v = parse_whole(o.instances);
    TANDEM_CHECK(v && *v >= 1 && *v <= 1024, "--instances '", o.instances, "': give a count (1-1024) or auto");
    explicit_n = static_cast<int>(*v);
  }
  // A measured batch was timed on one instance with every CPU; k instances
  // with a k-th of the CPUs each share it. With --threads it was timed at
  // an instance's own threads and stays whole.
  const bool share_batch = o.max_batch_auto && o.threads == 0;
  auto batch_for = [&](int k) { return share_batch ? std::max(1, o.max_batch / k) : o.max_batch; };
  auto threads_for = [&](int k) { return o.threads > 0 ? o.threads : std::max(1, cpus / k); };
  auto plan = [&](int k, std::string reason) {
    InstancePlan p;
    p.instances = k;
    p.threads = threads_for(k);
    p.max_batch = batch_for(k);
    p.reason = std::move(reason);
    return p;
  };
  auto say = [&](const InstancePlan& p) {
    if (log)
      *log << "[tandem policy] " << p.instances << (p.instances == 1 ? " instance" : " instances") << " x "
           << p.threads << " intra-op threads, max batch " << p.max_batch << " each (" << p.reason << ")\n"
           << std::flush;
    return p;
  };
  if (explicit_n > 0) return say(plan(explicit_n, "--instances " + std::to_string(explicit_n)));
  if (dev.is_cuda()) return say(plan(1, "auto: one instance per GPU, whose kernels already run in parallel"));
  if (o.threads > 0)
    return say(plan(std::max(1, cpus / o.threads),
                    "auto: --threads " + std::to_string(o.threads) + " on " + std::to_string(cpus) + " CPUs"));
  if (cpus == 1) return say(plan(1, "auto: one CPU"));

  // 1, 2, 4, ... instances that divide the CPUs, and one per CPU. A measured
  // batch is not split below one row per instance: the pass would then take
  // longer than the latency bound allowed.
  std::vector<int> ks;
  for (int k = 1; k < cpus; k *= 2)
    if (cpus % k == 0) ks.push_back(k);
  ks.push_back(cpus);
  if (share_batch) ks.erase(std::remove_if(ks.begin(), ks.end(), [&](int k) { return k > o.max_batch; }), ks.end());
  std::vector<InstancePlan::Trial> trials;
  std::string refused;
  for (int k : ks) {
    const int b = batch_for(k), t = threads_for(k);
    const at::Tensor x = at::randn({b, o.input_shape[0], o.input_shape[1], o.input_shape[2]}).to(dev);
    try {
      trials.push_back({k, t, b, concurrent_throughput(f, x, k, t, o.probe_ms)});
    } catch (const std::exception& e) {
      if (k == 1) throw;  // the model itself does not run
      std::string what = e.what();
      if (auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
      refused = "; " + std::to_string(k) + " instances failed (" + what + "), so no more were tried";
      break;
    }
  }
  const auto& one = trials.front();
  const auto* best = &one;
  for (const auto& tr : trials)
    if (tr.rows_per_s > best->rows_per_s) best = &tr;
  std::ostringstream why;
  why << "auto: measured";
  for (const auto& tr : trials)
    why << (&tr == &trials.front() ? " " : ", ") << tr.instances << "x" << tr.threads << " at batch " << tr.batch
        << " " << static_cast<int64_t>(tr.rows_per_s) << " rows/s";
  why << refused;
  const double gain = one.rows_per_s > 0 ? best->rows_per_s / one.rows_per_s : 1.0;
  const int k = best->instances > 1 && gain >= o.min_gain ? best->instances : 1;
  if (best->instances > 1)
    why << fmt(k > 1 ? "; %.2fx one instance (needs %.2fx)"
                     : "; more instances gain %.2fx, under the %.2fx that pays for one instance's lower latency",
               gain, o.min_gain);
  else if (trials.size() > 1)
    why << "; one instance is fastest";
  auto p = plan(k, why.str());
  p.trials = std::move(trials);
  return say(p);
}

std::string Choice::describe() const {
  std::ostringstream os;
  os << "device " << device.str() << ", precision " << to_string(precision) << " (" << precision_reason
     << "), max batch " << max_batch << " (" << batch_reason << ")";
  return os.str();
}

}  // namespace tandem::device
