// `tandem bench infer`: the seed's CPU-vs-GPU table. Forward-pass latency and
// throughput per model size, batch, precision and device, as markdown and
// JSON. Devices that are absent are skipped with a note; a precision a device
// refuses (fp16 convolutions on the CPU, int8 on CUDA) is a cell saying so.
#include <cstdio>
#include <iostream>
#include <memory>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "commands.h"
#include "tandem/device/device.h"
#include "tandem/device/policy.h"
#include "tandem/models/models.h"
#include "tandem/util/check.h"

namespace tandem::cli {
namespace {

struct InferArgs {
  std::vector<std::string> models{"mlp", "cnn", "resnet18", "resnet50"};
  std::vector<std::string> devices{"cpu", "cuda:0"};
  std::vector<std::string> precisions{"fp32"};
  std::vector<int> batches{1, 4, 16};
  std::vector<int64_t> cnn_shape{1, 28, 28}, resnet_shape{3, 224, 224};
  int64_t num_classes = 10;
  double budget_ms = 300;
  int threads = 0;
  std::string json;
};

struct Cell {
  std::string model, precision, device;
  int batch = 0;
  bool ran = false;
  double ms = 0, images_per_s = 0;
  std::string note;
};

std::string refusal(const std::exception& e) {
  std::string what = e.what();
  if (auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
  return what.size() > 160 ? what.substr(0, 160) + "..." : what;
}

void run_bench_infer(const InferArgs& a) {
  TANDEM_CHECK(!a.models.empty() && !a.devices.empty() && !a.batches.empty() && !a.precisions.empty(),
               "bench infer: --models, --devices, --batch and --precisions each need at least one value");
  for (int b : a.batches) TANDEM_CHECK(b >= 1, "--batch: sizes must be >= 1, got ", b);
  TANDEM_CHECK(a.budget_ms > 0, "--budget-ms must be > 0, got ", a.budget_ms);
  for (const auto& p : a.precisions) device::parse_precision(p, "--precisions");
  for (const auto& m : a.models)
    TANDEM_CHECK(models::block_count(m) > 0, "--models: unknown model '", m, "' (mlp, cnn, resnet18, resnet50)");
  // LibTorch's default is the physical cores, which a VM may report as fewer
  // than its vCPUs (one here, for two): every core unless --threads says.
  at::set_num_threads(a.threads > 0 ? a.threads : device::usable_cpus());

  std::vector<c10::Device> devices;
  nlohmann::json skipped = nlohmann::json::array();
  for (const auto& spec : a.devices) {
    try {
      devices.push_back(device::parse(spec, "--devices"));
    } catch (const std::exception& e) {
      std::printf("note: %s skipped: %s\n", spec.c_str(), refusal(e).c_str());
      skipped.push_back({{"device", spec}, {"why", refusal(e)}});
    }
  }
  TANDEM_CHECK(!devices.empty(), "bench infer: none of --devices is present on this machine");

  std::vector<Cell> cells;
  nlohmann::json model_info = nlohmann::json::object();
  for (const auto& name : a.models) {
    const bool small = name == "mlp" || name == "cnn";
    const models::ModelSpec spec{name, a.num_classes, small ? a.cnn_shape : a.resnet_shape};
    int64_t params = 0;
    for (const auto& p : models::make_model(spec).module->parameters()) params += p.numel();
    model_info[name] = {{"parameters", params}, {"input_shape", spec.input_shape}};
    for (const auto& prec : a.precisions) {
      for (const auto& dev : devices) {
        // One model per (precision, device): prepare() converts it in place.
        device::Forward f;
        std::string refused;
        torch::manual_seed(0);
        auto m = models::make_model(spec);
        try {
          f = device::prepare(m, device::parse_precision(prec), dev);
        } catch (const std::exception& e) {
          refused = refusal(e);
        }
        for (int b : a.batches) {
          Cell c;
          c.model = name;
          c.precision = prec;
          c.device = dev.str();
          c.batch = b;
          if (refused.empty()) {
            try {
              auto x = torch::randn({b, spec.input_shape[0], spec.input_shape[1], spec.input_shape[2]}).to(dev);
              c.ms = device::time_forward(f, x, a.budget_ms);
              c.images_per_s = 1e3 * b / c.ms;
              c.ran = true;
            } catch (const std::exception& e) {
              c.note = refusal(e);
            }
          } else {
            c.note = refused;
          }
          std::fprintf(stderr, "[bench infer] %s %s %s batch %d: %s\n", name.c_str(), prec.c_str(),
                       c.device.c_str(), b, c.ran ? (std::to_string(c.ms) + " ms").c_str() : c.note.c_str());
          cells.push_back(c);
        }
      }
    }
  }

  // The table: a row per (model, precision, batch), a column pair per device,
  // and the speed-up of each further device over the first.
  auto find = [&](const std::string& m, const std::string& p, const std::string& d, int b) -> const Cell* {
    for (const auto& c : cells)
      if (c.model == m && c.precision == p && c.device == d && c.batch == b) return &c;
    return nullptr;
  };
  std::ostringstream md;
  md << "| model | parameters | precision | batch |";
  for (const auto& d : devices) md << " " << d.str() << " ms | " << d.str() << " img/s |";
  for (size_t i = 1; i < devices.size(); ++i) md << " speed-up " << devices[i].str() << " |";
  md << "\n|---|---|---|---|";
  for (size_t i = 0; i < devices.size(); ++i) md << "---|---|";
  for (size_t i = 1; i < devices.size(); ++i) md << "---|";
  md << "\n";
  char buf[64];
  for (const auto& name : a.models)
    for (const auto& prec : a.precisions)
      for (int b : a.batches) {
        std::snprintf(buf, sizeof buf, "%.2fM", model_info[name]["parameters"].get<double>() / 1e6);
        md << "| " << name << " | " << buf << " | " << prec << " | " << b << " |";
        for (const auto& d : devices) {
          const Cell* c = find(name, prec, d.str(), b);
          if (c && c->ran) {
            std::snprintf(buf, sizeof buf, " %.3f | %.0f |", c->ms, c->images_per_s);
            md << buf;
          } else {
            md << " refused | |";
          }
        }
        const Cell* first = find(name, prec, devices[0].str(), b);
        for (size_t i = 1; i < devices.size(); ++i) {
          const Cell* c = find(name, prec, devices[i].str(), b);
          if (first && first->ran && c && c->ran) {
            std::snprintf(buf, sizeof buf, " %.1fx |", first->ms / c->ms);
            md << buf;
          } else {
            md << " |";
          }
        }
        md << "\n";
      }
  std::printf("%s", md.str().c_str());
  for (const auto& c : cells)
    if (!c.ran && c.batch == a.batches.front())
      std::printf("refused: %s %s on %s: %s\n", c.model.c_str(), c.precision.c_str(), c.device.c_str(),
                  c.note.c_str());

  if (!a.json.empty()) {
    nlohmann::json j;
    j["models"] = model_info;
    j["devices"] = nlohmann::json::array();
    for (const auto& d : devices) j["devices"].push_back(d.str());
    j["skipped"] = skipped;
    j["threads"] = at::get_num_threads();
    j["results"] = nlohmann::json::array();
    for (const auto& c : cells) {
      nlohmann::json r{{"model", c.model}, {"precision", c.precision}, {"device", c.device}, {"batch", c.batch},
                       {"ran", c.ran}};
      if (c.ran) {
        r["ms"] = c.ms;
        r["images_per_s"] = c.images_per_s;
      } else {
        r["note"] = c.note;
      }
      j["results"].push_back(r);
    }
    j["markdown"] = md.str();
    write_json_file(a.json, j.dump(2));
  }
}

}  // namespace

void register_bench_infer(CLI::App& bench) {
  auto* sub = bench.add_subcommand("infer", "Forward-pass latency and throughput per model, batch, precision and "
                                            "device: the CPU-vs-GPU table, as markdown and JSON");
  auto a = std::make_shared<InferArgs>();
  sub->add_option("--models", a->models, "Models (mlp, cnn, resnet18, resnet50)")->delimiter(',')->capture_default_str();
  sub->add_option("--devices", a->devices, "Devices; absent ones are skipped with a note")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--batch", a->batches, "Batch sizes")->delimiter(',')->capture_default_str();
  sub->add_option("--precisions", a->precisions, "Precisions: fp32, bf16, fp16, int8")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--input-shape", a->cnn_shape, "C,H,W of mlp and cnn inputs")
      ->expected(3)
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--resnet-input-shape", a->resnet_shape, "C,H,W of resnet18 and resnet50 inputs (ImageNet's)")
      ->expected(3)
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--num-classes", a->num_classes, "Output classes")->capture_default_str();
  sub->add_option("--budget-ms", a->budget_ms, "Time spent timing each cell (median of at least 3 runs)")
      ->capture_default_str();
  sub->add_option("--threads", a->threads, "Intra-op threads (0: every CPU this process may use)")
      ->capture_default_str();
  sub->add_option("--json", a->json, "Also write the results (and the markdown table) to this JSON file");
  sub->footer("Example: tandem bench infer --models cnn,resnet18 --devices cpu,cuda:0 --batch 1,4,16 --json infer.json");
  sub->callback([a] { run_bench_infer(*a); });
}

}  // namespace tandem::cli
