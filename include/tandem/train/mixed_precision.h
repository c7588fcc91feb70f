#pragma once
// Mixed precision training: autocast for the forward pass, and a loss scaler
// for fp16 (docs/algorithms.md "Mixed precision and loss scaling").
//
// Autocast runs the matrix products (convolutions, linear layers) of the
// forward pass in a 16-bit type while the parameters, their gradients, the
// optimiser and the loss stay fp32. fp16 has a narrow exponent: small
// gradients flush to zero. The LossScaler multiplies the loss by a scale S
// before backward, so that the gradients are S times larger in the 16-bit
// part of the graph, and divides the fp32 gradients by S before the update.
// A scale too large overflows to inf or nan; then the step is skipped and S
// halved. bf16 has fp32's exponent and needs no scaler.
//
// Threads: an AutocastGuard acts on the calling thread only (autocast state
// is thread-local); a LossScaler belongs to the training thread of one rank.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "tandem/comm/communicator.h"
#include "tandem/device/policy.h"

namespace tandem::train {

// One precision type for training and inference (device/policy.h);
// device::to_string names it. Training takes fp32, bf16 and fp16.
using device::Precision;

// "fp32" | "bf16" | "fp16"; throws tandem::Error naming --precision and the
// accepted values (int8 is an inference precision: tandem serve).
Precision parse_precision(const std::string& s);
// The 16-bit type autocast computes in (kFloat for kFp32).
at::ScalarType autocast_dtype(Precision p);
// Whether autocast on `device` can compute in `p`: CUDA takes fp16 and bf16;
// CPU takes bf16 (LibTorch 1.13's CPU autocast refuses float16);
// fp32 runs anywhere. False with the reason in `why`.
bool autocast_supported(c10::DeviceType device, Precision p, std::string* why = nullptr);

// Autocast on this thread for `device` (kCPU or kCUDA) in `p`'s type, from
// construction to destruction; the previous state (enabled, type) comes back
// and the cache of casted weights is dropped when the outermost guard ends,
// as torch.autocast's __exit__ does. Precision::kFp32 makes a guard that does
// nothing. Backward needs no guard: autograd replays the types of the forward.
class AutocastGuard {
 public:
  AutocastGuard(c10::DeviceType device, Precision p);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  c10::DeviceType device_;
  bool active_ = false;
  bool prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kFloat;
};

// PyTorch GradScaler's defaults.
struct LossScalerOptions {
  double init_scale = 65536.0;   // 2^16
  double growth_factor = 2.0;    // after growth_interval finite steps in a row
  double backoff_factor = 0.5;   // after a step with inf or nan
  int64_t growth_interval = 2000;
  // false: a fixed scale (--loss-scale N). A step with inf or nan is still
  // skipped, but the scale never changes.
  bool dynamic = true;
};

// --loss-scale: "auto" (dynamic for fp16, none otherwise) | "dynamic" |
// "none" | a fixed positive number. nullopt: no scaler. Throws tandem::Error
// naming --loss-scale.
std::optional<LossScalerOptions> parse_loss_scale(const std::string& spec, Precision p);

// Dynamic loss scaling agreed across ranks. Per optimiser step:
//   scale(loss).backward();  ...synchronise the gradients...
//   const bool ok = scaler.unscale_and_check(params, comm);  // collective
//   if (ok) optimizer.step();
//   scaler.update(!ok);
// Every rank must reach unscale_and_check at the same step: its one 4-byte
// all-reduce (max of a flag) makes every rank skip when any rank saw inf or
// nan, so the replicas' weights stay identical even when gradients are not
// synchronised exactly alike (a fault, a compressor, local SGD).
class LossScaler {
 public:
  explicit LossScaler(LossScalerOptions o = {});

  at::Tensor scale(const at::Tensor& loss) const { return loss * scale_; }
  double scale_value() const { return scale_; }

  // Collective over `comm` (nullptr: this rank alone). Looks for inf and nan
  // in the gradients of `params` (undefined gradients are skipped), agrees
  // across ranks, and when every rank's are finite divides them by the scale
  // in place and returns true (step). Otherwise returns false and leaves the
  // gradients as they are (the caller skips the step and drops them).
  bool unscale_and_check(const std::vector<at::Tensor>& params, comm::Communicator* comm);
  // After each optimiser step: found_inf halves the scale (dynamic), counts a
  // skipped step and restarts the run of good steps; otherwise the run grows,
  // and at growth_interval the scale is multiplied by growth_factor.
  void update(bool found_inf);

  int64_t skipped_steps() const { return skipped_; }
  int64_t good_steps_in_a_row() const { return good_run_; }
  const LossScalerOptions& options() const { return o_; }

  // The results JSON's "loss_scale", which checkpoints keep with the rest of
  // the results: {scale, skipped_steps, good_run, dynamic, init_scale,
  // growth_interval}. load_state restores the scale and both counters.
  nlohmann::json state() const;
  void load_state(const nlohmann::json& j);

 private:
  LossScalerOptions o_;
  double scale_;
  int64_t skipped_ = 0;
  int64_t good_run_ = 0;
};

}  // namespace tandem::train
