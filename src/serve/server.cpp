// The HTTP side of tandem serve: request parsing, the endpoints, the access
// log, start and stop.
//
// Note [Serve threads]
// cpp-httplib runs each connection on a worker of its thread pool for the
// connection's whole keep-alive life. A worker parses the request, turns the
// body into normalised float rows (image decoding included: it is the part
// that scales with HTTP threads), queues them (Batcher::submit) and waits on
// the request's Pending for the inference thread's answer. The inference
// threads (one per predictor) never touch a socket, and the HTTP threads
// never run the model. httplib's own listener thread only accepts.
//
// Note [Serve stop]
// stop() first refuses new predictions (503, Connection: close), then waits
// until every prediction in flight has been answered (they are queued, and the
// inference thread keeps running), then stops the batcher and the listener.
// httplib's stop() closes only the listening socket: a worker that is writing
// a response finishes it, then sees the listener gone and closes its
// connection, and the pool joins it.
#include "tandem/serve/server.h"

#include <arpa/inet.h>
#include <signal.h>
#include <sys/socket.h>

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstring>
#include <ctime>
#include <iomanip>
#include <new>
#include <nlohmann/json.hpp>
#include <sstream>

#include "internal.h"
#include "tandem/data/image_codec.h"
#include "tandem/models/models.h"
#include "tandem/util/check.h"

