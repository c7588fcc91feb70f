// The `tandem` command-line tool.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <new>

#include <c10/util/Exception.h>

#include "commands.h"
#include "tandem/comm/communicator.h"
#include "tandem/comm/env.h"
#include "tandem/config.h"
#include "tandem/device/device.h"
#include "tandem/util/check.h"
#include "train_options.h"

void tandem::cli::write_json_file(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  TANDEM_CHECK(f.good(), "--json: cannot write '", path, "'; check that its directory exists and is writable");
  f << text << "\n";
  TANDEM_CHECK(f.good(), "--json: error writing '", path, "'");
}

int main(int argc, char** argv) {
  // Gloo writes to sockets without MSG_NOSIGNAL: a peer that died must surface
  // as a CommError on this rank, not kill it with SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  // Before any tensor exists: freed tensor memory stays in the process
  // instead of being faulted in again every step (see device.h).
  tandem::device::tune_host_allocator();
  CLI::App app{"tandem: data-parallel training on every device it is given (LibTorch, c10d Gloo/NCCL)"};
  app.set_version_flag("--version", std::string("tandem ") + TANDEM_VERSION);
  app.require_subcommand(1);
  tandem::cli::register_train(app);
  tandem::cli::register_launch(app);
  tandem::cli::register_compare(app);
  tandem::cli::register_doctor(app);
  tandem::cli::register_data(app);
  tandem::cli::register_report(app);
  tandem::cli::register_bench(app);
#if TANDEM_HAVE_SERVE
  tandem::cli::register_serve(app);
#endif
  // The rank under tandem launch / torchrun, mpirun or srun, for messages.
  const char* rank = std::getenv(tandem::env::kRank);
  if (!rank) rank = std::getenv(tandem::env::kOmpiRank);
  if (!rank) rank = std::getenv(tandem::env::kSlurmProcId);
  const std::string who = rank ? std::string("tandem (rank ") + rank + ")" : std::string("tandem");
  for (int i = 1; i < argc; ++i) tandem::cli::original_args().push_back(argv[i]);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const tandem::CommError& e) {
    std::cerr << who << ": communication error: " << e.what() << "\n";
    return 3;
  } catch (const tandem::Error& e) {
    std::cerr << who << ": error: " << e.what() << "\n";
    return 2;
  } catch (const c10::OutOfMemoryError& e) {
    std::cerr << who << ": out of device memory: " << e.what_without_backtrace()
              << "\n  fix: a smaller --batch-size, or a smaller --buffer-size when the data device is a GPU\n";
    return 2;
  } catch (const std::bad_alloc&) {
    std::cerr << who << ": out of host memory"
              << "\n  fix: a smaller --batch-size or --buffer-size (the prefetch buffer holds buffer x batch), "
                 "fewer --num-workers, or drop --cache\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << who << ": unexpected error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
