// `tandem serve` (an HTTP model service) and `tandem bench serve` (its load
// generator). The work happens in tandem/serve/server.h; this file parses
// flags, loads the model and waits for SIGTERM/SIGINT.
#include <pthread.h>
#include <signal.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>

#include "commands.h"
#include "tandem/data/idx.h"
#include "tandem/data/image_codec.h"
#include "tandem/device/device.h"
#include "tandem/device/policy.h"
#include "tandem/models/models.h"
#include "tandem/models/weights.h"
#include "tandem/serve/server.h"
#include "tandem/util/check.h"
#include "tandem/util/parse.h"

namespace tandem::cli {
namespace {

// Test-only (docs/errors.md): fails the first N forward passes of more than
// one row with std::bad_alloc, so that end-to-end tests can watch the server
// halve its batch.
constexpr const char* kTestOom = "TANDEM_TEST_OOM";

// The flags that are the server's options are bound to them directly.
struct ServeArgs {
  std::string weights, model = "cnn", class_names;
  int num_classes = 10;
  // The device policy (device/policy.h).
  std::string device = "auto", precision = "auto", max_batch = "auto", val_data;
  double max_latency_ms = 20;
  int64_t val_limit = 2000;
  std::string instances = "auto";
  int threads = 0;
  serve::ServeOptions o = [] {
    serve::ServeOptions o;
    o.mean = {data::kFashionMnistMean};
    o.stddev = {data::kFashionMnistStd};
    return o;
  }();
};

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream f(path);
  TANDEM_CHECK(f.good(), "--class-names: cannot read '", path, "'; give a text file with one class name per line");
  std::vector<std::string> out;
  for (std::string line; std::getline(f, line);)
    if (!line.empty()) out.push_back(line);
  return out;
}

// The rows the policy checks a lower precision's accuracy on: --val-data, or
// Fashion-MNIST's test set for a 1x28x28 model when the package is installed.
device::Validation validation_rows(const ServeArgs& a) {
  TANDEM_CHECK(a.val_limit >= 0, "--val-limit must be >= 0 (0: no accuracy check), got ", a.val_limit);
  if (a.precision == "fp32") return {};  // nothing to check against
  std::string dir = a.val_data;
  const bool fmnist_shaped = a.o.input_shape == std::vector<int64_t>{1, 28, 28} && a.num_classes == 10;
  if (dir.empty() && fmnist_shaped && std::filesystem::exists(std::string(data::kFashionMnistDir)))
    dir = data::kFashionMnistDir;
  if (dir == "none" || dir.empty() || a.val_limit == 0) return {};
  auto ds = data::load_fashion_mnist(dir, /*train=*/false, a.val_limit);
  const int64_t channels = ds->images().dim() == 4 ? ds->images().size(1) : 1;
  TANDEM_CHECK(channels == a.o.input_shape[0] && ds->images().size(-1) == a.o.input_shape[2] &&
                   ds->images().size(-2) == a.o.input_shape[1],
               "--val-data ", dir, ": its images are ", ds->images().sizes(), ", the model takes ",
               a.o.input_shape[0], "x", a.o.input_shape[1], "x", a.o.input_shape[2],
               "; give matching data or --val-data none");
  at::Tensor x = ds->images().to(at::kFloat).div(255.0);
  if (x.dim() == 3) x = x.unsqueeze(1);
  x = x.sub(a.o.mean.front()).div(a.o.stddev.front());
  return {x.contiguous(), ds->labels()};
}

int parse_max_batch(const std::string& s) {
  if (s == "auto") return 0;
  const auto v = parse_whole(s);
  TANDEM_CHECK(v && *v >= 1 && *v <= 65536, "--max-batch '", s, "': give a number of rows (1-65536) or auto");
  return static_cast<int>(*v);
}

void run_serve(const ServeArgs& a) {
  if (a.precision != "auto") device::parse_precision(a.precision);  // before any loading
  TANDEM_CHECK(!a.weights.empty(), "--weights is required: a model.pt written by tandem train or by PyTorch's "
                                   "torch.save(model.state_dict())");
  const models::ModelSpec spec{a.model, a.num_classes, a.o.input_shape};
  auto make = [&] {
    auto m = models::make_model(spec);
    models::load_weights(*m.module, a.weights);
    return m;
  };
  make();  // a bad --weights or --model fails here, before any measurement
  // The policy's timings run with every CPU (or --threads); each instance
  // then sets its own (InstancePlan). LibTorch's default is the physical
  // cores, which a VM may report as fewer than its vCPUs (one here, for two).
  TANDEM_CHECK(a.threads >= 0, "--threads must be >= 0 (0: the CPUs divided among the instances), got ", a.threads);
  const int cpus = device::usable_cpus();
  at::set_num_threads(a.threads > 0 ? a.threads : cpus);
  const auto dev = device::choose_device(a.device);
  std::cerr << "[tandem serve] device " << dev.device.str() << " (" << dev.reason << ")\n";
  device::PolicyOptions po;
  po.precision = a.precision;
  po.max_batch = parse_max_batch(a.max_batch);
  po.max_latency_ms = a.max_latency_ms;
  po.input_shape = a.o.input_shape;
  const auto choice = device::choose(make, dev.device, po, validation_rows(a), &std::cerr);

  device::InstanceOptions io;
  io.instances = a.instances;
  io.threads = a.threads;
  io.cpus = cpus;
  io.max_batch = choice.max_batch;
  io.max_batch_auto = po.max_batch == 0;
  io.input_shape = a.o.input_shape;
  const auto inst = device::plan_instances(choice.forward, dev.device, io, &std::cerr);

  serve::ServeOptions o = a.o;
  o.model_name = a.model;
  o.device = dev.device.str();
  o.precision = device::to_string(choice.precision);
  o.max_batch = inst.max_batch;
  o.intra_op_threads = inst.threads;
  if (dev.device.is_cuda()) o.device_memory = [d = dev.device] { return device::used_memory_bytes(d); };
  if (!a.class_names.empty()) o.class_names = read_lines(a.class_names);
  serve::Predictor predict = choice.forward;
  if (const char* n = std::getenv(kTestOom)) predict = serve::fail_first_batches_with_oom(predict, std::atoi(n));
  // Every instance runs the one prepared model (its forward only reads it),
  // each on its inference thread with its own intra-op threads.
  std::vector<serve::Predictor> instances;
  for (int i = 0; i < inst.instances; ++i)
    instances.push_back([predict, t = inst.threads](const at::Tensor& x) {
      device::set_instance_threads(t);
      return predict(x);
    });

  // SIGTERM and SIGINT are taken by sigwait on this thread: blocked before the
  // server starts, so every thread it starts inherits the mask and none of
  // them is interrupted. stop() then drains the requests in flight.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  serve::Server server(std::move(instances), o);
  server.start();
  int sig = 0;
  sigwait(&sigs, &sig);
  std::cerr << "[tandem serve] " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ": draining\n";
  server.stop();
}

struct BenchServeArgs {
  std::string url = "http://127.0.0.1:8080", path = "/v1/predict", data_dir = data::kFashionMnistDir, json;
  std::vector<std::string> images;
  int clients = 64;
  int64_t requests = 10000, warmup = 100, num_images = 100;
  double timeout_s = 30;
};

void run_bench_serve(const BenchServeArgs& a) {
  std::vector<std::vector<uint8_t>> bodies;
  std::string type = "image/png";
  if (!a.images.empty()) {
    for (const auto& path : a.images) {
      std::ifstream f(path, std::ios::binary);
      TANDEM_CHECK(f.good(), "--image: cannot read '", path, "'");
      bodies.emplace_back(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    }
    const auto& b = bodies.front();
    if (!b.empty() && b[0] == 0xFF) type = "image/jpeg";
  } else {
    // The first --num-images Fashion-MNIST test images, as PNG.
    auto ds = data::load_fashion_mnist(a.data_dir, false, a.num_images);
    for (int64_t i = 0; i < ds->size(); ++i) bodies.push_back(data::encode_png(ds->images()[i][0]));
  }
  serve::LoadOptions o;
  o.url = a.url;
  o.path = a.path;
  o.clients = a.clients;
  o.requests = a.requests;
  o.warmup = a.warmup;
  TANDEM_CHECK(a.timeout_s > 0, "--timeout must be > 0 seconds, got ", a.timeout_s);
  o.timeout = std::chrono::milliseconds(static_cast<int64_t>(a.timeout_s * 1000));
  auto r = serve::run_load(o, bodies, type);
  std::printf("%lld requests from %d clients in %.2f s: %.0f requests/s, %lld errors; latency ms p50 %.2f p90 %.2f "
              "p99 %.2f max %.2f\n",
              static_cast<long long>(r.requests), a.clients, r.seconds, r.throughput,
              static_cast<long long>(r.errors), r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms);
  if (!r.first_error.empty()) std::printf("first error: %s\n", r.first_error.c_str());
  if (!a.json.empty()) write_json_file(a.json, serve::to_json(r));
}

}  // namespace

void register_serve(CLI::App& app) {
  auto* sub = app.add_subcommand("serve", "Serve a trained model over HTTP with dynamic batching");
  auto a = std::make_shared<ServeArgs>();
  sub->add_option("--weights", a->weights, "The model's weights: model.pt of tandem train, or a PyTorch state_dict")
      ->required();
  sub->add_option("--model", a->model, "Model: mlp, cnn, resnet18, resnet50")->capture_default_str();
  sub->add_option("--num-classes", a->num_classes, "Output classes")->capture_default_str();
  sub->add_option("--input-shape", a->o.input_shape, "Input C H W (images must have this size)")
      ->expected(3)
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--mean", a->o.mean, "Normalisation mean, one value or one per channel (x/255 - mean) / std")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--std", a->o.stddev, "Normalisation standard deviation, one value or one per channel")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--class-names", a->class_names,
                  "Text file, one class name per line (default: Fashion-MNIST's for 10 classes)");
  sub->add_option("--max-batch", a->max_batch,
                  "Most inputs per forward pass, or auto: the largest power of two whose forward pass stays under "
                  "--max-latency-ms (measured at start-up)")
      ->capture_default_str();
  sub->add_option("--max-latency-ms", a->max_latency_ms, "--max-batch auto: the longest a forward pass may take")
      ->capture_default_str();
  sub->add_option("--precision", a->precision,
                  "auto, fp32, bf16, fp16 or int8. auto measures the candidates for the device at start-up (GPU: "
                  "fp16; CPU: bf16 with native bf16, then int8 linear layers) and keeps one only if it is faster "
                  "and loses at most 0.5 points of validation accuracy; otherwise the next, fp32 last")
      ->capture_default_str();
  sub->add_option("--val-data", a->val_data,
                  "Fashion-MNIST-format directory whose test set checks a lower precision's accuracy (default: "
                  "the Debian package's, for a 1x28x28 10-class model; none: no check)");
  sub->add_option("--val-limit", a->val_limit, "Validation images the precision check uses")->capture_default_str();
  sub->add_option("--instances", a->instances,
                  "Model instances, each on its own inference thread taking batches from the one queue, or auto: "
                  "on the CPU the count (1, 2, 4, ... or one per CPU) that measures the most images per second at "
                  "start-up, if it beats one instance by 25%; one on a GPU. With --max-batch auto the instances "
                  "share the measured batch")
      ->capture_default_str();
  sub->add_option("--threads", a->threads,
                  "Intra-op threads of each instance (0: the CPUs this process may use, divided among the instances)")
      ->capture_default_str();
  sub->add_option("--max-wait-ms", a->o.max_wait_ms, "Longest the oldest queued input waits for a fuller batch")
      ->capture_default_str();
  sub->add_option("--max-queue", a->o.max_queue, "Inputs queued at most; beyond it 503 + Retry-After")
      ->capture_default_str();
  sub->add_option("--max-body-mb", a->o.max_body_mb, "Largest request body (MiB); larger: 413")->capture_default_str();
  sub->add_option("--host", a->o.host, "Address to listen on (0.0.0.0: every interface)")->capture_default_str();
  sub->add_option("--port", a->o.port, "Port (0: any free one, printed at start)")->capture_default_str();
  sub->add_option("--http-threads", a->o.http_threads,
                  "HTTP worker threads; each keep-alive client holds one, so at least the number of clients")
      ->capture_default_str();
  sub->add_option("--device", a->device,
                  "auto (the first CUDA device LibTorch sees, else the CPU; the log says why), cpu, cuda or cuda:N")
      ->capture_default_str();
  sub->add_flag("--quiet", a->o.quiet, "No access log lines");
  sub->footer(
      "Endpoints: POST /v1/predict (image/png, image/jpeg, or JSON {\"pixels\": [...]} / {\"instances\": [[...]]}),\n"
      "GET /healthz, GET /metrics (Prometheus). SIGTERM or Ctrl-C drains the requests in flight, then exits.\n"
      "Example:\n"
      "  tandem serve --weights runs/cnn/model.pt --model cnn --max-batch 16 --port 8080\n"
      "  curl --data-binary @shoe.png -H 'Content-Type: image/png' http://127.0.0.1:8080/v1/predict");
  sub->callback([a] { run_serve(*a); });
}