namespace tandem::serve {

using json = nlohmann::json;
using detail::Clock;

const std::vector<std::string>& fashion_mnist_classes() {
  static const std::vector<std::string> names{"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                              "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  return names;
}

Predictor make_predictor(const models::Model& model) {
  TANDEM_CHECK(model.module && model.forward, "serve: the model has no module or no forward function");
  model.module->eval();
  auto module = model.module;  // keeps the parameters alive as long as the predictor
  auto forward = model.forward;
  return [module, forward](const at::Tensor& x) {
    c10::InferenceMode guard;
    return forward(x);
  };
}

Predictor fail_first_batches_with_oom(Predictor inner, int n) {
  auto left = std::make_shared<std::atomic<int>>(n);
  return [inner = std::move(inner), left](const at::Tensor& x) {
    if (x.size(0) > 1 && left->fetch_sub(1) > 0) throw std::bad_alloc();
    return inner(x);
  };
}

namespace {

// A request that is the client's fault (or the server's state): answered with
// `status` and {"error": message}.
struct HttpError {
  int status;
  std::string message;
};

// ---- Options ----

struct Resolved {
  ServeOptions o;
  int64_t c = 0, h = 0, w = 0;
};

// Checks the options and fills in the dependent defaults, in one place.
Resolved resolve(ServeOptions o) {
  TANDEM_CHECK(o.max_batch >= 1, "serve: --max-batch must be at least 1, got ", o.max_batch);
  TANDEM_CHECK(o.max_wait_ms >= 0, "serve: --max-wait-ms must be >= 0, got ", o.max_wait_ms);
  TANDEM_CHECK(o.max_queue >= 1, "serve: --max-queue must be at least 1, got ", o.max_queue);
  TANDEM_CHECK(o.max_body_mb > 0, "serve: --max-body-mb must be > 0, got ", o.max_body_mb);
  TANDEM_CHECK(o.port >= 0 && o.port <= 65535, "serve: --port must be in 0..65535 (0 = any free port), got ",
               o.port);
  TANDEM_CHECK(o.http_threads >= 1, "serve: http_threads must be at least 1, got ", o.http_threads);
  TANDEM_CHECK(o.input_shape.size() == 3 && o.input_shape[0] >= 1 && o.input_shape[1] >= 1 && o.input_shape[2] >= 1,
               "serve: the input shape must be [C, H, W] with positive sizes, got ", o.input_shape.size(),
               " values");
  Resolved r;
  r.c = o.input_shape[0];
  r.h = o.input_shape[1];
  r.w = o.input_shape[2];
  TANDEM_CHECK(r.c == 1 || r.c == 3, "serve: images are decoded to 1 or 3 channels; the model takes ", r.c);
  for (auto* v : {&o.mean, &o.stddev}) {
    const char* what = v == &o.mean ? "mean" : "stddev";
    if (v->size() == 1) v->assign(static_cast<size_t>(r.c), v->front());
    TANDEM_CHECK(static_cast<int64_t>(v->size()) == r.c, "serve: ", what, " has ", v->size(),
                 " values but the model takes ", r.c, " channels; give one value or one per channel");
  }
  for (double s : o.stddev) TANDEM_CHECK(s > 0, "serve: stddev values must be > 0, got ", s);
  r.o = std::move(o);
  return r;
}

// ---- Input parsing ----

// (x/255 - mean) / std, in place, with the same float operations as
// data::TensorDataset so that a served image gives the training pipeline's
// tensor bit for bit.
at::Tensor normalise(at::Tensor x, const Resolved& r) {
  x.div_(255.0);
  const auto& m = r.o.mean;
  const auto& s = r.o.stddev;
  const bool uniform = std::all_of(m.begin(), m.end(), [&](double v) { return v == m[0]; }) &&
                       std::all_of(s.begin(), s.end(), [&](double v) { return v == s[0]; });
  if (uniform) return x.sub_(m[0]).div_(s[0]);
  for (int64_t c = 0; c < r.c; ++c) x[c].sub_(m[static_cast<size_t>(c)]).div_(s[static_cast<size_t>(c)]);
  return x;
}

uint32_t be32(const uint8_t* p) { return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3]; }

// Width and height from the header, without decoding: a wrong-sized image is
// refused before the decoder allocates it. {0,0} when the header is not
// understood (the decoder then reports what is wrong).
std::pair<int64_t, int64_t> peek_size(const std::string& b) {
  const auto* d = reinterpret_cast<const uint8_t*>(b.data());
  const size_t n = b.size();
  if (n >= 24 && d[0] == 0x89 && std::memcmp(d + 12, "IHDR", 4) == 0) return {be32(d + 20), be32(d + 16)};
  if (n >= 4 && d[0] == 0xFF && d[1] == 0xD8) {
    size_t i = 2;
    while (i + 9 < n) {
      if (d[i] != 0xFF) return {0, 0};
      const uint8_t marker = d[i + 1];
      if (marker == 0xFF) {  // fill byte
        ++i;
        continue;
      }
      const size_t len = (size_t(d[i + 2]) << 8) | d[i + 3];
      // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC): precision, height, width.
      if (marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC)
        return {(int64_t(d[i + 5]) << 8) | d[i + 6], (int64_t(d[i + 7]) << 8) | d[i + 8]};
      if (len < 2) return {0, 0};
      i += 2 + len;
    }
  }
  return {0, 0};
}

std::string shape_str(int64_t h, int64_t w) { return std::to_string(h) + "x" + std::to_string(w); }

at::Tensor parse_image(const std::string& body, const Resolved& r) {
  auto [ph, pw] = peek_size(body);
  if (ph > 0 && (ph != r.h || pw != r.w))
    throw HttpError{400, "the image is " + shape_str(ph, pw) + " (HxW) but the model takes " +
                             shape_str(r.h, r.w) + "; resize it to " + shape_str(r.h, r.w) + " before sending"};
  at::Tensor hwc;
  try {
    hwc = data::decode_image(reinterpret_cast<const uint8_t*>(body.data()), body.size(), "request body",
                             static_cast<int>(r.c));
  } catch (const Error& e) {
    throw HttpError{400, e.what()};
  }
  if (hwc.size(0) != r.h || hwc.size(1) != r.w)
    throw HttpError{400, "the image is " + shape_str(hwc.size(0), hwc.size(1)) + " (HxW) but the model takes " +
                             shape_str(r.h, r.w) + "; resize it to " + shape_str(r.h, r.w) + " before sending"};
  return normalise(hwc.permute({2, 0, 1}).to(at::kFloat).contiguous(), r);
}

// Pixel values on the image scale (0..255), flat in [C, H, W] order or nested
// ([H][W], [C][H][W]): anything whose leaves, in order, are C*H*W numbers.
void flatten(const json& j, std::vector<float>& out, const std::string& where, int depth = 0) {
  if (j.is_array()) {
    // [C][H][W] is the deepest layout; deeper nesting is refused before it can exhaust the stack.
    if (depth >= 3) throw HttpError{400, where + " is nested more than 3 deep; send [C*H*W], [H][W] or [C][H][W]"};
    for (const auto& e : j) flatten(e, out, where, depth + 1);
    return;
  }
  if (!j.is_number())
    throw HttpError{400, where + " must hold only numbers (pixel values 0..255); found " +
                             std::string(j.type_name())};
  const double v = j.get<double>();
  if (!(v >= 0 && v <= 255))
    throw HttpError{400, where + "[" + std::to_string(out.size()) + "] is " + j.dump() +
                             "; pixel values must be in 0..255 (the server normalises them)"};
  out.push_back(static_cast<float>(v));
}

at::Tensor parse_pixels(const json& j, const Resolved& r, const std::string& where) {
  std::vector<float> v;
  v.reserve(static_cast<size_t>(r.c * r.h * r.w));
  flatten(j, v, where);
  if (static_cast<int64_t>(v.size()) != r.c * r.h * r.w)
    throw HttpError{400, where + " has " + std::to_string(v.size()) + " values but the model takes " +
                             std::to_string(r.c * r.h * r.w) + " (C*H*W = " + std::to_string(r.c) + "*" +
                             std::to_string(r.h) + "*" + std::to_string(r.w) + ")"};
  at::Tensor x = at::from_blob(v.data(), {r.c, r.h, r.w}, at::kFloat).clone();
  return normalise(x, r);
}

struct Parsed {
  std::vector<at::Tensor> rows;
  bool batch = false;  // {"instances": ...}: answered with {"predictions": [...]}
};

Parsed parse_json(const std::string& body, const Resolved& r, int64_t max_rows) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::parse_error& e) {
    throw HttpError{400, std::string("the body is not valid JSON: ") + e.what()};
  }
  if (!j.is_object() || (j.contains("pixels") == j.contains("instances")))
    throw HttpError{400, "a JSON body must be an object with either \"pixels\": [C*H*W values] or "
                         "\"instances\": [[C*H*W values], ...]"};
  if (j.contains("pixels")) return {{parse_pixels(j["pixels"], r, "pixels")}, false};
  const json& inst = j["instances"];
  if (!inst.is_array() || inst.empty())
    throw HttpError{400, "\"instances\" must be a non-empty array of pixel arrays"};
  if (static_cast<int64_t>(inst.size()) > max_rows)
    throw HttpError{400, "\"instances\" has " + std::to_string(inst.size()) + " inputs, more than the queue holds (" +
                             std::to_string(max_rows) + ", --max-queue); send them in smaller requests"};
  std::vector<at::Tensor> rows;
  rows.reserve(inst.size());
  for (size_t i = 0; i < inst.size(); ++i)
    rows.push_back(parse_pixels(inst[i], r, "instances[" + std::to_string(i) + "]"));
  return {std::move(rows), true};
}

