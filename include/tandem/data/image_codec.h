#pragma once
// JPEG (libturbojpeg) and PNG (libpng) decoding to uint8 [H, W, C] tensors and
// encoding back, for image-folder datasets and the Fashion-MNIST export.
// Format is chosen by the file's magic bytes, not its extension.
// Errors (unreadable, corrupt, truncated, codec not built in) throw tandem::Error
// naming the file and the decoder's message. All functions are thread-safe.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>

namespace tandem::data {

// Whether this build can decode/encode the format (TANDEM_HAVE_TURBOJPEG / _PNG).
bool have_jpeg_codec();
bool have_png_codec();

// True for extensions the image folder accepts: .jpg .jpeg .png (case-insensitive).
bool is_image_file_name(const std::string& path);

// Decode an image file to uint8 [H, W, C]. channels: 0 keeps the file's own
// (1 for greyscale, 3 for colour; alpha is dropped), 1 converts colour to luma
// (ITU-R 601, as PIL's convert("L")), 3 replicates grey into RGB.
at::Tensor decode_image_file(const std::string& path, int channels = 0);
// Same, from bytes in memory; `name` is used in error messages.
at::Tensor decode_image(const uint8_t* data, size_t size, const std::string& name, int channels = 0);

// Encode uint8 [H, W] or [H, W, C] (C = 1 or 3) to bytes / to a file.
// quality: 1..100 (JPEG only).
std::vector<uint8_t> encode_jpeg(const at::Tensor& image, int quality = 95);
std::vector<uint8_t> encode_png(const at::Tensor& image);
void write_jpeg_file(const at::Tensor& image, const std::string& path, int quality = 95);
void write_png_file(const at::Tensor& image, const std::string& path);

}  // namespace tandem::data
