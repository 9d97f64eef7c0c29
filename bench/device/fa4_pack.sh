#!/bin/bash
# Here (with pip and the internet's package index): FlashAttention-4 for the GPU machine, split
# to fit the device tool's 64 MiB-per-call working tree (../.library/device/README.md).
#
#   bash bench/device/fa4_pack.sh            # writes .fa4a/ (~32 MB) and .fa4b/ (~42 MB)
#
# flash-attn-4 is pure Python over NVIDIA's CuTe DSL, whose compiler library
# (nvidia-cutlass-dsl-libs-cu13: 227 MB unpacked, 92 MB as a wheel, 64 MB as tar.xz) alone is
# about the limit. So it travels unpacked and xz-compressed in two halves: .fa4a in a first call,
# which stashes it on the machine, .fa4b in the next call on the same (still warm) machine, which
# joins and installs everything (bench/device/fa4_install.sh). Both folders are git-ignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
FA4_VERSION=${FA4_VERSION:-4.0.0b36}
DSL_VERSION=${DSL_VERSION:-4.8.1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
         --platform manylinux2014_x86_64 -d "$1" "${@:2}"; }
# The GPU image already has torch, einops, cuda-bindings, protobuf, typing-extensions (KINDS.md).
dl "$work/wheels" "flash-attn-4==$FA4_VERSION" "nvidia-cutlass-dsl==$DSL_VERSION" \
   "nvidia-cutlass-dsl-libs-base==$DSL_VERSION" "nvidia-cutlass-dsl-libs-core==$DSL_VERSION" \
   "apache-tvm-ffi<0.2,>=0.1.11" torch-c-dlpack-ext "quack-kernels>=0.5.3"
dl "$work/big" "nvidia-cutlass-dsl-libs-cu13==$DSL_VERSION"
mkdir "$work/unpacked"
(cd "$work/unpacked" && python3 -m zipfile -e "$work"/big/*.whl .)
tar -C "$work/unpacked" -cf - . | xz -9e -T0 > "$work/cu13libs.tar.xz"
split -n 2 -d "$work/cu13libs.tar.xz" "$work/cu13libs.tar.xz.part"
rm -rf .fa4a .fa4b
mkdir -p .fa4a .fa4b/wheels
mv "$work/cu13libs.tar.xz.part00" .fa4a/
mv "$work/cu13libs.tar.xz.part01" .fa4b/
mv "$work"/wheels/*.whl .fa4b/wheels/
(cd .fa4a && sha256sum cu13libs.tar.xz.part00 > SHA256SUMS)
(cd .fa4b && sha256sum cu13libs.tar.xz.part01 > SHA256SUMS)
grep -qx '/.fa4a/' .git/info/exclude || printf '/.fa4a/\n/.fa4b/\n' >> .git/info/exclude
du -sh .fa4a .fa4b
