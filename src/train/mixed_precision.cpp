// Autocast and the loss scaler. See include/tandem/train/mixed_precision.h.
#include "tandem/train/mixed_precision.h"

#include <cmath>
#include <cstdlib>
#include <limits>

#include <ATen/autocast_mode.h>
#include <torch/version.h>

#include "tandem/util/check.h"

// LibTorch 2.4 made the autocast calls device-generic
// (at::autocast::set_autocast_enabled(device, on)) and deprecated the
// per-device ones (is_cpu_enabled, set_autocast_cpu_dtype, ...).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
#define TANDEM_AUTOCAST_GENERIC 1
#else
#define TANDEM_AUTOCAST_GENERIC 0
#endif

namespace tandem::train {
namespace {

bool autocast_enabled(c10::DeviceType d) {
#if TANDEM_AUTOCAST_GENERIC
  return at::autocast::is_autocast_enabled(d);
#else
  return d == c10::DeviceType::CUDA ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled();
#endif
}

void set_autocast_enabled(c10::DeviceType d, bool on) {
#if TANDEM_AUTOCAST_GENERIC
  at::autocast::set_autocast_enabled(d, on);
#else
  if (d == c10::DeviceType::CUDA) at::autocast::set_enabled(on);
  else at::autocast::set_cpu_enabled(on);
#endif
}

at::ScalarType autocast_type(c10::DeviceType d) {
#if TANDEM_AUTOCAST_GENERIC
  return at::autocast::get_autocast_dtype(d);
#else
  return d == c10::DeviceType::CUDA ? at::autocast::get_autocast_gpu_dtype() : at::autocast::get_autocast_cpu_dtype();
#endif
}

void set_autocast_type(c10::DeviceType d, at::ScalarType t) {
#if TANDEM_AUTOCAST_GENERIC
  at::autocast::set_autocast_dtype(d, t);
#else
  if (d == c10::DeviceType::CUDA) at::autocast::set_autocast_gpu_dtype(t);
  else at::autocast::set_autocast_cpu_dtype(t);
#endif
}

}  // namespace

Precision parse_precision(const std::string& s) {
  if (s == "fp32") return Precision::kFp32;
  if (s == "bf16") return Precision::kBf16;
  if (s == "fp16") return Precision::kFp16;
  TANDEM_CHECK(s != "int8", "--precision int8 is for inference (tandem serve --precision int8); training takes fp32, "
               "bf16 or fp16");
  TANDEM_FAIL("--precision '", s, "' is unknown: choose fp32 (no autocast), bf16 (autocast to bfloat16; CPU or "
              "CUDA) or fp16 (autocast to float16 with a dynamic loss scaler; CUDA)");
}

at::ScalarType autocast_dtype(Precision p) {
  switch (p) {
    case Precision::kBf16: return at::kBFloat16;
    case Precision::kFp16: return at::kHalf;
    default: return at::kFloat;
  }
}

bool autocast_supported(c10::DeviceType device, Precision p, std::string* why) {
  if (p == Precision::kFp32 || device == c10::DeviceType::CUDA) return true;
  if (device == c10::DeviceType::CPU && p == Precision::kBf16) return true;
  if (why) {
    if (device == c10::DeviceType::CPU)
      // LibTorch 1.13's at::autocast::set_autocast_cpu_dtype(kHalf) throws
      // "AutocastCPU only support Bfloat16"; later versions accept it, but
      // without fp16 matrix units a CPU gains nothing from it.
      *why = "CPU autocast supports bf16 only (LibTorch 1.13 refuses float16 on the CPU); use --precision bf16 "
             "on a CPU model device, or fp16 with --model-device cuda";
    else
      *why = std::string("autocast does not support device type ") + c10::DeviceTypeName(device);
  }
  return false;
}

AutocastGuard::AutocastGuard(c10::DeviceType device, Precision p) : device_(device) {
  if (p == Precision::kFp32) return;
  std::string why;
  TANDEM_CHECK(autocast_supported(device, p, &why), "--precision ", device::to_string(p), ": ", why);
  prev_enabled_ = autocast_enabled(device_);
  prev_dtype_ = autocast_type(device_);
  set_autocast_enabled(device_, true);
  set_autocast_type(device_, autocast_dtype(p));
  at::autocast::increment_nesting();
  active_ = true;
}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  // The cache holds the 16-bit copies of the weights made in this forward;
  // they are stale after the optimiser step.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  set_autocast_enabled(device_, prev_enabled_);
  set_autocast_type(device_, prev_dtype_);
}

