// Precompiled for every fuzz source (TANDEM_FUZZ_PCH): the LibTorch and JSON
// headers that make a plain compile of one parser take a minute.
#pragma once
#include <caffe2/serialize/inline_container.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
