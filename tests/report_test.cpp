// report: results JSON files in, text report and gnuplot charts out.
#include "tandem/report/report.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "tandem/util/check.h"

namespace fs = std::filesystem;
using nlohmann::json;
namespace report = tandem::report;

namespace {

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

// A results document in the trainer's schema. Epoch throughputs straddle the
// summary value; accuracies are fractions; comm times are seconds per step.
json make_run(const std::string& method, int world, double throughput, double epoch_time, double best_acc,
              const json& comm, bool timeline = false) {
  json doc = {{"method", method},
              {"world_size", world},
              {"batch_size", 32},
              {"start_time", "2024-05-01T10:00:00"},
              {"end_time", "2024-05-01T11:00:00"}};
  if (method == "ps") doc["num_workers"] = world - 1;
  json epochs = json::array();
  for (int e = 1; e <= 3; ++e) {
    json ep = {{"epoch", e},
               {"train_loss", 2.0 / e},
               {"train_accuracy", best_acc - 0.1 + 0.03 * e},
               {"train_time", epoch_time},
               {"train_throughput", throughput + (e - 2) * 10},
               {"avg_batch_time", 0.1},
               {"val_loss", 2.1 / e},
               {"val_accuracy", best_acc - 0.06 + 0.02 * e}};
    for (auto& [k, v] : comm.items()) ep[k] = v;
    epochs.push_back(ep);
  }
  doc["epochs"] = epochs;
  json summary = {
      {"avg_train_throughput", throughput}, {"avg_train_time_per_epoch", epoch_time}, {"best_val_accuracy", best_acc}};
  for (auto& [k, v] : comm.items()) summary[k] = v;
  doc["summary"] = summary;
  json losses = json::array();
  for (int s = 0; s < 300; ++s) losses.push_back(2.3 * std::exp(-s / (throughput / 10.0)) + 0.1 * std::sin(s * 0.7));
  doc["all_losses"] = losses;
  if (timeline) {
    json tl = json::array();
    for (int i = 0; i <= 40; ++i)
      tl.push_back({{"t", i * 0.5},
                    {"buffer_fill", 4 + 3 * std::sin(i * 0.3)},
                    {"data_busy", 0.5 + 0.3 * std::cos(i * 0.2)},
                    {"model_busy", 0.9 - 0.1 * std::sin(i * 0.5)}});
    doc["timeline"] = tl;
  }
  return doc;
}

json ddp_run() { return make_run("baseline_ddp", 4, 1000.0, 50.0, 0.80, {{"avg_comm_time", 0.012}}); }
json ring_run() { return make_run("all_reduce", 4, 1500.0, 33.33, 0.81, {{"avg_comm_time", 0.008}}); }
json ps_run(bool timeline = true) {
  return make_run("ps", 5, 800.0, 62.5, 0.79, {{"avg_comm_time_pull", 0.005}, {"avg_comm_time_push", 0.007}}, timeline);
}

// The line of `text` that starts with `prefix`, or "" when none does.
std::string line_starting(const std::string& text, const std::string& prefix, size_t from = 0) {
  for (size_t pos = text.find(prefix, from); pos != std::string::npos; pos = text.find(prefix, pos + 1)) {
    if (pos == 0 || text[pos - 1] == '\n') return text.substr(pos, text.find('\n', pos) - pos);
  }
  return "";
}

std::vector<std::string> words(const std::string& line) {
  std::istringstream in(line);
  std::vector<std::string> w;
  for (std::string s; in >> s;) w.push_back(s);
  return w;
}

class ReportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    static int counter = 0;
    dir_ = fs::temp_directory_path() /
           ("tandem_report_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  void put(const std::string& name, const json& doc) { write(dir_ / name, doc.dump(2)); }
  void put_three() {
    put("results_baseline_ddp.json", ddp_run());
    put("results_all_reduce.json", ring_run());
    put("results_ps.json", ps_run());
  }

  fs::path dir_;
};

const std::vector<std::string> kCharts = {
    "throughput_comparison.png", "training_time_comparison.png", "loss_curves.png",
    "accuracy_curves.png",       "communication_overhead.png",   "utilization_timeline.png"};

// Size in bytes of an empty 1000x600 pngcairo image (no border, tics, key).
uintmax_t blank_png_size(const fs::path& dir) {
  auto gnuplot = report::find_gnuplot();
  if (!gnuplot) return 0;
  const fs::path png = dir / "blank.png";
  const std::string cmd = "'" + gnuplot->string() + "' -e \"set terminal pngcairo size 1000,600; set output '" +
                          png.string() +
                          "'; unset border; unset tics; unset key; set yrange [0:1]; plot -1\" 2>/dev/null";
  if (std::system(cmd.c_str()) != 0) return 0;
  return fs::file_size(png);
}

}  // namespace