std::optional<LossScalerOptions> parse_loss_scale(const std::string& spec, Precision p) {
  if (spec == "none") return std::nullopt;
  if (spec == "auto") {
    if (p != Precision::kFp16) return std::nullopt;
    return LossScalerOptions{};
  }
  if (spec == "dynamic") return LossScalerOptions{};
  char* end = nullptr;
  const double v = std::strtod(spec.c_str(), &end);
  TANDEM_CHECK(!spec.empty() && end && *end == '\0' && std::isfinite(v) && v > 0, "--loss-scale '", spec,
               "' is not auto (dynamic for --precision fp16, none otherwise), dynamic, none or a fixed positive "
               "number such as 1024");
  LossScalerOptions o;
  o.init_scale = v;
  o.dynamic = false;
  return o;
}

LossScaler::LossScaler(LossScalerOptions o) : o_(o), scale_(o.init_scale) {
  TANDEM_CHECK(std::isfinite(o_.init_scale) && o_.init_scale > 0, "loss scaler: the initial scale must be a "
               "positive number, got ", o_.init_scale);
  TANDEM_CHECK(o_.growth_factor >= 1 && o_.backoff_factor > 0 && o_.backoff_factor < 1 && o_.growth_interval >= 1,
               "loss scaler: need growth_factor >= 1, 0 < backoff_factor < 1 and growth_interval >= 1");
}

bool LossScaler::unscale_and_check(const std::vector<at::Tensor>& params, comm::Communicator* comm) {
  // One flag per gradient, reduced on the gradients' device, then a single
  // read: on CUDA one synchronisation per step, not one per tensor.
  std::vector<at::Tensor> finite;
  for (const auto& p : params) {
    const auto& g = p.grad();
    if (g.defined()) finite.push_back(at::isfinite(g).all());
  }
  bool bad = !finite.empty() && !at::stack(finite).all().item<bool>();
  if (comm && comm->size() > 1) {
    // Note: the one extra collective of a scaled step; every rank issues it.
    auto flag = at::full({1}, bad ? 1.0f : 0.0f, at::kFloat);
    comm->all_reduce(flag, comm::ReduceOp::kMax);
    bad = flag.item<float>() > 0;
  }
  if (bad) return false;
  at::NoGradGuard no_grad;
  for (const auto& p : params) {
    auto g = p.grad();
    if (g.defined()) g.div_(scale_);
  }
  return true;
}

void LossScaler::update(bool found_inf) {
  if (found_inf) {
    ++skipped_;
    good_run_ = 0;
    // Not below fp16's smallest normal: a scale that small means the loss
    // itself is inf or nan, and halving further would only reach 0 (and
    // divide finite gradients by it).
    if (o_.dynamic) scale_ = std::max(scale_ * o_.backoff_factor, 1.0 / 16384.0);
    return;
  }
  if (++good_run_ >= o_.growth_interval) {
    good_run_ = 0;
    // Never past fp32's largest number: the loss is multiplied in fp32.
    if (o_.dynamic && scale_ * o_.growth_factor <= std::numeric_limits<float>::max()) scale_ *= o_.growth_factor;
  }
}

nlohmann::json LossScaler::state() const {
  return {{"scale", scale_},          {"skipped_steps", skipped_},        {"good_run", good_run_},
          {"dynamic", o_.dynamic},    {"init_scale", o_.init_scale},      {"growth_interval", o_.growth_interval}};
}

void LossScaler::load_state(const nlohmann::json& j) {
  scale_ = j.at("scale").get<double>();
  skipped_ = j.at("skipped_steps").get<int64_t>();
  good_run_ = j.at("good_run").get<int64_t>();
}

}  // namespace tandem::train