std::string media_type(const httplib::Request& req) {
  std::string t = req.get_header_value("Content-Type");
  t = t.substr(0, t.find(';'));
  t.erase(std::remove_if(t.begin(), t.end(), [](unsigned char c) { return std::isspace(c); }), t.end());
  std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return std::tolower(c); });
  return t;
}

Parsed parse_body(const httplib::Request& req, const Resolved& r) {
  if (req.body.empty())
    throw HttpError{400, "the body is empty; send a PNG or JPEG image (Content-Type image/png or image/jpeg) or "
                         "JSON {\"pixels\": [...]}"};
  std::string type = media_type(req);
  if (type.empty() || type == "application/octet-stream") {  // sniff
    const auto c0 = static_cast<unsigned char>(req.body[0]);
    type = c0 == 0x89 || c0 == 0xFF ? "image/*" : c0 == '{' ? "application/json" : type;
  }
  // The decoder goes by the magic bytes, so a PNG labelled image/jpeg still decodes.
  if (type == "image/png" || type == "image/jpeg" || type == "image/jpg" || type == "image/*")
    return {{parse_image(req.body, r)}, false};
  if (type == "application/json") return parse_json(req.body, r, r.o.max_queue);
  throw HttpError{415, "Content-Type '" + req.get_header_value("Content-Type") +
                           "' is not served; use image/png, image/jpeg or application/json"};
}

// ---- Access log ----

// The answering thread's request: httplib runs a request start to finish on
// one worker thread, and its logger (called after the response is written)
// has no other way to learn when the request began or which batch it rode in.
struct RequestContext {
  Clock::time_point start{};
  int64_t batch = 0;
};
thread_local RequestContext t_request;

std::string utc_now() {
  const auto now = std::chrono::system_clock::now();
  const auto t = std::chrono::system_clock::to_time_t(now);
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  char out[48];
  std::snprintf(out, sizeof out, "%s.%03dZ", buf, static_cast<int>(ms));
  return out;
}

// Sets the listen backlog that httplib hard-codes (5, compiled into Debian's
// libcpp-httplib): 64 clients connecting at once overflow it, and the kernel
// then drops SYNs, which costs the client a 1 s retransmit.
class HttpServer : public httplib::Server {
 public:
  void set_backlog(int n) { ::listen(svr_sock_, n); }
};

}  // namespace