TEST_F(ReportTest, TextReportHoldsTheFixtureNumbers) {
  put_three();
  std::ostringstream out, log;
  auto files = report::make_report(dir_, {/*plots=*/false}, out, log);
  EXPECT_EQ(log.str(), "");
  const std::string text = out.str();
  ASSERT_EQ(files.text_report, dir_ / "performance_report.txt");
  EXPECT_EQ(slurp(files.text_report), text);
  EXPECT_EQ(files.inputs.size(), 3u);
  EXPECT_TRUE(files.plots.empty());
  EXPECT_FALSE(fs::exists(dir_ / "plots"));

  EXPECT_NE(text.find("2024-05-01T10:00:00 to 2024-05-01T11:00:00"), std::string::npos) << text;
  // Table 1: method order, world size, training workers, throughput, epoch time, accuracy in %,
  // speedup (PS's 4 workers are compared with DDP's 4 ranks).
  const size_t table2 = text.find("Communication per step (ms)");
  ASSERT_NE(table2, std::string::npos) << text;
  const auto ddp = words(line_starting(text, "DDP (baseline)"));
  const auto ring = words(line_starting(text, "Ring all-reduce"));
  const auto ps = words(line_starting(text, "Parameter server"));
  EXPECT_EQ(ddp, (std::vector<std::string>{"DDP", "(baseline)", "4", "4", "1000.0", "50.00", "80.00", "1.00x"})) << text;
  EXPECT_EQ(ring, (std::vector<std::string>{"Ring", "all-reduce", "4", "4", "1500.0", "33.33", "81.00", "1.50x"})) << text;
  EXPECT_EQ(ps, (std::vector<std::string>{"Parameter", "server", "5", "4", "800.0", "62.50", "79.00", "0.80x"})) << text;
  EXPECT_LT(text.find("DDP (baseline)"), text.find("Ring all-reduce"));
  EXPECT_LT(text.find("Ring all-reduce"), text.find("Parameter server"));
  // Table 2: pull, push, all-reduce, total in ms per step.
  EXPECT_EQ(words(line_starting(text, "DDP (baseline)", table2)),
            (std::vector<std::string>{"DDP", "(baseline)", "-", "-", "12.00", "12.00"}))
      << text;
  EXPECT_EQ(words(line_starting(text, "Ring all-reduce", table2)),
            (std::vector<std::string>{"Ring", "all-reduce", "-", "-", "8.00", "8.00"}))
      << text;
  EXPECT_EQ(words(line_starting(text, "Parameter server", table2)),
            (std::vector<std::string>{"Parameter", "server", "5.00", "7.00", "-", "12.00"}))
      << text;
  // Columns are aligned: every row of table 1 has the same length as its header.
  const std::string header = line_starting(text, "Method");
  EXPECT_EQ(line_starting(text, "DDP (baseline)").size(), header.size());
  EXPECT_EQ(line_starting(text, "Parameter server").size(), header.size());
}

