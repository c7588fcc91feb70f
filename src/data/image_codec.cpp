#include "tandem/data/image_codec.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>

#include "tandem/config.h"
#include "tandem/util/check.h"

#if TANDEM_HAVE_TURBOJPEG
#include <turbojpeg.h>
#endif
#if TANDEM_HAVE_PNG
#include <png.h>
#endif

namespace tandem::data {
namespace {

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) TANDEM_FAIL("cannot open image file '", path, "': ", std::strerror(errno));
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  TANDEM_CHECK(!in.bad(), "cannot read image file '", path, "'");
  return bytes;
}

void write_file(const std::vector<uint8_t>& bytes, const std::string& path) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) TANDEM_FAIL("cannot write image file '", path, "': ", std::strerror(errno));
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  out.close();
  TANDEM_CHECK(out.good(), "cannot write image file '", path, "' (disk full?)");
}

bool is_jpeg(const uint8_t* d, size_t n) { return n >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF; }
bool is_png(const uint8_t* d, size_t n) {
  static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  return n >= 8 && std::memcmp(d, sig, 8) == 0;
}

// Decoders allocate the whole image before reading a pixel, so a header alone
// (a few bytes) can ask for terabytes. 2^27 pixels (11585 x 11585) is far
// beyond any training image and keeps the largest buffer (16-bit RGB) under
// 1 GB; PIL refuses 178 M pixels by default.
constexpr int64_t kMaxPixels = int64_t(1) << 27;

void check_pixels(int64_t width, int64_t height, const char* format, const std::string& name) {
  TANDEM_CHECK(width * height <= kMaxPixels, "cannot decode ", format, " '", name, "': ", width, "x", height,
               " pixels is more than tandem decodes (", kMaxPixels, " pixels); a corrupt header, or an image "
               "to scale down first");
}

// uint8 [H,W,Cin] -> uint8 [H,W,Cout]; Cin in {1,3}, Cout in {0,1,3} (0: keep).
at::Tensor convert_channels(at::Tensor hwc, int channels) {
  const int64_t c = hwc.size(2);
  if (channels == 0 || channels == c) return hwc;
  if (channels == 3) return hwc.expand({hwc.size(0), hwc.size(1), 3}).contiguous();
  // Luma as PIL's convert("L"): (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.
  auto x = hwc.to(at::kInt);
  auto y = (x.select(2, 0) * 19595 + x.select(2, 1) * 38470 + x.select(2, 2) * 7471 + 0x8000)
               .div(65536, "floor");
  return y.to(at::kByte).unsqueeze(2).contiguous();
}

void check_channels_arg(int channels) {
  TANDEM_CHECK(channels == 0 || channels == 1 || channels == 3,
               "image channels must be 1 or 3 (or 0 to keep the file's), got ", channels);
}

// Validates an image for encoding; returns contiguous uint8 [H,W,C].
at::Tensor encodable(const at::Tensor& image, const char* what) {
  TANDEM_CHECK(image.defined(), what, ": image tensor is undefined");
  TANDEM_CHECK(image.scalar_type() == at::kByte, what, ": image must be uint8, got ", image.scalar_type());
  at::Tensor t = image.dim() == 2 ? image.unsqueeze(2) : image;
  TANDEM_CHECK(t.dim() == 3 && (t.size(2) == 1 || t.size(2) == 3), what,
               ": image must be [H,W] or [H,W,C] with C = 1 or 3, got ", image.sizes());
  TANDEM_CHECK(t.size(0) > 0 && t.size(1) > 0, what, ": image is empty, shape ", image.sizes());
  return t.cpu().contiguous();
}

#if TANDEM_HAVE_TURBOJPEG
struct TjHandle {
  tjhandle h;
  explicit TjHandle(tjhandle handle) : h(handle) {}
  ~TjHandle() {
    if (h) tjDestroy(h);
  }
  TjHandle(const TjHandle&) = delete;
  TjHandle& operator=(const TjHandle&) = delete;
};

std::string tj_message(tjhandle h) {
#ifdef TJFLAG_STOPONWARNING
  return tjGetErrorStr2(h);
#else
  (void)h;
  return tjGetErrorStr();
#endif
}

