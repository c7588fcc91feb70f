// Reading checkpoints: listing, verification against the manifest, fallback to
// the newest good one, and reading a file's bytes.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <utility>

#include <xxhash.h>

#include "internal.h"
#include "tandem/ckpt/checkpoint.h"
#include "tandem/util/check.h"

namespace tandem::ckpt {

namespace fs = std::filesystem;

namespace {

constexpr size_t kChunk = 1 << 20;

using detail::Fd;

// Reads all of `path` into `out`; 0 or the errno of the failure.
int read_all(const std::string& path, std::string& out) {
  Fd f(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (f.fd < 0) return errno;
  struct stat st;
  if (::fstat(f.fd, &st) != 0) return errno;
  if (!S_ISREG(st.st_mode)) return EISDIR;
  out.clear();
  out.reserve(static_cast<size_t>(st.st_size));
  std::string buf(kChunk, '\0');
  for (;;) {
    ssize_t n = ::read(f.fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) return 0;
    out.append(buf.data(), static_cast<size_t>(n));
  }
}

// The directory's own name, ignoring trailing slashes.
std::string base_name(std::string dir) {
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return fs::path(dir).filename().string();
}

std::string damaged(const std::string& dir, const std::string& what) {
  return "checkpoint " + dir + ": " + what + detail::kDamagedHint;
}

// Checks one listed file's size and checksum, streaming it in chunks.
void verify_file(const std::string& dir, const FileEntry& e) {
  std::string path = (fs::path(dir) / e.name).string();
  Fd f(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (f.fd < 0) {
    if (errno == ENOENT) TANDEM_FAIL(damaged(dir, e.name + ": missing"));
    TANDEM_FAIL("checkpoint ", dir, ": ", e.name, ": cannot open: ", detail::describe_errno(errno));
  }
  struct stat st;
  if (::fstat(f.fd, &st) != 0)
    TANDEM_FAIL("checkpoint ", dir, ": ", e.name, ": cannot stat: ", detail::describe_errno(errno));
  if (!S_ISREG(st.st_mode)) TANDEM_FAIL(damaged(dir, e.name + ": not a regular file"));
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < e.bytes)
    TANDEM_FAIL(damaged(dir, e.name + ": truncated: " + std::to_string(size) + " bytes, manifest says " +
                                 std::to_string(e.bytes)));
  if (size > e.bytes)
    TANDEM_FAIL(damaged(dir, e.name + ": " + std::to_string(size) + " bytes, manifest says " +
                                 std::to_string(e.bytes)));
  std::unique_ptr<XXH64_state_t, XXH_errorcode (*)(XXH64_state_t*)> state(XXH64_createState(), XXH64_freeState);
  TANDEM_ASSERT(state != nullptr, "XXH64_createState");
  XXH64_reset(state.get(), 0);
  std::string buf(kChunk, '\0');
  uint64_t total = 0;
  for (;;) {
    ssize_t n = ::read(f.fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) TANDEM_FAIL("checkpoint ", dir, ": ", e.name, ": read failed: ", detail::describe_errno(errno));
    if (n == 0) break;
    XXH64_update(state.get(), buf.data(), static_cast<size_t>(n));
    total += static_cast<uint64_t>(n);
  }
  if (total != e.bytes)  // changed size while we read it
    TANDEM_FAIL(damaged(dir, e.name + ": read " + std::to_string(total) + " bytes, manifest says " +
                                 std::to_string(e.bytes)));
  if (XXH64_digest(state.get()) != e.xxh64) TANDEM_FAIL(damaged(dir, e.name + ": checksum mismatch (file damaged)"));
}

}  // namespace

Manifest verify(const std::string& checkpoint_dir) {
  const std::string& dir = checkpoint_dir;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) TANDEM_FAIL("checkpoint ", dir, ": no such directory");
  std::string text;
  std::string manifest_path = (fs::path(dir) / kManifestName).string();
  if (int err = read_all(manifest_path, text)) {
    if (err == ENOENT) TANDEM_FAIL(damaged(dir, std::string(kManifestName) + " missing (the write did not finish)"));
    TANDEM_FAIL("checkpoint ", dir, ": cannot read ", kManifestName, ": ", detail::describe_errno(err));
  }
  Manifest m = parse_manifest(text, "checkpoint " + dir + ": " + kManifestName);
  if (auto step = detail::step_of_name(base_name(dir)); step && *step != m.step)
    TANDEM_FAIL(damaged(dir, "manifest says step " + std::to_string(m.step) + ", the directory's name step " +
                                 std::to_string(*step)));
  for (const auto& e : m.files) verify_file(dir, e);
  return m;
}

std::vector<std::string> list_checkpoints(const std::string& dir) {
  std::error_code ec;
  fs::directory_iterator it(dir, ec);
  if (ec) {
    if (ec == std::errc::no_such_file_or_directory) return {};
    TANDEM_FAIL("cannot list checkpoint directory ", dir, ": ", ec.message());
  }
  std::vector<std::pair<int64_t, std::string>> found;
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    std::string name = it->path().filename().string();
    auto step = detail::step_of_name(name);
    std::error_code ec2;
    if (step && it->is_directory(ec2)) found.emplace_back(*step, it->path().string());
  }
  if (ec) TANDEM_FAIL("cannot list checkpoint directory ", dir, ": ", ec.message());
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(std::move(f.second));
  return out;
}

std::optional<std::string> latest_good(const std::string& dir, const std::function<void(const std::string&)>& warn) {
  auto all = list_checkpoints(dir);
  std::vector<std::string> skipped;
  std::optional<std::string> good;
  for (auto it = all.rbegin(); it != all.rend() && !good; ++it) {
    try {
      verify(*it);
      good = *it;
    } catch (const Error& e) {
      skipped.push_back(e.what());
    }
  }
  if (warn) {
    std::string instead = good ? "; using the earlier checkpoint " + *good + " instead"
                               : "; no earlier checkpoint verifies, starting without one";
    const std::string hint = detail::kDamagedHint;
    for (auto s : skipped) {
      if (s.size() >= hint.size() && s.compare(s.size() - hint.size(), hint.size(), hint) == 0)
        s.resize(s.size() - hint.size());
      warn("skipping damaged " + s + instead);
    }
  }
  return good;
}

std::string read_file(const std::string& checkpoint_dir, const std::string& name) {
  std::string bad = detail::bad_file_name(name);
  TANDEM_CHECK(bad.empty(), "checkpoint ", checkpoint_dir, ": cannot read file: ", bad);
  std::string out;
  if (int err = read_all((fs::path(checkpoint_dir) / name).string(), out))
    TANDEM_FAIL("checkpoint ", checkpoint_dir, ": cannot read ", name, ": ", detail::describe_errno(err));
  return out;
}

}  // namespace tandem::ckpt
