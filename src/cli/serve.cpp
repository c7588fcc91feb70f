// `tandem serve` (an HTTP model service) and `tandem bench serve` (its load
// generator). The work happens in tandem/serve/server.h; this file parses
// flags, loads the model and waits for SIGTERM/SIGINT.
#include <pthread.h>
#include <signal.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>

#include "commands.h"
#include "tandem/data/idx.h"
#include "tandem/data/image_codec.h"
#include "tandem/models/models.h"
#include "tandem/models/weights.h"
#include "tandem/serve/server.h"
#include "tandem/util/check.h"

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

void run_serve(const ServeArgs& a) {
  TANDEM_CHECK(a.o.device == "cpu", "--device ", a.o.device, ": tandem serve runs on the CPU for now (--device cpu)");
  TANDEM_CHECK(!a.weights.empty(), "--weights is required: a model.pt written by tandem train or by PyTorch's "
                                   "torch.save(model.state_dict())");
  auto model = models::make_model({a.model, a.num_classes, a.o.input_shape});
  models::load_weights(*model.module, a.weights);

  serve::ServeOptions o = a.o;
  o.model_name = a.model;
  o.precision = "fp32";
  if (!a.class_names.empty()) o.class_names = read_lines(a.class_names);
  serve::Predictor predict = serve::make_predictor(model);
  if (const char* n = std::getenv(kTestOom)) predict = serve::fail_first_batches_with_oom(predict, std::atoi(n));

  // SIGTERM and SIGINT are taken by sigwait on this thread: blocked before the
  // server starts, so every thread it starts inherits the mask and none of
  // them is interrupted. stop() then drains the requests in flight.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  serve::Server server(predict, o);
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
  if (!a.json.empty()) {
    std::ofstream f(a.json);
    TANDEM_CHECK(f.good(), "--json: cannot write '", a.json, "'");
    f << serve::to_json(r) << "\n";
    TANDEM_CHECK(f.good(), "--json: error writing '", a.json, "'");
  }
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
  sub->add_option("--max-batch", a->o.max_batch, "Most inputs per forward pass")->capture_default_str();
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
  sub->add_option("--device", a->o.device, "cpu")->capture_default_str();
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