TEST_F(ReportTest, WithoutDdpTheSpeedupIsADash) {
  put("a.json", ring_run());
  put("b.json", ps_run());
  std::ostringstream out, log;
  report::make_report(dir_, {false}, out, log);
  EXPECT_EQ(words(line_starting(out.str(), "Ring all-reduce")).back(), "-") << out.str();
  EXPECT_EQ(words(line_starting(out.str(), "Parameter server")).back(), "-") << out.str();
  EXPECT_NE(out.str().find("no DDP (baseline) results"), std::string::npos);
}

TEST_F(ReportTest, ChartsArePngsWithContent) {
  ASSERT_TRUE(report::find_gnuplot()) << "gnuplot is required: sudo apt-get install gnuplot-nox";
  put_three();
  std::ostringstream out, log;
  auto files = report::make_report(dir_, {true}, out, log);
  EXPECT_FALSE(files.gnuplot_missing);
  ASSERT_EQ(files.plots.size(), kCharts.size()) << log.str();
  const auto scratch = dir_ / "scratch";
  fs::create_directories(scratch);
  const uintmax_t blank = blank_png_size(scratch);
  ASSERT_GT(blank, 0u) << "could not render a blank PNG with gnuplot";
  for (const auto& name : kCharts) {
    const fs::path png = dir_ / "plots" / name;
    EXPECT_NE(std::find(files.plots.begin(), files.plots.end(), png), files.plots.end()) << name;
    ASSERT_TRUE(fs::exists(png)) << name;
    const std::string bytes = slurp(png);
    ASSERT_GE(bytes.size(), 24u) << name;
    EXPECT_EQ(bytes.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8)) << name;
    // IHDR: width and height, big-endian, at bytes 16..23.
    auto be32 = [&](size_t at) {
      return (uint32_t(uint8_t(bytes[at])) << 24) | (uint32_t(uint8_t(bytes[at + 1])) << 16) |
             (uint32_t(uint8_t(bytes[at + 2])) << 8) | uint32_t(uint8_t(bytes[at + 3]));
    };
    EXPECT_EQ(be32(16), 1000u) << name;
    EXPECT_EQ(be32(20), 600u) << name;
    // Titles, axes, bars and curves: several times the bytes of an empty canvas.
    EXPECT_GT(bytes.size(), 4 * blank) << name << ": " << bytes.size() << " bytes, blank " << blank;
    EXPECT_TRUE(fs::exists(dir_ / "plots" / fs::path(name).replace_extension(".gp"))) << name;
  }
  EXPECT_TRUE(fs::exists(dir_ / "plots" / "summary.dat"));
}

TEST_F(ReportTest, OptionalPartsMayBeMissing) {
  ASSERT_TRUE(report::find_gnuplot()) << "gnuplot is required: sudo apt-get install gnuplot-nox";
  json ps = ps_run(/*timeline=*/false);
  ps.erase("all_losses");  // optional too: the loss chart says none was recorded
  put("results_ps.json", ps);
  json other = make_run("local_sgd", 2, 300.0, 10.0, 0.5, json::object());
  put("results_local_sgd.json", other);
  std::ostringstream out, log;
  auto files = report::make_report(dir_, {true}, out, log);
  EXPECT_EQ(words(line_starting(out.str(), "local_sgd")),
            (std::vector<std::string>{"local_sgd", "2", "2", "300.0", "10.00", "50.00", "-"}))
      << out.str();
  EXPECT_EQ(files.plots.size(), kCharts.size() - 1);
  EXPECT_FALSE(fs::exists(dir_ / "plots" / "utilization_timeline.png"));
  EXPECT_TRUE(fs::exists(dir_ / "plots" / "communication_overhead.png"));
}