// ---- Server ----

struct Server::Impl {
  Impl(std::vector<Predictor> p, ServeOptions o)
      : predictors(std::move(p)),
        r(resolve(std::move(o))),
        metrics(r.o.model_name, r.o.device, r.o.precision) {
    TANDEM_CHECK(!predictors.empty(), "serve: no predictor given");
    for (auto& f : predictors) TANDEM_CHECK(static_cast<bool>(f), "serve: a predictor is empty");
  }

  std::vector<Predictor> predictors;
  Resolved r;
  detail::MetricsRegistry metrics;
  std::unique_ptr<detail::Batcher> batcher;
  HttpServer http;
  std::thread listener;
  int port = -1;
  std::vector<std::string> classes;

  std::atomic<bool> stopping{false};
  std::atomic<int64_t> in_flight{0};
  std::mutex stop_mu;
  std::mutex state_mu;
  std::condition_variable state_cv;  // in_flight reaching 0, stopped
  bool started = false, stopped = false, listener_done = false;
  std::mutex log_mu;

  void event(const std::string& msg) {
    if (!r.o.event_log) return;
    std::lock_guard<std::mutex> lock(log_mu);
    *r.o.event_log << "[tandem serve] " << msg << std::endl;
  }

  void error_body(httplib::Response& res, int status, const std::string& message) {
    res.status = status;
    res.set_content(json{{"error", message}}.dump(), "application/json");
  }

  void predict(const httplib::Request& req, httplib::Response& res);
  void log_request(const httplib::Request& req, const httplib::Response& res);
  void setup_routes();
};

void Server::Impl::predict(const httplib::Request& req, httplib::Response& res) {
  in_flight.fetch_add(1);
  struct Leave {  // in_flight back down, and stop() told, however we leave
    Impl* self;
    ~Leave() {
      if (self->in_flight.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(self->state_mu);
        self->state_cv.notify_all();
      }
    }
  } leave{this};
  auto stopping_answer = [&] {
    error_body(res, 503, "the server is stopping; send the request to another replica");
    res.set_header("Connection", "close");
    res.set_header("Retry-After", std::to_string(r.o.retry_after_s));
  };
  if (stopping.load()) return stopping_answer();

  Parsed parsed;
  try {
    parsed = parse_body(req, r);
  } catch (const HttpError& e) {
    return error_body(res, e.status, e.message);
  } catch (const std::bad_alloc&) {
    return error_body(res, 507, "out of memory decoding the request");
  }
  auto pending = std::make_shared<detail::Pending>(parsed.rows.size());
  switch (batcher->submit(std::move(parsed.rows), pending)) {
    case detail::Admit::kQueued:
      break;
    case detail::Admit::kStopping:
      return stopping_answer();
    case detail::Admit::kFull:
      res.set_header("Retry-After", std::to_string(r.o.retry_after_s));
      return error_body(res, 503, "the queue is full (" + std::to_string(r.o.max_queue) +
                                      " inputs, --max-queue); retry later");
  }
  std::unique_lock<std::mutex> lock(pending->mu);
  if (!pending->cv.wait_for(lock, r.o.request_timeout, [&] { return pending->remaining == 0; }))
    return error_body(res, 504, "no answer within " + std::to_string(r.o.request_timeout.count()) +
                                    " ms (request_timeout); the server is overloaded");
  lock.unlock();  // answered: nothing writes to it any more
  t_request.batch = pending->batch_size;
  if (pending->status != 200) return error_body(res, pending->status, pending->error);

  auto answer = [&](const std::vector<float>& p) {
    const float* d = p.data();
    const int64_t k = static_cast<int64_t>(p.size());
    const int64_t best = std::max_element(d, d + k) - d;
    json probs = json::array();
    for (int64_t i = 0; i < k; ++i) probs.push_back(d[i]);
    // No names given: Fashion-MNIST's for a 10-class model, else the index.
    const auto& names = classes.empty() && k == 10 ? fashion_mnist_classes() : classes;
    const std::string name =
        best < static_cast<int64_t>(names.size()) ? names[static_cast<size_t>(best)] : std::to_string(best);
    return json{{"class_index", best}, {"class_name", name}, {"probabilities", std::move(probs)}};
  };
  json out;
  if (!parsed.batch) {
    out = answer(pending->probs[0]);
  } else {
    out["predictions"] = json::array();
    for (const auto& p : pending->probs) out["predictions"].push_back(answer(p));
  }
  out["batch_size"] = pending->batch_size;
  res.set_content(out.dump(), "application/json");
}

