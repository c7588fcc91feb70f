// tandem serve over real HTTP on loopback (ephemeral ports): predictions equal
// the model's own forward pass on the training pipeline's tensor, concurrent
// requests share batches, bad input is refused with its reason and costs
// nothing, a full queue answers 503, stop() drains, out-of-memory halves the
// batch without dropping a request. The model is a freshly made cnn with
// random weights: equality with its forward pass is what is tested, not accuracy.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <httplib.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "tandem/data/idx.h"
#include "tandem/data/image_codec.h"
#include "tandem/models/models.h"
#include "tandem/serve/server.h"
#include "tandem/util/check.h"

namespace tandem::serve {
namespace {

using json = nlohmann::json;

models::Model small_cnn() {
  torch::manual_seed(0);
  return models::make_model({"cnn", 10, {1, 28, 28}});
}

ServeOptions quiet_options() {
  ServeOptions o;
  o.port = 0;
  o.access_log = nullptr;
  o.event_log = nullptr;
  o.http_threads = 24;
  o.model_name = "cnn";
  return o;
}

// The model's own answer for one normalised [C,H,W] input.
at::Tensor reference_probs(const models::Model& m, const at::Tensor& chw) {
  m.module->eval();
  torch::NoGradGuard no_grad;
  return torch::softmax(m.forward(chw.unsqueeze(0)), 1)[0];
}

void expect_matches(const json& answer, const at::Tensor& expected) {
  ASSERT_TRUE(answer.contains("probabilities")) << answer.dump();
  const auto& p = answer["probabilities"];
  ASSERT_EQ(p.size(), static_cast<size_t>(expected.numel()));
  for (int64_t i = 0; i < expected.numel(); ++i)
    EXPECT_NEAR(p[static_cast<size_t>(i)].get<double>(), expected[i].item<double>(), 1e-5) << "class " << i;
  const int64_t best = expected.argmax().item<int64_t>();
  EXPECT_EQ(answer["class_index"].get<int64_t>(), best);
  EXPECT_EQ(answer["class_name"].get<std::string>(), fashion_mnist_classes()[static_cast<size_t>(best)]);
}

// Real Fashion-MNIST test images when the data set is installed, else random
// ones normalised the way data::TensorDataset does it.
std::shared_ptr<data::TensorDataset> test_images(int64_t n) {
  try {
    return data::load_fashion_mnist(data::kFashionMnistDir, false, n);
  } catch (const Error&) {
    torch::manual_seed(1);
    auto images = torch::randint(0, 256, {n, 28, 28}, torch::kUInt8);
    return std::make_shared<data::TensorDataset>(images, torch::zeros({n}, torch::kInt64), data::kFashionMnistMean,
                                                 data::kFashionMnistStd, 10, "random");
  }
}

std::string png_of(const at::Tensor& hw_uint8) {
  auto bytes = data::encode_png(hw_uint8);
  return std::string(bytes.begin(), bytes.end());
}

json pixels_of(const at::Tensor& hw_uint8) {
  json v = json::array();
  auto flat = hw_uint8.reshape({-1}).to(torch::kInt64);
  for (int64_t i = 0; i < flat.numel(); ++i) v.push_back(flat[i].item<int64_t>());
  return v;
}

// Sends raw bytes on a fresh connection and returns everything the server
// wrote before closing it. No half-close after sending: httplib drops a
// half-closed connection without answering.
std::string raw_exchange(int port, const std::string& bytes) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  EXPECT_EQ(::send(fd, bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out;
}

// A predictor that takes `ms` per batch, for queues that fill up.
Predictor slow(Predictor inner, int ms) {
  return [inner = std::move(inner), ms](const at::Tensor& x) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return inner(x);
  };
}

// What a request got back (httplib::Result has no empty state to collect into).
struct Reply {
  bool answered = false;
  std::string transport_error;
  httplib::Response response;
  explicit operator bool() const { return answered; }
  const httplib::Response* operator->() const { return &response; }
};

// `n` concurrent POSTs of `body`, one connection each; returns the responses.
std::vector<Reply> concurrent_posts(int port, int n, const std::string& body, const std::string& type) {
  std::vector<Reply> results(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      httplib::Client cli("127.0.0.1", port);
      cli.set_read_timeout(20, 0);
      auto res = cli.Post("/v1/predict", body, type.c_str());
      auto& out = results[static_cast<size_t>(i)];
      out.answered = static_cast<bool>(res);
      if (res) out.response = *res;
      else out.transport_error = httplib::to_string(res.error());
    });
  for (auto& t : threads) t.join();
  return results;
}

TEST(Serve, PngAndJsonPredictionsEqualTheModelsForwardPass) {
  auto model = small_cnn();
  std::ostringstream access;
  auto o = quiet_options();
  o.access_log = &access;
  Server server(model, o);
  const int port = server.start();
  ASSERT_GT(port, 0);
  httplib::Client cli("127.0.0.1", port);
  auto ds = test_images(4);
  for (int64_t i = 0; i < 4; ++i) {
    // The training pipeline's tensor for this image: serving must preprocess identically.
    const auto expected = reference_probs(model, ds->get(i, {}).input);
    const auto image = ds->images()[i][0];  // uint8 [28, 28]
    auto res = cli.Post("/v1/predict", png_of(image), "image/png");
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200) << res->body;
    expect_matches(json::parse(res->body), expected);

    res = cli.Post("/v1/predict", json{{"pixels", pixels_of(image)}}.dump(), "application/json");
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200) << res->body;
    expect_matches(json::parse(res->body), expected);
  }
  // A batch in one request, in order.
  json inst = json::array();
  for (int64_t i = 0; i < 3; ++i) inst.push_back(pixels_of(ds->images()[i][0]));
  auto res = cli.Post("/v1/predict", json{{"instances", inst}}.dump(), "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  auto out = json::parse(res->body);
  ASSERT_EQ(out["predictions"].size(), 3u);
  for (int64_t i = 0; i < 3; ++i)
    expect_matches(out["predictions"][static_cast<size_t>(i)], reference_probs(model, ds->get(i, {}).input));
  EXPECT_EQ(out["batch_size"].get<int64_t>(), 3);  // its rows rode together

  // JPEG: the reference is the decoded image (JPEG is lossy).
  if (data::have_jpeg_codec()) {
    const auto jpeg = data::encode_jpeg(ds->images()[0][0], 90);
    auto decoded = data::decode_image(jpeg.data(), jpeg.size(), "jpeg", 1).permute({2, 0, 1}).to(torch::kFloat32);
    auto x = decoded.div(255.0).sub(data::kFashionMnistMean).div(data::kFashionMnistStd);
    res = cli.Post("/v1/predict", std::string(jpeg.begin(), jpeg.end()), "image/jpeg");
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200) << res->body;
    expect_matches(json::parse(res->body), reference_probs(model, x));
  }
  server.stop();
  const std::string log = access.str();
  EXPECT_NE(log.find(" POST /v1/predict 200 "), std::string::npos) << log;
  EXPECT_NE(log.find("batch=3"), std::string::npos) << log;
}