at::Tensor decode_jpeg(const uint8_t* data, size_t size, const std::string& name, int channels) {
  TjHandle tj(tjInitDecompress());
  TANDEM_CHECK(tj.h, "cannot decode JPEG '", name, "': tjInitDecompress failed: ", tj_message(nullptr));
  int width = 0, height = 0, subsamp = 0, colorspace = 0;
  auto* buf = const_cast<unsigned char*>(data);
  if (tjDecompressHeader3(tj.h, buf, static_cast<unsigned long>(size), &width, &height, &subsamp, &colorspace) != 0)
    TANDEM_FAIL("cannot decode JPEG '", name, "': ", tj_message(tj.h));
  TANDEM_CHECK(width > 0 && height > 0, "cannot decode JPEG '", name, "': bad size ", width, "x", height);
  check_pixels(width, height, "JPEG", name);
  const int native = colorspace == TJCS_GRAY ? 1 : 3;
  const int out_c = channels == 0 ? native : channels;
  auto out = at::empty({height, width, out_c}, at::kByte);
  int flags = TJFLAG_ACCURATEDCT;
#ifdef TJFLAG_STOPONWARNING
  flags |= TJFLAG_STOPONWARNING;  // truncated / corrupt data is an error, not a grey tail
#endif
  if (tjDecompress2(tj.h, buf, static_cast<unsigned long>(size), out.data_ptr<uint8_t>(), width, 0, height,
                    out_c == 1 ? TJPF_GRAY : TJPF_RGB, flags) != 0)
    TANDEM_FAIL("cannot decode JPEG '", name, "': ", tj_message(tj.h));
  return out;
}
#endif

#if TANDEM_HAVE_PNG
// libpng allocates a chunk's declared length before reading its data, so a
// 100-byte file can make it ask for 2 GB. The whole file is in memory: refuse
// a chunk that runs past its end before libpng sees it.
void check_png_chunks(const uint8_t* data, size_t size, const std::string& name) {
  size_t off = 8;  // after the signature
  while (size - off >= 12) {
    const size_t len = (size_t(data[off]) << 24) | (size_t(data[off + 1]) << 16) | (size_t(data[off + 2]) << 8) |
                       size_t(data[off + 3]);
    TANDEM_CHECK(len <= size - off - 12, "cannot decode PNG '", name, "': chunk '",
                 std::string(reinterpret_cast<const char*>(data) + off + 4, 4), "' at byte ", off, " declares ", len,
                 " bytes but only ", size - off - 12, " follow (truncated or corrupt file)");
    if (std::memcmp(data + off + 4, "IEND", 4) == 0) return;
    off += 12 + len;
  }
  // No IEND: libpng reports the truncation.
}

at::Tensor decode_png(const uint8_t* data, size_t size, const std::string& name, int channels) {
  check_png_chunks(data, size, name);
  png_image image;
  std::memset(&image, 0, sizeof(image));
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&image, data, size))
    TANDEM_FAIL("cannot decode PNG '", name, "': ", image.message);
  const bool color = (image.format & PNG_FORMAT_FLAG_COLOR) != 0;
  const bool alpha = (image.format & PNG_FORMAT_FLAG_ALPHA) != 0;
  const bool sixteen = (image.format & PNG_FORMAT_FLAG_LINEAR) != 0 && !alpha;
  const int64_t c = (color ? 3 : 1) + (alpha ? 1 : 0);
  const int64_t h = image.height, w = image.width;
  if (w * h > kMaxPixels) {
    png_image_free(&image);  // releases the decoder before check_pixels throws
    check_pixels(w, h, "PNG", name);
  }
  image.format = (color ? PNG_FORMAT_FLAG_COLOR : 0u) | (alpha ? PNG_FORMAT_FLAG_ALPHA : 0u) |
                 (sixteen ? PNG_FORMAT_FLAG_LINEAR : 0u);
  at::Tensor raw = at::empty({h, w, c}, sixteen ? at::kShort : at::kByte);
  if (!png_image_finish_read(&image, nullptr, raw.data_ptr(), 0, nullptr)) {
    std::string msg = image.message;
    png_image_free(&image);
    TANDEM_FAIL("cannot decode PNG '", name, "': ", msg);
  }
  png_image_free(&image);
  if (sixteen) {  // 16-bit samples -> 8-bit, rounding (values are stored as uint16)
    auto v = raw.to(at::kInt).bitwise_and(0xFFFF);
    raw = ((v * 255 + 32767).div(65535, "floor")).to(at::kByte);
  }
  if (alpha) raw = raw.narrow(2, 0, c - 1).contiguous();  // drop alpha, as PIL convert("RGB"/"L")
  return raw;
}
#endif

}  // namespace

bool have_jpeg_codec() { return TANDEM_HAVE_TURBOJPEG != 0; }
bool have_png_codec() { return TANDEM_HAVE_PNG != 0; }

