#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for building tandem on a machine that has PyTorch
# with CUDA but no Debian packages and no network: Debian's header-only and small
# dependencies unpacked under .gpu/root, Gloo's headers under .gpu/gloo (used only
# when the wheel's LibTorch lacks them), and the Fashion-MNIST IDX files.
# Run here (Debian), then carry .gpu to the GPU machine and run scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/debs .gpu/root .gpu/gloo .gpu/fmnist
(cd .gpu/debs && apt-get download nlohmann-json3-dev libcli11-dev zlib1g-dev libpng-dev libpng16-16 \
  libturbojpeg0-dev libturbojpeg0 libgloo-dev libxxhash-dev libxxhash0)
for f in .gpu/debs/*.deb; do
  case $f in *gloo*) dpkg -x "$f" .gpu/gloo ;; *) dpkg -x "$f" .gpu/root ;; esac
done
# Debian's libz.so points at an exact version; any system's libz.so.1 will do.
ln -sf /lib/x86_64-linux-gnu/libz.so.1 .gpu/root/usr/lib/x86_64-linux-gnu/libz.so
rm -rf .gpu/debs
cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fmnist/
du -sh .gpu