void Server::Impl::log_request(const httplib::Request& req, const httplib::Response& res) {
  const auto start = t_request.start;
  const double seconds =
      start == Clock::time_point{} ? 0.0 : std::chrono::duration<double>(Clock::now() - start).count();
  metrics.record_request(res.status, seconds);
  if (r.o.access_log && !r.o.quiet) {
    std::ostringstream line;
    line << utc_now() << ' ' << (req.remote_addr.empty() ? "-" : req.remote_addr) << ' '
         << (req.method.empty() ? "-" : req.method) << ' ' << (req.path.empty() ? "-" : req.path) << ' ' << res.status
         << ' ' << std::fixed << std::setprecision(3) << seconds * 1e3 << "ms batch=" << t_request.batch << '\n';
    std::lock_guard<std::mutex> lock(log_mu);
    *r.o.access_log << line.str() << std::flush;
  }
  t_request = RequestContext{};
}

void Server::Impl::setup_routes() {
  const auto& o = r.o;
  http.set_payload_max_length(static_cast<size_t>(o.max_body_mb * 1024 * 1024));
  const int threads = o.http_threads;
  http.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  // Keep-alive connections stay for 1000 requests (httplib's default is 5,
  // which makes a load generator reconnect all the time).
  http.set_keep_alive_max_count(1000);
  http.set_tcp_nodelay(true);  // answers are small: no Nagle delay
  // httplib's default also sets SO_REUSEPORT, with which a second server on
  // the same port binds without error and the kernel splits connections
  // between the two. SO_REUSEADDR alone still allows a restart while old
  // connections sit in TIME_WAIT.
  http.set_socket_options([](socket_t sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });

  http.set_pre_routing_handler([](const httplib::Request&, httplib::Response&) {
    t_request = RequestContext{Clock::now(), 0};
    return httplib::Server::HandlerResponse::Unhandled;
  });
  http.Post("/v1/predict", [this](const httplib::Request& req, httplib::Response& res) { predict(req, res); });
  http.Get("/healthz", [this](const httplib::Request&, httplib::Response& res) {
    const bool down = stopping.load();
    res.status = down ? 503 : 200;
    res.set_content(json{{"status", down ? "stopping" : "ok"},
                         {"model", r.o.model_name},
                         {"device", r.o.device},
                         {"precision", r.o.precision},
                         {"max_batch", batcher->max_batch()},
                         {"queue_depth", batcher->queue_depth()}}
                        .dump(),
                    "application/json");
  });
  http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    Metrics m = metrics.snapshot();
    m.queue_depth = batcher->queue_depth();
    m.max_batch = batcher->max_batch();
    m.in_flight = in_flight.load();
    if (r.o.device_memory) m.device_memory_bytes = r.o.device_memory();
    res.set_content(m.to_prometheus(), "text/plain; version=0.0.4");
  });
  // Answers httplib made itself (malformed request, body too large, no such
  // route) get a JSON reason too; our own errors already carry one.
  http.set_error_handler(httplib::Server::HandlerWithResponse([this](const httplib::Request& req,
                                                                     httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    std::string msg;
    switch (res.status) {
      case 400:
        msg = "malformed HTTP request (request line or headers could not be parsed)";
        break;
      case 404:
        msg = "no such endpoint: " + req.method + " " + req.path +
              "; endpoints: POST /v1/predict, GET /healthz, GET /metrics";
        break;
      case 405:
        msg = "method " + req.method + " not allowed on " + req.path;
        break;
      case 413: {
        std::ostringstream os;
        os << "the body is larger than " << r.o.max_body_mb << " MiB (--max-body-mb)";
        msg = os.str();
        break;
      }
      case 414:
        msg = "the request URI is too long";
        break;
      default:
        msg = "HTTP error " + std::to_string(res.status);
    }
    error_body(res, res.status, msg);
    return httplib::Server::HandlerResponse::Handled;
  }));
  http.set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    error_body(res, 500, "internal error: " + what);
  });
  http.set_logger([this](const httplib::Request& req, const httplib::Response& res) { log_request(req, res); });
}

Server::Server(Predictor predictor, ServeOptions options)
    : Server(std::vector<Predictor>{std::move(predictor)}, std::move(options)) {}

Server::Server(std::vector<Predictor> predictors, ServeOptions options)
    : impl_(std::make_unique<Impl>(std::move(predictors), std::move(options))) {}

