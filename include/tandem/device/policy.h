#pragma once
// The device policy: which device, precision and batch size a model runs at
// on this machine. `tandem serve`, `tandem bench infer` and `tandem doctor`
// share it (training takes its device from device::plan and its precision
// from --precision).
//
// Decisions are measured, not assumed, and each carries its reason for the log:
//  - device: "auto" is the first CUDA device when LibTorch sees one, else the
//    CPU, saying why (no CUDA in this build, no driver, no device).
//  - precision: candidates in order, fp16 then fp32 on a GPU; bf16 (when the
//    CPU has native bf16 instructions), int8 (dynamic quantisation of the
//    linear layers, when a quantised engine is built in), then fp32 on the CPU.
//    A candidate is taken when it runs, is measured at least `min_speedup`
//    times faster than fp32, and loses at most `max_accuracy_drop` of the
//    validation accuracy; otherwise the next one is tried and the log says why.
//  - batch: the seed's defaults (16 on a GPU, 4 on the CPU), refined to the
//    largest power of two whose forward pass stays under max_latency_ms.
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "tandem/models/models.h"

namespace tandem::device {

enum class Precision { kFp32, kBf16, kFp16, kInt8 };
const char* to_string(Precision p);
// fp32 | bf16 | fp16 | int8; throws tandem::Error naming `flag` and the accepted values.
Precision parse_precision(const std::string& s, const std::string& flag = "--precision");

// --device: "auto", or what device::parse accepts.
struct DeviceChoice {
  c10::Device device{c10::kCPU};
  std::string reason;
};
DeviceChoice choose_device(const std::string& spec, const std::string& flag = "--device", int local_rank = 0);

// What the CPU offers, from /proc/cpuinfo's flags and the LibTorch build.
struct CpuInfo {
  std::string model;            // "AMD EPYC ..." (empty when unknown)
  bool avx512_bf16 = false;     // native bf16 dot products
  bool amx_bf16 = false;        // Intel AMX tiles
  bool avx512_vnni = false;     // int8 dot products
  std::vector<std::string> quantized_engines;  // "onednn", "qnnpack", "fbgemm", "x86"
  bool native_bf16() const { return avx512_bf16 || amx_bf16; }
  std::string describe() const;
};
CpuInfo cpu_info();

// The forward of a model made ready for inference: float [B, C, H, W] in,
// float logits out, whatever runs inside.
using Forward = std::function<at::Tensor(const at::Tensor&)>;

// Moves `model` to `dev` at precision `p` (in place: its parameters are
// converted, or for int8 its linear layers are prepacked) and returns its
// forward under InferenceMode in eval mode. Throws tandem::Error when this
// build or device cannot run it (int8 on CUDA, no quantised engine).
// A precision may also fail only when it first runs (fp16 convolutions on
// the CPU): the policy runs each candidate before it trusts it.
Forward prepare(models::Model& model, Precision p, const c10::Device& dev);

// The candidates "auto" tries on `dev`, best first; fp32 is always last.
std::vector<Precision> candidates(const c10::Device& dev, const CpuInfo& cpu);

struct PolicyOptions {
  std::string precision = "auto";  // auto | fp32 | bf16 | fp16 | int8
  int max_batch = 0;               // 0: auto
  double max_latency_ms = 20;      // --max-batch auto: the forward pass may take this long
  int max_batch_limit = 256;       // --max-batch auto tries powers of two up to this
  double max_accuracy_drop = 0.005;  // 0.5 points
  double min_speedup = 1.05;       // a lower precision must be this much faster than fp32
  double probe_ms = 150;           // time spent timing each candidate (at least 3 runs)
  std::vector<int64_t> input_shape{1, 28, 28};  // [C, H, W] of random probe inputs (no validation rows)
  // Without validation rows, auto keeps fp32 (a lower precision's accuracy
  // cannot be checked). false: decide by speed alone (`tandem doctor`, whose
  // model is untrained; the notes say the accuracy was unchecked).
  bool require_accuracy_check = true;
};

// One candidate as measured.
struct Trial {
  Precision precision;
  bool ran = false;          // false: refused (why in note)
  double ms_per_batch = 0;   // median forward time at the probe batch
  double speedup = 0;        // fp32's time / this one's
  double accuracy = -1;      // on the validation rows; -1: none given
  bool chosen = false;
  std::string note;
};

struct Choice {
  c10::Device device{c10::kCPU};
  Precision precision = Precision::kFp32;
  std::string precision_reason;
  int max_batch = 1;
  std::string batch_reason;
  int seed_batch = 4;   // the seed's default for this device: 16 on a GPU, 4 on the CPU
  int probe_batch = 1;  // the batch the precisions were timed at (--max-batch, else seed_batch)
  std::vector<Trial> trials;
  std::vector<std::pair<int, double>> batch_ms;  // --max-batch auto: batch -> forward ms
  Forward forward;                               // the chosen model, ready
  std::string describe() const;                  // one line for the log
};

// Validation rows for the accuracy check: float normalised inputs [N, C, H, W]
// and int64 labels [N]. Undefined tensors: no check is possible, so "auto"
// keeps fp32 and an explicit lower precision is taken unchecked (both logged).
struct Validation {
  at::Tensor x, y;
  bool defined() const { return x.defined() && y.defined() && x.size(0) > 0; }
};

// Runs the policy. `make` builds a fresh copy of the model on the CPU with
// its weights (each candidate converts its own copy). Logs its steps to `log`
// when given. Throws tandem::Error when even fp32 cannot run.
Choice choose(const std::function<models::Model()>& make, const c10::Device& dev, const PolicyOptions& o,
              const Validation& val, std::ostream* log = nullptr);

// Model instances: how many copies of the forward run at once, each on its
// own inference thread with `threads` intra-op threads, all taking batches
// from one queue (Triton's instance groups, TorchServe's workers). One
// instance with every CPU gives a batch the lowest latency; on the CPU a
// small model at a small batch cannot keep several intra-op threads busy, and
// one instance per CPU then serves more (the cnn at batch 1 here: 2.2x, see
// docs/serving.md). On a GPU one instance: its kernels are already parallel.
struct InstancePlan {
  int instances = 1;
  int threads = 1;    // intra-op threads of each instance
  int max_batch = 1;  // rows per forward pass of each instance
  std::string reason;
  struct Trial {
    int instances, threads, batch;
    double rows_per_s;
  };
  std::vector<Trial> trials;  // auto on the CPU: what was measured
};

struct InstanceOptions {
  std::string instances = "auto";  // auto or a count (--instances)
  int threads = 0;                 // intra-op threads per instance; 0: the CPUs / instances (--threads)
  int cpus = 1;                    // CPUs this process may use
  // The batch one instance would take on its own (Choice::max_batch). When it
  // was measured (auto) with every CPU (threads 0), k instances share it:
  // each takes max_batch / k, at least 1, so that rows in flight and the
  // latency of a pass stay what the bound chose. With --threads it was
  // timed at an instance's own threads and each instance takes all of it.
  int max_batch = 1;
  bool max_batch_auto = false;
  // More instances must run this many times the rows of one. The forward
  // passes alone overstate what serving gains: the HTTP threads take CPU from
  // the instances (the cnn here: 2 x 64 rows against 1 x 128, 1.14-1.58x
  // alone, 0.96-1.02x served with a worse p99; at batch 1: 3.5x alone, 2.25x
  // served; docs/benchmarks.md, "Model instances").
  double min_gain = 1.25;
  double probe_ms = 150;   // timing of each candidate
  std::vector<int64_t> input_shape{1, 28, 28};
};

// Decides the instances: explicit when `o.instances` is a count, else on the
// CPU by measuring 1, 2, 4, ... instances (CPUs / k threads each) running at
// once and keeping the most rows per second, if it beats one instance by
// min_gain. Throws tandem::Error naming --instances or --threads when they
// are malformed.
InstancePlan plan_instances(const Forward& f, const c10::Device& dev, const InstanceOptions& o,
                            std::ostream* log = nullptr);

// Sets the calling thread's intra-op threads (and LibTorch's process-wide
// default, which threads not yet initialised take) for its lifetime, then
// restores the count it found.
class IntraOpThreads {
 public:
  explicit IntraOpThreads(int threads);
  ~IntraOpThreads();
  IntraOpThreads(const IntraOpThreads&) = delete;
  IntraOpThreads& operator=(const IntraOpThreads&) = delete;

 private:
  int before_;
};

// Sets the calling thread's intra-op threads, once per thread (an inference
// thread calls it before each pass). set_num_threads alone may be undone
// by LibTorch's lazy per-thread initialisation; this is not.
void set_instance_threads(int threads);

// Rows per second of `instances` copies of `f` run at once on `x`, each
// thread with `threads` intra-op threads, over about `budget_ms`. The
// process-wide default thread count is restored afterwards.
double concurrent_throughput(const Forward& f, const at::Tensor& x, int instances, int threads, double budget_ms);

// Median milliseconds of `f` on `x` after a warm-up, over at least 3 runs and
// about `budget_ms` (CUDA: synchronised around each run).
double time_forward(const Forward& f, const at::Tensor& x, double budget_ms);

// Top-1 accuracy of `f` on `val`, `batch` rows at a time.
double accuracy(const Forward& f, const Validation& val, int batch = 256);

}  // namespace tandem::device
