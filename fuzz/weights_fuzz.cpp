// Fuzz target: models::read_weights (tandem/models/weights.h), the PyTorch
// zip archive + pickle reader. Two kinds of input share one corpus:
//
//  - a zip archive (it starts with "PK\3\4"): written to a file as it is, so
//    LibTorch's PyTorchStreamReader and then tandem's unpickler see it;
//  - anything else: taken as the archive's data.pkl. The harness wraps it in
//    a well-formed archive (PyTorchStreamWriter) with storage records
//    data/0 .. data/7 of assorted sizes (see kRecordBytes) and
//    byteorder = "little", so the mutations go to the unpickler, which is
//    tandem's own code, instead of being spent on zip checksums.
#include <caffe2/serialize/inline_container.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "tandem/models/weights.h"

namespace {

tandem::fuzz::MemFile* file = nullptr;

// Record sizes for data/0 .. data/7: multiples of 8 and 4 (any dtype), an
// odd size (only 1-byte dtypes), and an empty record.
constexpr size_t kRecordBytes[8] = {64, 16, 8, 256, 3, 0, 24, 1024};

bool is_zip(const uint8_t* data, size_t size) {
  return size >= 4 && data[0] == 'P' && data[1] == 'K' && data[2] == 3 && data[3] == 4;
}

std::vector<uint8_t> wrap_pickle(const uint8_t* data, size_t size) {
  std::vector<uint8_t> out;
  caffe2::serialize::PyTorchStreamWriter writer([&](const void* buf, size_t n) -> size_t {
    const auto* b = static_cast<const uint8_t*>(buf);
    if (n) out.insert(out.end(), b, b + n);
    return n;
  });
  writer.writeRecord("data.pkl", data, size);
  writer.writeRecord("byteorder", "little", 6);
  std::vector<uint8_t> payload(1024);
  for (size_t k = 0; k < payload.size(); ++k) payload[k] = static_cast<uint8_t>(k * 37 + 11);
  for (size_t k = 0; k < 8; ++k)
    writer.writeRecord("data/" + std::to_string(k), payload.data(), kRecordBytes[k]);
  writer.writeEndOfFile();
  return out;
}

// Whether every element of `t` lies inside its storage's bytes.
bool within_storage(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  __int128 last = t.storage_offset();
  if (last < 0) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.stride(d) < 0) return false;
    last += static_cast<__int128>(t.size(d) - 1) * t.stride(d);
  }
  return (last + 1) * static_cast<__int128>(t.element_size()) <= static_cast<__int128>(t.storage().nbytes());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tandem::fuzz::init_fuzz_process();
  file = new tandem::fuzz::MemFile("tandem-fuzz-weights");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > tandem::fuzz::kMaxInputBytes) return -1;
  if (is_zip(data, size)) {
    file->write(data, size);
  } else {
    std::vector<uint8_t> archive = wrap_pickle(data, size);
    file->write(archive.data(), archive.size());
  }
  tandem::fuzz::run_guarded([&] {
    auto entries = tandem::models::read_weights(file->path());
    // The contract: a non-empty list of named, defined tensors, each one a
    // view inside its storage (the reader checks offset + extent; this checks
    // the reader, without touching the bytes from uninstrumented LibTorch).
    if (entries.empty()) tandem::fuzz::die("read_weights", "returned no tensors without throwing");
    for (auto& [name, t] : entries) {
      if (!t.defined()) tandem::fuzz::die("read_weights", "returned an undefined tensor");
      if (!within_storage(t))
        tandem::fuzz::die("read_weights", ("tensor '" + name + "' reaches past its storage").c_str());
    }
  });
  return 0;
}
