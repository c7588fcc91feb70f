// manifest.json: parsing (strict, safe on any input), writing, and the names
// of checkpoints and their files.
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <limits>
#include <unordered_set>

#include "internal.h"
#include "tandem/ckpt/checkpoint.h"
#include "tandem/util/check.h"

namespace tandem::ckpt {

namespace detail {

std::string bad_file_name(const std::string& name) {
  if (name.empty()) return "empty name";
  if (name.size() > 255) return "name longer than 255 bytes";
  if (name == "." || name == "..") return "name '" + name + "' is not a file";
  if (name.find('/') != std::string::npos || name.find('\\') != std::string::npos)
    return "name '" + name + "' has a path separator; use a plain file name";
  if (name.find("..") != std::string::npos) return "name '" + name + "' contains \"..\"";
  if (name.find('\0') != std::string::npos) return "name contains a NUL byte";
  if (name == kManifestName) return "name 'manifest.json' is reserved for the manifest";
  return "";
}

std::optional<int64_t> step_of_name(const std::string& name) {
  const std::string prefix = "ckpt-";
  if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  int64_t step = 0;
  for (size_t i = prefix.size(); i < name.size(); ++i) {
    char c = name[i];
    if (c < '0' || c > '9') return std::nullopt;
    int d = c - '0';
    if (step > (std::numeric_limits<int64_t>::max() - d) / 10) return std::nullopt;
    step = step * 10 + d;
  }
  return step;
}

std::string to_hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016" PRIx64, v);
  return buf;
}

std::string describe_errno(int err) {
  std::string s = std::strerror(err);
  if (err == ENOSPC || err == EDQUOT) s += " (free space on that disk or write checkpoints elsewhere)";
  if (err == EACCES || err == EPERM || err == EROFS)
    s += " (make the directory writable or write checkpoints elsewhere)";
  return s;
}

}  // namespace detail

std::string checkpoint_name(int64_t step) {
  TANDEM_CHECK(step >= 0, "checkpoint step ", step, " is negative; steps count from 0");
  char buf[32];
  std::snprintf(buf, sizeof buf, "ckpt-%010" PRId64, step);
  return buf;
}

namespace {

using nlohmann::json;

constexpr int kMaxDepth = 64;

[[noreturn]] void malformed(const std::string& origin, const std::string& what) {
  TANDEM_FAIL(origin, ": not a valid tandem checkpoint manifest: ", what, detail::kDamagedHint);
}

// Nesting depth of the JSON text, counted without parsing, so that deeply
// nested input is refused before anything recursive (dump, compare) sees it.
int max_depth(const std::string& text) {
  int depth = 0, max = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max) max = depth;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return max;
}

const json& field(const json& obj, const char* key, const std::string& where, const std::string& origin) {
  auto it = obj.find(key);
  if (it == obj.end()) malformed(origin, where + "field \"" + key + "\" missing");
  return *it;
}

uint64_t unsigned_field(const json& obj, const char* key, const std::string& where, const std::string& origin) {
  const json& v = field(obj, key, where, origin);
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer())
    malformed(origin, where + "\"" + key + "\" is negative: " + std::to_string(v.get<int64_t>()));
  malformed(origin, where + "\"" + key + "\" must be a non-negative integer, not " + v.type_name());
}

std::string string_field(const json& obj, const char* key, const std::string& where, const std::string& origin) {
  const json& v = field(obj, key, where, origin);
  if (!v.is_string()) malformed(origin, where + "\"" + key + "\" must be a string, not " + v.type_name());
  return v.get<std::string>();
}

uint64_t parse_hex64(const std::string& s, const std::string& where, const std::string& origin) {
  if (s.size() != 16)
    malformed(origin, where + "\"xxh64\" must be 16 hex digits, not " + std::to_string(s.size()) + " characters");
  uint64_t v = 0;
  for (char c : s) {
    int d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
    else malformed(origin, where + "\"xxh64\" has a character that is not a hex digit");
    v = (v << 4) | static_cast<uint64_t>(d);
  }
  return v;
}

}  // namespace

Manifest parse_manifest(const std::string& text, const std::string& origin) {
  if (max_depth(text) > kMaxDepth) malformed(origin, "nested deeper than " + std::to_string(kMaxDepth) + " levels");
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::exception& e) {
    malformed(origin, std::string("not JSON: ") + e.what());
  }
  if (!doc.is_object()) malformed(origin, std::string("top level must be an object, not ") + doc.type_name());
  Manifest m;
  std::string format = string_field(doc, "format", "", origin);
  if (format != kManifestFormat)
    malformed(origin, "format tag is \"" + format + "\", expected \"" + kManifestFormat + "\"");
  uint64_t version = unsigned_field(doc, "version", "", origin);
  if (version != kManifestVersion)
    TANDEM_FAIL(origin, ": checkpoint manifest version ", version, ", this tandem reads version ", kManifestVersion,
                " (written by a newer tandem? use that version to read it)");
  m.version = kManifestVersion;
  uint64_t step = unsigned_field(doc, "step", "", origin);
  if (step > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) malformed(origin, "\"step\" out of range");
  m.step = static_cast<int64_t>(step);
  m.created = string_field(doc, "created", "", origin);
  const json& meta = field(doc, "meta", "", origin);
  if (!meta.is_object()) malformed(origin, std::string("\"meta\" must be an object, not ") + meta.type_name());
  m.meta = meta;
  const json& files = field(doc, "files", "", origin);
  if (!files.is_array()) malformed(origin, std::string("\"files\" must be an array, not ") + files.type_name());
  std::unordered_set<std::string> seen;
  for (size_t i = 0; i < files.size(); ++i) {
    const json& f = files[i];
    std::string where = "files[" + std::to_string(i) + "]: ";
    if (!f.is_object()) malformed(origin, where + "must be an object, not " + f.type_name());
    FileEntry e;
    e.name = string_field(f, "name", where, origin);
    std::string bad = detail::bad_file_name(e.name);
    if (!bad.empty()) malformed(origin, where + bad);
    if (!seen.insert(e.name).second) malformed(origin, where + "file '" + e.name + "' listed twice");
    e.bytes = unsigned_field(f, "bytes", where, origin);
    e.xxh64 = parse_hex64(string_field(f, "xxh64", where, origin), where, origin);
    m.files.push_back(std::move(e));
  }
  return m;
}

std::string to_manifest_json(const Manifest& m) {
  json files = json::array();
  for (const auto& f : m.files)
    files.push_back({{"name", f.name}, {"bytes", f.bytes}, {"xxh64", detail::to_hex64(f.xxh64)}});
  json doc{{"format", kManifestFormat}, {"version", m.version}, {"step", m.step}, {"created", m.created},
           {"meta", m.meta}, {"files", std::move(files)}};
  try {
    return doc.dump(2) + "\n";
  } catch (const json::exception& e) {  // e.g. a meta string that is not UTF-8
    TANDEM_FAIL("checkpoint manifest of step ", m.step, ": cannot write it as JSON: ", e.what(),
                " (keep the snapshot's meta to UTF-8 strings)");
  }
}

}  // namespace tandem::ckpt
