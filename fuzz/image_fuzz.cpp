// Fuzz target: decode_image (tandem/data/image_codec.h), JPEG through
// libturbojpeg and PNG through libpng, chosen by the magic bytes.
// The channels argument (0 keep, 1 grey, 3 RGB) is taken from the input's
// size, so every file in the corpus stays a plain image file and a mutation
// that only changes the length still reaches all three conversions.
#include <cstddef>
#include <cstdint>

#include "fuzz_util.h"
#include "tandem/data/image_codec.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tandem::fuzz::init_fuzz_process();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > tandem::fuzz::kMaxInputBytes) return -1;
  static const int kChannels[3] = {0, 1, 3};
  const int channels = kChannels[size % 3];
  tandem::fuzz::run_guarded([&] {
    at::Tensor hwc = tandem::data::decode_image(data, size, "fuzz-input", channels);
    // The contract: uint8 [H, W, C], C = the requested channels, else 1 or 3.
    const bool ok = hwc.dim() == 3 && hwc.scalar_type() == at::kByte && hwc.size(0) > 0 && hwc.size(1) > 0 &&
                    (channels != 0 ? hwc.size(2) == channels : (hwc.size(2) == 1 || hwc.size(2) == 3));
    if (!ok) tandem::fuzz::die("decode_image", "result is not uint8 [H, W, C] with the requested channels");
  });
  return 0;
}
