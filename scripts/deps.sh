#!/usr/bin/env bash
# Installs the Debian packages tandem needs, if any is missing. Idempotent.
set -euo pipefail
pkgs=(build-essential cmake ccache libtorch-dev libgloo-dev libcli11-dev nlohmann-json3-dev
      libgtest-dev libgmock-dev zlib1g-dev libxxhash-dev libturbojpeg0-dev libpng-dev gnuplot-nox
      dataset-fashion-mnist python3-torch libopenblas0-openmp clang-14 libfuzzer-14-dev
      libcpp-httplib-dev pkg-config)
# libopenblas0-openmp: LibTorch's CPU matrix multiplies (every linear layer) go
# to libblas.so.3, which is Debian's netlib reference BLAS until an optimized
# one is installed; OpenBLAS (the OpenMP build, which follows LibTorch's thread
# count) makes the cnn's step twice as fast. `tandem doctor` reports which one runs.
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "tandem: installing missing Debian packages: ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "tandem: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