TEST(Serve, ConcurrentRequestsShareBatches) {
  auto model = small_cnn();
  auto o = quiet_options();
  o.max_batch = 16;
  o.max_wait_ms = 20;
  Server server(model, o);
  const int port = server.start();
  const auto body = png_of(test_images(1)->images()[0][0]);
  for (int round = 0; round < 3; ++round) {
    for (auto& r : concurrent_posts(port, 16, body, "image/png")) {
      ASSERT_TRUE(r);
      EXPECT_EQ(r->status, 200) << r->body;
    }
  }
  const auto m = server.snapshot();
  EXPECT_EQ(m.rows, 48u);
  EXPECT_GT(m.batch_size.count_above(1), 0u) << "every batch held one row";
  EXPECT_LT(m.batches, 48u);
}

TEST(Serve, EachBadInputGetsItsStatusAndReason) {
  auto model = small_cnn();
  auto o = quiet_options();
  o.max_body_mb = 0.05;  // 51 KiB
  Server server(model, o);
  const int port = server.start();
  httplib::Client cli("127.0.0.1", port);
  json ok_pixels = pixels_of(torch::zeros({28, 28}, torch::kUInt8));
  json bad_value = ok_pixels;
  bad_value[5] = 300;
  struct Case {
    std::string name, type, body;
    int status;
    std::string reason;
  };
  const std::vector<Case> cases{
      {"undecodable image", "image/png", "\x89PNG\r\n\x1a\n not really a png", 400, "request body"},
      {"not an image at all", "image/jpeg", "hello", 400, "not a JPEG or PNG"},
      {"wrong size image", "image/png", png_of(torch::zeros({32, 30}, torch::kUInt8)), 400, "32x30"},
      {"invalid JSON", "application/json", "{\"pixels\": [1, 2", 400, "not valid JSON"},
      {"JSON without pixels", "application/json", "{\"foo\": 1}", 400, "\"pixels\""},
      {"wrong number of pixels", "application/json", "{\"pixels\": [1, 2, 3]}", 400, "has 3 values"},
      {"pixel out of range", "application/json", json{{"pixels", bad_value}}.dump(), 400, "0..255"},
      {"pixel not a number", "application/json", "{\"pixels\": [\"a\"]}", 400, "only numbers"},
      {"nested too deep", "application/json", "{\"pixels\": [[[[[1]]]]]}", 400, "nested"},
      {"empty instances", "application/json", "{\"instances\": []}", 400, "non-empty"},
      {"empty body", "image/png", "", 400, "empty"},
      {"unsupported type", "text/plain", "hi", 415, "image/png"},
      {"body too large", "image/png", std::string(100 * 1024, 'x'), 413, "--max-body-mb"},
  };
  for (const auto& c : cases) {
    auto res = cli.Post("/v1/predict", c.body, c.type.c_str());
    ASSERT_TRUE(res) << c.name << ": " << httplib::to_string(res.error());
    EXPECT_EQ(res->status, c.status) << c.name << ": " << res->body;
    json j;
    ASSERT_NO_THROW(j = json::parse(res->body)) << c.name << ": " << res->body;
    ASSERT_TRUE(j.contains("error")) << c.name;
    EXPECT_NE(j["error"].get<std::string>().find(c.reason), std::string::npos)
        << c.name << ": " << j["error"].get<std::string>();
  }
  // Malformed HTTP, straight on the socket.
  const std::string raw = raw_exchange(port, "THIS IS NOT HTTP\r\n\r\n");
  EXPECT_EQ(raw.rfind("HTTP/1.1 400", 0), 0u) << raw;
  EXPECT_NE(raw.find("malformed HTTP"), std::string::npos) << raw;
  auto res = cli.Get("/nope");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);
  EXPECT_NE(res->body.find("/v1/predict"), std::string::npos) << res->body;

  // None of it cost the service anything.
  res = cli.Post("/v1/predict", json{{"pixels", ok_pixels}}.dump(), "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
  res = cli.Get("/healthz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(json::parse(res->body)["status"], "ok");
  server.stop();  // every response written and logged
  const auto m = server.snapshot();
  EXPECT_EQ(m.requests_by_code.at(400), cases.size() - 2 + 1);  // + the malformed one
  EXPECT_EQ(m.requests_by_code.at(413), 1u);
  EXPECT_EQ(m.requests_by_code.at(415), 1u);
  EXPECT_EQ(m.requests_by_code.at(404), 1u);
}

TEST(Serve, FullQueueAnswers503WithRetryAfter) {
  auto model = small_cnn();
  auto o = quiet_options();
  o.max_batch = 1;
  o.max_wait_ms = 0;
  o.max_queue = 2;
  o.retry_after_s = 3;
  Server server(slow(make_predictor(model), 150), o);
  const int port = server.start();
  const auto body = png_of(torch::zeros({28, 28}, torch::kUInt8));
  int ok = 0, full = 0;
  for (auto& r : concurrent_posts(port, 10, body, "image/png")) {
    ASSERT_TRUE(r);
    if (r->status == 200) ++ok;
    if (r->status == 503) {
      ++full;
      EXPECT_EQ(r->get_header_value("Retry-After"), "3");
      EXPECT_NE(r->body.find("queue is full"), std::string::npos) << r->body;
    }
  }
  EXPECT_EQ(ok + full, 10);
  EXPECT_GE(ok, 2);   // the two queued, at least
  EXPECT_GE(full, 1);  // 10 at once into 1 running + 2 queued
}

TEST(Serve, StopDrainsRequestsInFlight) {
  auto model = small_cnn();
  auto o = quiet_options();
  o.max_batch = 4;
  o.max_wait_ms = 1;
  Server server(slow(make_predictor(model), 100), o);
  const int port = server.start();
  const auto body = png_of(torch::zeros({28, 28}, torch::kUInt8));
  std::vector<Reply> results;
  std::thread clients([&] { results = concurrent_posts(port, 12, body, "image/png"); });
  // Stop once all 12 are in (3 batches of 100 ms are still to run).
  for (int i = 0; i < 200 && server.snapshot().in_flight < 12; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(server.snapshot().in_flight, 12);
  std::thread stopper([&] { server.stop(); });
  server.wait();
  stopper.join();
  clients.join();
  for (auto& r : results) {
    ASSERT_TRUE(r) << r.transport_error;
    EXPECT_EQ(r->status, 200) << r->body;
  }
  // And it is closed now.
  httplib::Client cli("127.0.0.1", port);
  cli.set_connection_timeout(1, 0);
  EXPECT_FALSE(cli.Get("/healthz"));
}

TEST(Serve, OutOfMemoryHalvesTheBatchAndAnswersEveryRequest) {
  auto model = small_cnn();
  std::ostringstream events;
  auto o = quiet_options();
  o.event_log = &events;
  o.max_batch = 8;
  o.max_wait_ms = 50;
  Server server(fail_first_batches_with_oom(make_predictor(model), 2), o);
  const int port = server.start();
  auto ds = test_images(1);
  const auto expected = reference_probs(model, ds->get(0, {}).input);
  for (auto& r : concurrent_posts(port, 16, png_of(ds->images()[0][0]), "image/png")) {
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    expect_matches(json::parse(r->body), expected);
  }
  const auto m = server.snapshot();
  // 8 -> 4 -> 2 when the first batch is full; fewer halvings if it was not.
  EXPECT_GE(m.oom_halvings, 1u);
  EXPECT_LE(m.oom_halvings, 2u);
  EXPECT_LT(m.max_batch, 8);
  EXPECT_EQ(m.rows, 16u);
  server.stop();
  EXPECT_NE(events.str().find("out of memory in a batch of"), std::string::npos) << events.str();
}

TEST(Serve, APredictorThatThrowsFailsOnlyItsBatch) {
  auto model = small_cnn();
  auto inner = make_predictor(model);
  auto calls = std::make_shared<std::atomic<int>>(0);
  Predictor flaky = [inner, calls](const at::Tensor& x) {
    if (calls->fetch_add(1) == 0) TANDEM_FAIL("broken kernel");
    return inner(x);
  };
  auto o = quiet_options();
  o.max_wait_ms = 0;
  Server server(flaky, o);
  const int port = server.start();
  httplib::Client cli("127.0.0.1", port);
  const auto body = png_of(torch::zeros({28, 28}, torch::kUInt8));
  auto res = cli.Post("/v1/predict", body, "image/png");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 500);
  EXPECT_NE(res->body.find("broken kernel"), std::string::npos) << res->body;
  res = cli.Post("/v1/predict", body, "image/png");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
}

TEST(Serve, MetricsAndHealth) {
  auto model = small_cnn();
  auto o = quiet_options();
  o.device = "cpu";
  o.precision = "fp32";
  Server server(model, o);
  const int port = server.start();
  httplib::Client cli("127.0.0.1", port);
  // One connection: each request is logged (and counted) before the next one on it is read.
  cli.set_keep_alive(true);
  auto res = cli.Post("/v1/predict", png_of(torch::zeros({28, 28}, torch::kUInt8)), "image/png");
  ASSERT_TRUE(res);
  cli.Post("/v1/predict", "x", "image/png");
  res = cli.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  const std::string& t = res->body;
  for (const char* want :
       {"tandem_serve_requests_total{code=\"200\"} 1", "tandem_serve_errors_total{code=\"400\"} 1",
        "tandem_serve_request_latency_seconds_bucket{le=\"+Inf\"} 2", "tandem_serve_batch_size_bucket{le=\"1\"} 1",
        "tandem_serve_queue_depth 0", "device=\"cpu\"", "precision=\"fp32\"", "tandem_serve_max_batch 16"})
    EXPECT_NE(t.find(want), std::string::npos) << want << "\n" << t;
}

TEST(Serve, TakenPortIsAnErrorNamingIt) {
  auto model = small_cnn();
  Server a(model, quiet_options());
  const int port = a.start();
  auto o = quiet_options();
  o.port = port;
  Server b(model, o);
  try {
    b.start();
    FAIL() << "second server bound the same port";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("127.0.0.1:" + std::to_string(port)), std::string::npos) << e.what();
  }
}

