#pragma once
// The models' linear layers go through linear() so that an inference policy
// can run them another way (device/policy.h: int8 dynamic quantisation)
// without rebuilding the model: while a LinearOverride is installed on the
// calling thread, each layer it knows is handed to it instead of its own
// forward. Without one, linear() is layer->forward(x) behind one
// thread-local load.
#include <torch/nn/modules/linear.h>

namespace tandem::models {

class LinearOverride {
 public:
  virtual ~LinearOverride() = default;
  // Fills `out` and returns true for a layer it replaces; false: run the layer.
  virtual bool forward(const torch::nn::LinearImpl& layer, const at::Tensor& x, at::Tensor& out) const = 0;
};

// Installs `o` on this thread for the scope's lifetime (nesting restores the outer one).
class LinearOverrideScope {
 public:
  explicit LinearOverrideScope(const LinearOverride* o);
  ~LinearOverrideScope();
  LinearOverrideScope(const LinearOverrideScope&) = delete;
  LinearOverrideScope& operator=(const LinearOverrideScope&) = delete;

 private:
  const LinearOverride* previous_;
};

at::Tensor linear(torch::nn::LinearImpl& layer, const at::Tensor& x);

}  // namespace tandem::models
