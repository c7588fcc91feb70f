#!/usr/bin/env bash
# The main job on the built-in default: DDP, ring all-reduce and parameter
# server trained on Fashion-MNIST by local ranks on loopback, then the report.
# Extra arguments go to `tandem compare` (e.g. --nproc 4 --epochs 3).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build.sh --target tandem_cli
./build/tandem compare --nproc 2 --epochs 1 --out results "$@"
