#!/usr/bin/env bash
# Configures and builds tandem in build/ (Release). Extra args go to `cmake --build`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" "$@"