Server::Server(const models::Model& model, ServeOptions options)
    : Server(make_predictor(model), std::move(options)) {}

Server::~Server() {
  try {
    stop();
  } catch (...) {  // a destructor must not throw; stop() only joins threads
  }
}

int Server::start() {
  auto& d = *impl_;
  {
    std::lock_guard<std::mutex> lock(d.state_mu);
    TANDEM_CHECK(!d.started, "serve: start() was called twice; a Server starts once");
    d.started = true;
  }
  const auto& o = d.r.o;
  d.classes = o.class_names;
  // Debian's libcpp-httplib writes with send flags 0 (no MSG_NOSIGNAL): a
  // client that hangs up mid-response would kill the process with SIGPIPE.
  // Ignored unless the program installed a handler of its own.
  struct sigaction old {};
  if (::sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_DFL) ::signal(SIGPIPE, SIG_IGN);
  d.batcher = std::make_unique<detail::Batcher>(
      d.predictors, o.max_batch, o.max_wait_ms, o.max_queue, d.metrics,
      [&d](const std::string& msg) { d.event(msg); });
  d.setup_routes();
  if (o.port == 0) {
    d.port = d.http.bind_to_any_port(o.host);
  } else {
    d.port = d.http.bind_to_port(o.host, o.port) ? o.port : -1;
  }
  if (d.port < 0) {
    d.batcher->stop();
    std::lock_guard<std::mutex> lock(d.state_mu);
    d.stopped = true;
    TANDEM_FAIL("serve: cannot listen on ", o.host, ":", o.port,
                ": the port is taken or the address is not this machine's; pick another --port (0 = any free "
                "one) or --host");
  }
  d.http.set_backlog(1024);
  d.listener = std::thread([&d] {
    d.http.listen_after_bind();
    std::lock_guard<std::mutex> lock(d.state_mu);
    d.listener_done = true;
    d.state_cv.notify_all();
  });
  // httplib's stop() does nothing until the listener is running: wait for it,
  // so that a stop() right after start() cannot be lost.
  while (!d.http.is_running()) {
    {
      std::lock_guard<std::mutex> lock(d.state_mu);
      if (d.listener_done) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::ostringstream os;
  os << "serving " << o.model_name << " on http://" << o.host << ":" << d.port << " (device " << o.device
     << ", precision " << o.precision << ", max batch " << o.max_batch << ", max wait " << o.max_wait_ms
     << " ms, max queue " << o.max_queue << ", " << o.http_threads << " HTTP threads, " << d.predictors.size()
     << (d.predictors.size() == 1 ? " instance" : " instances") << " x "
     << (o.intra_op_threads > 0 ? o.intra_op_threads : at::get_num_threads()) << " intra-op threads)";
  d.event(os.str());
  return d.port;
}

void Server::wait() {
  auto& d = *impl_;
  std::unique_lock<std::mutex> lock(d.state_mu);
  d.state_cv.wait(lock, [&] { return d.stopped || !d.started || d.listener_done; });
}

void Server::stop() {
  auto& d = *impl_;
  static std::mutex stop_mu;  // one stop() at a time; the others wait for it to finish
  std::lock_guard<std::mutex> stop_lock(stop_mu);
  {
    std::lock_guard<std::mutex> lock(d.state_mu);
    if (!d.started || d.stopped) return;
  }
  d.stopping.store(true);
  d.event("stopping: answering the requests in flight");
  {
    // Note [Serve stop]: the requests in flight are answered first.
    std::unique_lock<std::mutex> lock(d.state_mu);
    if (!d.state_cv.wait_for(lock, d.r.o.drain_timeout, [&] { return d.in_flight.load() == 0; }))
      d.event("drain_timeout passed with " + std::to_string(d.in_flight.load()) + " requests unanswered");
  }
  d.batcher->stop();
  d.http.stop();
  if (d.listener.joinable()) d.listener.join();
  {
    std::lock_guard<std::mutex> lock(d.state_mu);
    d.stopped = true;
  }
  d.state_cv.notify_all();
  d.event("stopped");
}

Metrics Server::snapshot() const {
  auto& d = *impl_;
  Metrics m = d.metrics.snapshot();
  if (d.batcher) {
    m.queue_depth = d.batcher->queue_depth();
    m.max_batch = d.batcher->max_batch();
  }
  m.in_flight = d.in_flight.load();
  if (d.r.o.device_memory) m.device_memory_bytes = d.r.o.device_memory();
  return m;
}

int Server::port() const { return impl_->port; }

}  // namespace tandem::serve
