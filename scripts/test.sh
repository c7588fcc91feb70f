#!/usr/bin/env bash
# Builds everything (library, tool, tests, benchmarks) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build.sh
cd build
ctest --output-on-failure --timeout 1200 "$@"
