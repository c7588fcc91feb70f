#include "tandem/data/dataset.h"

#include <torch/torch.h>

namespace tandem::data {

Batch Dataset::get_batch(const std::vector<int64_t>& indices, const LoadContext& ctx) const {
  std::vector<at::Tensor> xs;
  xs.reserve(indices.size());
  auto target = torch::empty({int64_t(indices.size())}, torch::kInt64);
  auto* t = target.data_ptr<int64_t>();
  for (size_t i = 0; i < indices.size(); ++i) {
    auto e = get(indices[i], ctx);
    xs.push_back(e.input);
    t[i] = e.target;
  }
  Batch b;
  b.input = xs.empty() ? torch::empty({0}) : torch::stack(xs);
  b.target = target;
  b.indices = indices;
  return b;
}

}  // namespace tandem::data