bool is_image_file_name(const std::string& path) {
  auto dot = path.find_last_of('.');
  auto slash = path.find_last_of('/');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return false;
  std::string ext = path.substr(dot + 1);
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char ch) { return std::tolower(ch); });
  return ext == "jpg" || ext == "jpeg" || ext == "png";
}

at::Tensor decode_image(const uint8_t* data, size_t size, const std::string& name, int channels) {
  check_channels_arg(channels);
  TANDEM_CHECK(size > 0, "cannot decode image '", name, "': file is empty");
  at::Tensor hwc;
  if (is_jpeg(data, size)) {
#if TANDEM_HAVE_TURBOJPEG
    hwc = decode_jpeg(data, size, name, channels);
#else
    TANDEM_FAIL("cannot decode '", name, "': tandem was built without libturbojpeg; install the "
                "libturbojpeg development package and reconfigure");
#endif
  } else if (is_png(data, size)) {
#if TANDEM_HAVE_PNG
    hwc = decode_png(data, size, name, channels);
#else
    TANDEM_FAIL("cannot decode '", name, "': tandem was built without libpng; install the "
                "libpng development package and reconfigure");
#endif
  } else {
    TANDEM_FAIL("cannot decode image '", name, "': not a JPEG or PNG file (unrecognised header)");
  }
  return convert_channels(hwc, channels);
}

at::Tensor decode_image_file(const std::string& path, int channels) {
  check_channels_arg(channels);
  auto bytes = read_file(path);
  return decode_image(bytes.data(), bytes.size(), path, channels);
}

std::vector<uint8_t> encode_jpeg(const at::Tensor& image, int quality) {
  TANDEM_CHECK(quality >= 1 && quality <= 100, "JPEG quality must be in 1..100, got ", quality);
  auto t = encodable(image, "encode JPEG");
#if TANDEM_HAVE_TURBOJPEG
  TjHandle tj(tjInitCompress());
  TANDEM_CHECK(tj.h, "encode JPEG: tjInitCompress failed: ", tj_message(nullptr));
  const int c = static_cast<int>(t.size(2));
  const int subsamp = c == 1 ? TJSAMP_GRAY : (quality >= 90 ? TJSAMP_444 : TJSAMP_420);
  unsigned char* jpeg = nullptr;
  unsigned long jpeg_size = 0;
  int rc = tjCompress2(tj.h, t.data_ptr<uint8_t>(), static_cast<int>(t.size(1)), 0, static_cast<int>(t.size(0)),
                       c == 1 ? TJPF_GRAY : TJPF_RGB, &jpeg, &jpeg_size, subsamp, quality, TJFLAG_ACCURATEDCT);
  if (rc != 0) {
    std::string msg = tj_message(tj.h);
    if (jpeg) tjFree(jpeg);
    TANDEM_FAIL("encode JPEG: ", msg);
  }
  std::vector<uint8_t> out(jpeg, jpeg + jpeg_size);
  tjFree(jpeg);
  return out;
#else
  TANDEM_FAIL("cannot encode JPEG: tandem was built without libturbojpeg; install the libturbojpeg "
              "development package and reconfigure, or export as png");
#endif
}

std::vector<uint8_t> encode_png(const at::Tensor& image) {
  auto t = encodable(image, "encode PNG");
#if TANDEM_HAVE_PNG
  png_image img;
  std::memset(&img, 0, sizeof(img));
  img.version = PNG_IMAGE_VERSION;
  img.width = static_cast<png_uint_32>(t.size(1));
  img.height = static_cast<png_uint_32>(t.size(0));
  img.format = t.size(2) == 3 ? PNG_FORMAT_RGB : PNG_FORMAT_GRAY;
  png_alloc_size_t size = 0;
  if (!png_image_write_to_memory(&img, nullptr, &size, 0, t.data_ptr<uint8_t>(), 0, nullptr))
    TANDEM_FAIL("encode PNG: ", img.message);
  std::vector<uint8_t> out(size);
  if (!png_image_write_to_memory(&img, out.data(), &size, 0, t.data_ptr<uint8_t>(), 0, nullptr))
    TANDEM_FAIL("encode PNG: ", img.message);
  out.resize(size);
  return out;
#else
  TANDEM_FAIL("cannot encode PNG: tandem was built without libpng; install the libpng development "
              "package and reconfigure, or export as jpg");
#endif
}

void write_jpeg_file(const at::Tensor& image, const std::string& path, int quality) {
  write_file(encode_jpeg(image, quality), path);
}

void write_png_file(const at::Tensor& image, const std::string& path) { write_file(encode_png(image), path); }

}  // namespace tandem::data