TEST(Serve, LoadGeneratorCountsEveryRequest) {
  auto model = small_cnn();
  Server server(model, quiet_options());
  const int port = server.start();
  LoadOptions lo;
  lo.url = "http://127.0.0.1:" + std::to_string(port);
  lo.clients = 4;
  lo.requests = 200;
  lo.warmup = 8;
  const auto png = png_of(torch::zeros({28, 28}, torch::kUInt8));
  auto report = run_load(lo, {std::vector<uint8_t>(png.begin(), png.end())}, "image/png");
  EXPECT_EQ(report.requests, 200);
  EXPECT_EQ(report.ok, 200);
  EXPECT_EQ(report.errors, 0) << report.first_error;
  EXPECT_GT(report.throughput, 0);
  EXPECT_LE(report.p50_ms, report.p99_ms);
  auto j = json::parse(to_json(report));
  EXPECT_EQ(j["requests"], 200);
  // Errors are counted by code, not thrown.
  auto bad = run_load(lo, {std::vector<uint8_t>{'x'}}, "image/png");
  EXPECT_EQ(bad.errors, 200);
  EXPECT_EQ(bad.errors_by_code.at(400), 200);
  server.stop();  // every response written and logged
  EXPECT_EQ(server.snapshot().requests_by_code.at(200), 208u);
}

}  // namespace
}  // namespace tandem::serve
