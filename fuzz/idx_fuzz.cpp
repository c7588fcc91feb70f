// Fuzz target: the IDX reader (tandem/data/idx.h), raw and gzip-compressed.
// Each input is one file. A raw file whose magic names one reader goes to
// that reader only; any other file (gzip, or an unknown magic) goes to both,
// so one corpus covers read_idx_images (0x803) and read_idx_labels (0x801)
// without paying twice for inputs that one of them rejects at byte 0.
#include <cstddef>
#include <cstdint>

#include "fuzz_util.h"
#include "tandem/data/idx.h"

namespace {

tandem::fuzz::MemFile* file = nullptr;

uint32_t magic(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  return uint32_t(data[0]) << 24 | uint32_t(data[1]) << 16 | uint32_t(data[2]) << 8 | data[3];
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tandem::fuzz::init_fuzz_process();
  file = new tandem::fuzz::MemFile("tandem-fuzz-idx");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > tandem::fuzz::kMaxInputBytes) return -1;  // -1: never added to the corpus
  file->write(data, size);
  const uint32_t m = magic(data, size);
  if (m != 0x801) {
    tandem::fuzz::run_guarded([&] {
      at::Tensor images = tandem::data::read_idx_images(file->path());
      // The contract: uint8 [N, rows, cols].
      if (images.dim() != 3 || images.scalar_type() != at::kByte)
        tandem::fuzz::die("read_idx_images", "result is not uint8 [N, rows, cols]");
    });
  }
  if (m != 0x803) {
    tandem::fuzz::run_guarded([&] {
      at::Tensor labels = tandem::data::read_idx_labels(file->path());
      if (labels.dim() != 1 || labels.scalar_type() != at::kLong)
        tandem::fuzz::die("read_idx_labels", "result is not int64 [N]");
    });
  }
  return 0;
}
