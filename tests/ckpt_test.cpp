// Checkpoints on real files: round trip, pruning, every kind of damage that
// verify() must name, a writer SIGKILLed in the middle of a write (a forked
// process), failed writes, and the manifest parser on malformed input.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <torch/serialize.h>

#include "tandem/ckpt/checkpoint.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace tandem;
using tandem::test::error_of;
using tandem::test::TempDir;

namespace {

std::string pattern(size_t n, char seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(seed + i * 7);
  return s;
}

ckpt::FileSpec bytes_file(const std::string& name, std::string bytes) {
  return {name, [b = std::move(bytes)] { return b; }};
}

// A good checkpoint of `step` with model.pt (1000 bytes) and optim.pt (300 bytes).
std::string write_good(const std::string& dir, int64_t step) {
  ckpt::Writer w(dir, {/*keep=*/100, {}});
  ckpt::Snapshot s;
  s.step = step;
  s.files = {bytes_file("model.pt", pattern(1000, 'a')), bytes_file("optim.pt", pattern(300, 'b'))};
  w.submit(std::move(s));
  w.flush();
  return w.last_written();
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void spit(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

std::vector<std::string> names_in(const std::string& dir) {
  std::vector<std::string> out;
  for (auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

TEST(Checkpoint, RoundTripsFilesAndMeta) {
  TempDir tmp("ckpt");
  c10::Dict<std::string, at::Tensor> weights;
  weights.insert("fc.weight", at::arange(12, at::kFloat).reshape({3, 4}));
  weights.insert("fc.bias", at::full({3}, -1.5));
  auto pickled = torch::pickle_save(c10::IValue(weights));
  std::string model(pickled.begin(), pickled.end());

  std::vector<std::string> log;
  ckpt::Writer w(tmp.str(), {2, [&](const std::string& l) { log.push_back(l); }});
  ckpt::Snapshot s;
  s.step = 5;
  s.meta = {{"epoch", 1}, {"lr", 0.1}, {"method", "ring"}};
  s.files = {bytes_file("model.pt", model), bytes_file("notes.txt", "hello\n")};
  w.submit(std::move(s));
  w.flush();
  const std::string path = tmp.file("ckpt-0000000005");
  EXPECT_EQ(w.last_written(), path);
  EXPECT_GE(w.last_write_seconds(), 0.0);
  ASSERT_EQ(log.size(), 1u);
  EXPECT_NE(log[0].find("wrote " + path + " (2 files"), std::string::npos) << log[0];

  ckpt::Manifest m = ckpt::verify(path);
  EXPECT_EQ(m.step, 5);
  EXPECT_EQ(m.meta, nlohmann::json({{"epoch", 1}, {"lr", 0.1}, {"method", "ring"}}));
  ASSERT_EQ(m.files.size(), 2u);
  EXPECT_EQ(m.files[0].name, "model.pt");
  EXPECT_EQ(m.files[0].bytes, model.size());
  EXPECT_EQ(m.files[1].bytes, 6u);
  EXPECT_EQ(m.files[1].xxh64, 0xe4c191d091bd8853ULL);  // XXH64("hello\n", seed 0)
  EXPECT_EQ(m.created.size(), 20u) << m.created;  // 2024-05-01T12:00:00Z
  EXPECT_EQ(names_in(path), (std::vector<std::string>{"manifest.json", "model.pt", "notes.txt"}));
  const std::string manifest = slurp(path + "/manifest.json");
  EXPECT_NE(manifest.find("\"format\": \"tandem-checkpoint\""), std::string::npos) << manifest;
  EXPECT_NE(manifest.find("\"xxh64\": \"e4c191d091bd8853\""), std::string::npos) << manifest;

  EXPECT_EQ(ckpt::read_file(path, "notes.txt"), "hello\n");
  std::string back = ckpt::read_file(path, "model.pt");
  auto loaded = torch::pickle_load(std::vector<char>(back.begin(), back.end())).toGenericDict();
  ASSERT_EQ(loaded.size(), 2u);
  for (const auto& kv : weights)
    EXPECT_TRUE(torch::equal(loaded.at(kv.key()).toTensor(), kv.value())) << kv.key();
  EXPECT_NE(error_of([&] { ckpt::read_file(path, "absent.pt"); }).find("absent.pt: No such file"), std::string::npos);
}

TEST(Checkpoint, ListsByStepAndPrunesToKeep) {
  TempDir tmp("ckpt");
  EXPECT_TRUE(ckpt::list_checkpoints(tmp.file("nonexistent")).empty());
  std::vector<std::string> log;
  {
    ckpt::Writer w(tmp.str(), {2, [&](const std::string& l) { log.push_back(l); }});
    for (int64_t step : {9, 10, 100}) {
      ckpt::Snapshot s;
      s.step = step;
      s.files = {bytes_file("model.pt", std::to_string(step))};
      w.submit(std::move(s));
    }
  }  // the destructor finishes the last write
  fs::create_directory(tmp.file("ckpt-12x"));
  spit(tmp.file("ckpt-0000000050"), "a file, not a checkpoint");
  EXPECT_EQ(ckpt::list_checkpoints(tmp.str()),
            (std::vector<std::string>{tmp.file("ckpt-0000000010"), tmp.file("ckpt-0000000100")}));
  bool pruned = false;
  for (const auto& l : log) pruned |= l.find("pruned " + tmp.file("ckpt-0000000009")) != std::string::npos;
  EXPECT_TRUE(pruned);

  // The checkpoint just written stays even when newer-numbered ones exist.
  ckpt::Writer w(tmp.str(), {1, {}});
  ckpt::Snapshot s;
  s.step = 40;
  w.submit(std::move(s));
  w.flush();
  EXPECT_EQ(ckpt::list_checkpoints(tmp.str()), std::vector<std::string>{tmp.file("ckpt-0000000040")});
  EXPECT_EQ(ckpt::verify(tmp.file("ckpt-0000000040")).files.size(), 0u);
}

TEST(Checkpoint, RewritingAStepReplacesIt) {
  TempDir tmp("ckpt");
  ckpt::Writer w(tmp.str(), {});
  for (const char* content : {"first", "second"}) {
    ckpt::Snapshot s;
    s.step = 7;
    s.files = {bytes_file("model.pt", content)};
    w.submit(std::move(s));
    w.flush();
  }
  const std::string path = tmp.file("ckpt-0000000007");
  ckpt::verify(path);
  EXPECT_EQ(ckpt::read_file(path, "model.pt"), "second");
  EXPECT_EQ(names_in(tmp.str()), std::vector<std::string>{"ckpt-0000000007"});  // no temporaries left
}

TEST(Checkpoint, VerifyNamesEachKindOfDamage) {
  TempDir tmp("ckpt");
  struct Case {
    const char* what;
    std::function<void(const std::string&)> damage;
    std::string expected;
  };
  std::vector<Case> cases = {
      {"truncated", [](const std::string& p) { fs::resize_file(p + "/model.pt", 500); },
       "model.pt: truncated: 500 bytes, manifest says 1000"},
      {"flipped",
       [](const std::string& p) {
         std::string b = slurp(p + "/model.pt");
         b[123] = static_cast<char>(b[123] ^ 0x10);
         spit(p + "/model.pt", b);
       },
       "model.pt: checksum mismatch (file damaged)"},
      {"deleted", [](const std::string& p) { fs::remove(p + "/optim.pt"); }, "optim.pt: missing"},
      {"manifest not JSON", [](const std::string& p) { spit(p + "/manifest.json", "{\"format\": \"tandem-chec"); },
       "manifest.json: not a valid tandem checkpoint manifest: not JSON"},
      {"manifest missing", [](const std::string& p) { fs::remove(p + "/manifest.json"); }, "manifest.json missing"},
  };
  int64_t step = 1;
  for (const auto& c : cases) {
    std::string path = write_good(tmp.str(), step++);
    ckpt::verify(path);  // good before the damage
    c.damage(path);
    std::string err = error_of([&] { ckpt::verify(path); });
    EXPECT_NE(err.find(c.expected), std::string::npos) << c.what << ": " << err;
    EXPECT_NE(err.find("checkpoint " + path + ": "), std::string::npos) << c.what << ": " << err;
  }
}

TEST(Checkpoint, LatestGoodFallsBackPastDamage) {
  TempDir tmp("ckpt");
  std::vector<std::string> warnings;
  auto warn = [&](const std::string& m) { warnings.push_back(m); };
  EXPECT_FALSE(ckpt::latest_good(tmp.str(), warn).has_value());
  EXPECT_TRUE(warnings.empty());

  std::string good = write_good(tmp.str(), 10);
  std::string bad = write_good(tmp.str(), 20);
  fs::resize_file(bad + "/optim.pt", 299);
  auto chosen = ckpt::latest_good(tmp.str(), warn);
  ASSERT_TRUE(chosen.has_value());
  EXPECT_EQ(*chosen, good);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find(bad), std::string::npos) << warnings[0];
  EXPECT_NE(warnings[0].find("optim.pt: truncated"), std::string::npos) << warnings[0];
  EXPECT_NE(warnings[0].find("using the earlier checkpoint " + good), std::string::npos) << warnings[0];

  warnings.clear();
  fs::remove(good + "/model.pt");
  EXPECT_FALSE(ckpt::latest_good(tmp.str(), warn).has_value());
  EXPECT_EQ(warnings.size(), 2u);
}

// A writer SIGKILLed between its files and its manifest (the test-only fault)
// leaves no checkpoint, only a temporary that the next Writer removes.
TEST(Checkpoint, KilledWriterLeavesPreviousCheckpoint) {
  TempDir tmp("ckpt");
  std::string ten = write_good(tmp.str(), 10);  // its Writer and thread are gone before fork()
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::setenv(ckpt::kFaultEnv, "kill-after-files:1", 1);
    try {
      ckpt::Writer w(tmp.str(), {});
      ckpt::Snapshot s;
      s.step = 20;
      s.files = {bytes_file("model.pt", pattern(1000, 'c')), bytes_file("optim.pt", pattern(300, 'd'))};
      w.submit(std::move(s));
      w.flush();
    } catch (...) {
      ::_exit(3);
    }
    ::_exit(0);  // the fault did not fire
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGKILL);

  EXPECT_FALSE(fs::exists(tmp.file("ckpt-0000000020")));
  std::string stale;
  for (const auto& n : names_in(tmp.str()))
    if (n.rfind(".ckpt-0000000020.tmp-", 0) == 0) stale = tmp.file(n);
  ASSERT_FALSE(stale.empty()) << "the killed writer left no temporary";
  EXPECT_EQ(names_in(stale), std::vector<std::string>{"model.pt"});  // killed before optim.pt and the manifest

  std::vector<std::string> warnings;
  auto chosen = ckpt::latest_good(tmp.str(), [&](const std::string& m) { warnings.push_back(m); });
  ASSERT_TRUE(chosen.has_value());
  EXPECT_EQ(*chosen, ten);
  EXPECT_TRUE(warnings.empty());

  std::vector<std::string> log;
  ckpt::Writer w(tmp.str(), {2, [&](const std::string& l) { log.push_back(l); }});
  EXPECT_FALSE(fs::exists(stale));
  ASSERT_EQ(log.size(), 1u);
  EXPECT_NE(log[0].find("removed stale temporary " + stale), std::string::npos) << log[0];
}

TEST(Checkpoint, FailedWriteIsRethrownOnceAndLeavesNothing) {
  TempDir tmp("ckpt");
  std::vector<std::string> log;
  ckpt::Writer w(tmp.str(), {2, [&](const std::string& l) { log.push_back(l); }});
  ckpt::Snapshot s;
  s.step = 3;
  s.files = {bytes_file("a.pt", "aaa"), {"model.pt", []() -> std::string { throw std::runtime_error("boom"); }}};
  w.submit(std::move(s));
  ckpt::Snapshot next;
  next.step = 4;
  next.files = {bytes_file("a.pt", "aaa")};
  std::string err = error_of([&] { w.submit(next); });  // the failure of step 3 comes back here
  EXPECT_NE(err.find("checkpoint step 3: producing file 'model.pt' failed: boom"), std::string::npos) << err;
  EXPECT_TRUE(names_in(tmp.str()).empty());  // neither ckpt-* nor a temporary
  ASSERT_EQ(log.size(), 1u);
  EXPECT_NE(log[0].find("writing step 3 failed"), std::string::npos) << log[0];
  w.submit(next);  // reported once; this one is written
  w.flush();
  EXPECT_EQ(names_in(tmp.str()), std::vector<std::string>{"ckpt-0000000004"});

  // An I/O error names the path and the reason.
  fs::remove_all(tmp.path());
  w.submit(next);
  err = error_of([&] { w.flush(); });
  EXPECT_NE(err.find("cannot create directory " + tmp.file(".ckpt-0000000004.tmp-")), std::string::npos) << err;
  EXPECT_NE(err.find("No such file or directory"), std::string::npos) << err;
}

TEST(Checkpoint, SubmitChecksTheSnapshotAtOnce) {
  TempDir tmp("ckpt");
  ckpt::Writer w(tmp.str(), {});
  ckpt::Snapshot s;
  s.files = {bytes_file("sub/model.pt", "x")};
  EXPECT_NE(error_of([&] { w.submit(s); }).find("path separator"), std::string::npos);
  s.files = {bytes_file("m.pt", "x"), bytes_file("m.pt", "y")};
  EXPECT_NE(error_of([&] { w.submit(s); }).find("'m.pt' given twice"), std::string::npos);
  s.files = {bytes_file(ckpt::kManifestName, "x")};
  EXPECT_NE(error_of([&] { w.submit(s); }).find("reserved"), std::string::npos);
  s.files = {};
  s.step = -1;
  EXPECT_NE(error_of([&] { w.submit(s); }).find("negative"), std::string::npos);
  EXPECT_NE(error_of([&] { ckpt::Writer(tmp.file("sub"), {0, {}}); }).find("keep at least 1"), std::string::npos);
}

// submit() hands the work over: the FileSpec runs on the writer thread and
// cannot finish before the test releases it, which it does only after submit()
// has returned (a synchronous submit would time out the wait and fail).
TEST(Checkpoint, SubmitReturnsBeforeTheWriteFinishes) {
  TempDir tmp("ckpt");
  ckpt::Writer w(tmp.str(), {});
  std::promise<void> release;
  auto released = release.get_future().share();
  std::atomic<bool> done{false};
  std::thread::id producer;
  ckpt::Snapshot s;
  s.step = 1;
  s.files = {{"model.pt", [&, released] {
                producer = std::this_thread::get_id();
                released.wait_for(std::chrono::seconds(2));
                done = true;
                return std::string("slow");
              }}};
  w.submit(std::move(s));
  bool done_at_return = done.load();
  release.set_value();
  w.flush();
  EXPECT_FALSE(done_at_return);
  EXPECT_TRUE(done.load());
  EXPECT_NE(producer, std::this_thread::get_id());
  EXPECT_EQ(ckpt::read_file(w.last_written(), "model.pt"), "slow");
}

TEST(Manifest, RoundTrips) {
  ckpt::Manifest m;
  m.step = 1234567;
  m.created = "2024-05-01T12:00:00Z";
  m.meta = {{"nested", {{"s", "[[[[ brackets in a string ]]]]"}}}};
  m.files = {{"model.pt", 5678, 0x0123456789abcdefULL}, {"optim.pt", 0, 0}};
  std::string text = ckpt::to_manifest_json(m);
  EXPECT_NE(text.find("\"xxh64\": \"0123456789abcdef\""), std::string::npos) << text;
  ckpt::Manifest back = ckpt::parse_manifest(text, "here");
  EXPECT_EQ(back.step, m.step);
  EXPECT_EQ(back.created, m.created);
  EXPECT_EQ(back.meta, m.meta);
  ASSERT_EQ(back.files.size(), 2u);
  EXPECT_EQ(back.files[0].bytes, 5678u);
  EXPECT_EQ(back.files[0].xxh64, 0x0123456789abcdefULL);
}

TEST(Manifest, RejectsMalformedText) {
  auto doc = [](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json j = {{"format", "tandem-checkpoint"}, {"version", 1}, {"step", 3}, {"created", "t"},
                        {"meta", nlohmann::json::object()},
                        {"files", {{{"name", "model.pt"}, {"bytes", 10}, {"xxh64", "00000000000000ff"}}}}};
    edit(j);
    return j.dump();
  };
  EXPECT_NO_THROW(ckpt::parse_manifest(doc([](nlohmann::json&) {}), "origin-x"));
  std::vector<std::pair<std::string, std::string>> cases = {
      {"", "not JSON"},
      {"nope", "not JSON"},
      {std::string("\0\xff{", 3), "not JSON"},
      {"[]", "top level must be an object"},
      {std::string(100000, '['), "nested deeper than 64"},
      {doc([](auto& j) { j["format"] = "other"; }), "format tag is \"other\""},
      {doc([](auto& j) { j["version"] = 2; }), "version 2"},
      {doc([](auto& j) { j.erase("files"); }), "\"files\" missing"},
      {doc([](auto& j) { j["step"] = "3"; }), "\"step\" must be a non-negative integer, not string"},
      {doc([](auto& j) { j["meta"] = 5; }), "\"meta\" must be an object"},
      {doc([](auto& j) { j["files"][0]["bytes"] = -5; }), "files[0]: \"bytes\" is negative"},
      {doc([](auto& j) { j["files"][0]["bytes"] = 1.5; }), "\"bytes\" must be a non-negative integer"},
      {doc([](auto& j) { j["files"][0]["xxh64"] = "ff"; }), "16 hex digits"},
      {doc([](auto& j) { j["files"][0]["xxh64"] = "zz000000000000ff"; }), "not a hex digit"},
      {doc([](auto& j) { j["files"][0]["name"] = "../etc/passwd"; }), "path separator"},
      {doc([](auto& j) { j["files"][0]["name"] = ".."; }), "is not a file"},
      {doc([](auto& j) { j["files"][0]["name"] = "a..b"; }), "contains \"..\""},
      {doc([](auto& j) { j["files"].push_back(j["files"][0]); }), "'model.pt' listed twice"},
      {doc([](auto& j) { j["files"] = {1}; }), "files[0]: must be an object"},
  };
  for (const auto& [text, expected] : cases) {
    std::string err = error_of([&] { ckpt::parse_manifest(text, "origin-x"); });
    EXPECT_NE(err.find(expected), std::string::npos) << text.substr(0, 80) << " -> " << err;
    EXPECT_EQ(err.rfind("origin-x: ", 0), 0u) << err;
  }
}