void register_bench_serve(CLI::App& bench) {
  auto* sub = bench.add_subcommand(
      "serve", "Load a running tandem serve: closed-loop clients, throughput and latency percentiles");
  auto a = std::make_shared<BenchServeArgs>();
  sub->add_option("--url", a->url, "The server, scheme://host:port")->capture_default_str();
  sub->add_option("--path", a->path, "Endpoint")->capture_default_str();
  sub->add_option("--clients", a->clients, "Concurrent connections")->capture_default_str();
  sub->add_option("--requests", a->requests, "Requests in all (over every client)")->capture_default_str();
  sub->add_option("--warmup", a->warmup, "Requests sent first and not counted")->capture_default_str();
  sub->add_option("--image", a->images, "Image files to send (PNG or JPEG, in turn); default: Fashion-MNIST");
  sub->add_option("--data-dir", a->data_dir, "Fashion-MNIST directory")->capture_default_str();
  sub->add_option("--num-images", a->num_images, "Fashion-MNIST test images to cycle through")
      ->capture_default_str();
  sub->add_option("--timeout", a->timeout_s, "Per-request timeout (s)")->capture_default_str();
  sub->add_option("--json", a->json, "Also write the report as JSON to this file");
  sub->callback([a] { run_bench_serve(*a); });
}

}  // namespace tandem::cli