TEST_F(ReportTest, MalformedFilesAreSkippedNamingFileAndField) {
  put("results_all_reduce.json", ring_run());
  json partial = ddp_run();
  partial["epochs"][1].erase("val_loss");
  put("results_baseline_ddp.json", partial);
  json bad_type = ps_run();
  bad_type["summary"]["avg_train_throughput"] = "fast";
  put("results_ps.json", bad_type);
  write(dir_ / "truncated.json", ddp_run().dump().substr(0, 100));
  write(dir_ / "notes.txt", "not a results file, not even looked at");

  std::ostringstream out, log;
  auto files = report::make_report(dir_, {false}, out, log);
  const std::string msg = log.str();
  EXPECT_NE(msg.find((dir_ / "results_baseline_ddp.json").string() + ": missing field 'epochs[1].val_loss'"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find((dir_ / "results_ps.json").string() + ": field 'summary.avg_train_throughput' is string"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find((dir_ / "truncated.json").string() + ": not valid JSON"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("notes.txt"), std::string::npos) << msg;
  ASSERT_EQ(files.inputs, std::vector<fs::path>{dir_ / "results_all_reduce.json"});
  EXPECT_NE(line_starting(out.str(), "Ring all-reduce"), "");
  EXPECT_EQ(line_starting(out.str(), "DDP (baseline)"), "");
}

TEST_F(ReportTest, EmptyOrMissingDirectoryThrowsNamingIt) {
  std::ostringstream out, log;
  try {
    report::make_report(dir_, {false}, out, log);
    FAIL() << "empty directory accepted";
  } catch (const tandem::Error& e) {
    EXPECT_NE(std::string(e.what()).find(dir_.string()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("no *.json"), std::string::npos) << e.what();
  }
  EXPECT_THROW(report::make_report(dir_ / "missing", {false}, out, log), tandem::Error);
  // Only unusable files left: also an error, after one skip line per file.
  write(dir_ / "x.json", "{}");
  EXPECT_THROW(report::make_report(dir_, {false}, out, log), tandem::Error);
  EXPECT_NE(log.str().find("x.json: missing field 'method'"), std::string::npos) << log.str();
  EXPECT_FALSE(fs::exists(dir_ / "performance_report.txt"));
}

TEST_F(ReportTest, WithoutGnuplotTheTextReportIsStillWritten) {
  put_three();
  const std::string old_path = std::getenv("PATH") ? std::getenv("PATH") : "";
  const fs::path empty_bin = dir_ / "empty_bin";
  fs::create_directories(empty_bin);
  ::setenv("PATH", empty_bin.c_str(), 1);
  std::ostringstream out, log;
  report::ReportFiles files;
  try {
    files = report::make_report(dir_, {true}, out, log);
  } catch (...) {
    ::setenv("PATH", old_path.c_str(), 1);
    throw;
  }
  ::setenv("PATH", old_path.c_str(), 1);
  EXPECT_TRUE(files.gnuplot_missing);
  EXPECT_TRUE(files.plots.empty());
  EXPECT_TRUE(fs::exists(dir_ / "performance_report.txt"));
  EXPECT_NE(log.str().find("gnuplot not found: install it with `sudo apt-get install gnuplot-nox` to get the plots"),
            std::string::npos)
      << log.str();
}

TEST_F(ReportTest, CommandLine) {
  put_three();
  const std::string exe = TANDEM_EXE;
  const fs::path out = dir_ / "cli_out.txt";
  auto run = [&](const std::string& args) {
    const int status = std::system(("'" + exe + "' " + args + " > '" + out.string() + "' 2>&1").c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  ASSERT_EQ(run("report --help"), 0) << slurp(out);
  EXPECT_NE(slurp(out).find("--no-plots"), std::string::npos) << slurp(out);
  ASSERT_EQ(run("report '" + dir_.string() + "' --no-plots"), 0) << slurp(out);
  EXPECT_NE(slurp(out).find("1.50x"), std::string::npos) << slurp(out);
  EXPECT_FALSE(fs::exists(dir_ / "plots"));
  EXPECT_EQ(run("report '" + (dir_ / "missing").string() + "'"), 2) << slurp(out);
  EXPECT_NE(slurp(out).find((dir_ / "missing").string()), std::string::npos) << slurp(out);
  EXPECT_NE(run("report"), 0);  // DIR is required
}
