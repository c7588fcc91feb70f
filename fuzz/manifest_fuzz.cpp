// Fuzz target: ckpt::parse_manifest (tandem/ckpt/checkpoint.h), the parser of
// a checkpoint's manifest.json. Its header promises a tandem::Error for any
// malformation and never a crash or hang on any input.
//
// A manifest that parses is also written back with to_manifest_json and parsed
// again: the second parse must succeed and give the same manifest, or resuming
// from a checkpoint this tandem wrote could fail.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "tandem/ckpt/checkpoint.h"

namespace {

bool same(const tandem::ckpt::Manifest& a, const tandem::ckpt::Manifest& b) {
  if (a.version != b.version || a.step != b.step || a.created != b.created || a.meta != b.meta ||
      a.files.size() != b.files.size())
    return false;
  for (size_t k = 0; k < a.files.size(); ++k) {
    const auto &x = a.files[k], &y = b.files[k];
    if (x.name != y.name || x.bytes != y.bytes || x.xxh64 != y.xxh64) return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tandem::fuzz::init_fuzz_process();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > tandem::fuzz::kMaxInputBytes) return -1;
  const std::string text(reinterpret_cast<const char*>(data), size);
  tandem::fuzz::run_guarded([&] {
    tandem::ckpt::Manifest m = tandem::ckpt::parse_manifest(text, "fuzz/manifest.json");
    std::string written;
    try {
      written = tandem::ckpt::to_manifest_json(m);
    } catch (const tandem::Error& e) {
      tandem::fuzz::die("to_manifest_json cannot write a manifest that parse_manifest accepted", e.what());
    }
    tandem::ckpt::Manifest again;
    try {
      again = tandem::ckpt::parse_manifest(written, "fuzz/rewritten-manifest.json");
    } catch (const tandem::Error& e) {
      tandem::fuzz::die("parse_manifest rejects what to_manifest_json wrote", e.what());
    }
    if (!same(m, again)) tandem::fuzz::die("manifest round trip", "parse(write(m)) differs from m");
  });
  return 0;
}
