#pragma once
// Checkpoints: atomic, verifiable, written off the training thread.
//
// A checkpoint is a directory `<dir>/ckpt-<step, 10 digits>` holding the files
// of a Snapshot and a manifest.json that lists each file's size and xxh64.
// See Note [Checkpoint atomicity] in src/ckpt/writer.cpp: a checkpoint
// directory appears under its final name only after every file, the manifest
// and the directory itself are on disk (fsync + rename), so a crash or kill at
// any point leaves either the complete checkpoint or none under that name, plus
// at most a `.ckpt-*.tmp*` temporary that the next Writer removes.
//
// Readers do not trust that: verify() checks sizes and checksums, and
// latest_good() falls back to the newest checkpoint that verifies.
//
// Threads: a Writer belongs to one thread (the training thread) and owns one
// writer thread of its own; the free functions are safe from any thread.
// Errors are tandem::Error naming the checkpoint, the file and the fix.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace tandem::ckpt {

// Test-only fault injection, read once per write: "kill-after-files:N" makes
// the writer SIGKILL its own process right after fsyncing the N-th file of a
// checkpoint (before the manifest and the rename), as a crash would.
constexpr const char* kFaultEnv = "TANDEM_CKPT_FAULT";

constexpr const char* kManifestName = "manifest.json";
constexpr const char* kManifestFormat = "tandem-checkpoint";
constexpr int kManifestVersion = 1;

// One file of a checkpoint: its name inside the checkpoint directory (a plain
// name: no '/', no "..", not "manifest.json") and a function producing its
// bytes. The function runs on the writer thread, so serialising cloned tensors
// happens off the training thread; it must not touch state the training thread
// changes meanwhile.
struct FileSpec {
  std::string name;
  std::function<std::string()> bytes;
};

struct Snapshot {
  int64_t step = 0;  // global step count (>= 0); names the directory "ckpt-" + 10-digit zero-padded step
  nlohmann::json meta = nlohmann::json::object();  // free-form, stored in the manifest as "meta"
  std::vector<FileSpec> files;
};

struct WriterOptions {
  // Complete checkpoints kept (>= 1): after each successful write the one just
  // written and the keep-1 newest others (by step) stay, older ones are deleted.
  int keep = 2;
  // One line per event (written with size and seconds, pruned, failed,
  // stale temporary removed). Called from the writer thread; may be empty.
  std::function<void(const std::string&)> log;
};

// Writes snapshots into one checkpoint directory, one at a time, on its own
// thread. One Writer per directory (two processes writing into the same
// directory would remove each other's temporaries).
class Writer {
 public:
  // Creates `dir` (and parents) and removes temporaries (".ckpt-*.tmp*") left
  // there by a killed writer.
  Writer(std::string dir, WriterOptions opts);
  // Waits for the write in flight; never throws. An error nobody collected
  // with flush() goes to the log (stderr when there is no log).
  ~Writer();
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  // Hands the snapshot to the writer thread and returns at once. If a write is
  // still in flight, waits for it first, so at most one snapshot is held. If
  // the previous write failed, throws its error (tandem::Error) instead and
  // does not take `s`; submitting again retries.
  void submit(Snapshot s);
  // Waits until the writer is idle; throws the error of a failed write.
  void flush();
  // Path of the newest checkpoint this Writer wrote, "" if none; the wall
  // time that write took.
  std::string last_written() const;
  double last_write_seconds() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

struct FileEntry {
  std::string name;
  uint64_t bytes = 0;
  uint64_t xxh64 = 0;
};

struct Manifest {
  int version = kManifestVersion;
  int64_t step = 0;
  std::string created;  // ISO 8601 UTC, e.g. "2024-05-01T12:00:00Z"
  nlohmann::json meta = nlohmann::json::object();
  std::vector<FileEntry> files;
};

// Parses manifest.json text. Any malformation (not JSON, wrong format tag,
// unknown version, missing or mistyped field, negative size, bad hex, a file
// name with '/' or "..", duplicate names, nesting deeper than 64) is a
// tandem::Error naming `origin`. Never crashes or hangs on any input.
Manifest parse_manifest(const std::string& text, const std::string& origin);
// The manifest as JSON text: {"format", "version", "step", "created", "meta",
// "files": [{"name", "bytes", "xxh64": 16 lowercase hex digits}]}.
std::string to_manifest_json(const Manifest& m);

// Verifies a checkpoint directory: manifest present and parseable, its step
// that of the directory's name, every listed file present with the listed
// size and xxh64. Throws tandem::Error naming the checkpoint and the file
// ("<dir>: model.pt: checksum mismatch (file damaged)").
Manifest verify(const std::string& checkpoint_dir);

// Checkpoint directories ("ckpt-<digits>") in `dir`, oldest first (by step);
// empty if `dir` does not exist. Listed whether or not they verify.
std::vector<std::string> list_checkpoints(const std::string& dir);

// The newest checkpoint in `dir` that verifies, nullopt when none does. Calls
// warn(message) once for each newer damaged one skipped; the message names it,
// says what is wrong and which earlier checkpoint is used instead.
std::optional<std::string> latest_good(const std::string& dir, const std::function<void(const std::string&)>& warn);

// The bytes of file `name` of a checkpoint (call verify first); tandem::Error
// naming it if it cannot be read.
std::string read_file(const std::string& checkpoint_dir, const std::string& name);

// "ckpt-0000000042" for step 42.
std::string checkpoint_name(int64_t step);

}  // namespace tandem::ckpt
