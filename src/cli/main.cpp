// The `tandem` command-line tool.
#include <cstdio>
#include <iostream>

#include "commands.h"
#include "tandem/comm/communicator.h"
#include "tandem/config.h"
#include "tandem/util/check.h"

int main(int argc, char** argv) {
  CLI::App app{"tandem: data-parallel training on every device it is given (LibTorch, c10d Gloo/NCCL)"};
  app.set_version_flag("--version", std::string("tandem ") + TANDEM_VERSION);
  app.require_subcommand(1);
  tandem::cli::register_train(app);
  tandem::cli::register_launch(app);
  tandem::cli::register_report(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const tandem::CommError& e) {
    std::cerr << "tandem: communication error: " << e.what() << "\n";
    return 3;
  } catch (const tandem::Error& e) {
    std::cerr << "tandem: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "tandem: unexpected error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
