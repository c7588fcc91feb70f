#pragma once
// Each `tandem` subcommand lives in its own file and registers itself here.
// cli/ only parses flags and calls the library; the work happens below it.
#include <CLI/CLI.hpp>

#include <string>

namespace tandem::cli {
// Writes `text` and a newline to the file of --json `path`; throws
// tandem::Error naming the flag when it cannot be written (main.cpp).
void write_json_file(const std::string& path, const std::string& text);

void register_train(CLI::App& app);
void register_launch(CLI::App& app);
void register_compare(CLI::App& app);
void register_doctor(CLI::App& app);
void register_data(CLI::App& app);
void register_report(CLI::App& app);
void register_bench(CLI::App& app);
// `tandem bench pp` (bench_pp.cpp).
void register_bench_pp(CLI::App& bench);
// `tandem bench infer` (bench_infer.cpp).
void register_bench_infer(CLI::App& bench);
// `tandem serve` and `tandem bench serve` (builds with cpp-httplib only: TANDEM_HAVE_SERVE).
void register_serve(CLI::App& app);
void register_bench_serve(CLI::App& bench);
}  // namespace tandem::cli
