#!/usr/bin/env bash
# FlashAttention 4 (flash-attn-4, CuTe DSL kernels) for the lent GPU machine, which has no
# internet and takes 64 MiB a call: its wheels for CPython 3.12 / CUDA 13 in two carried
# folders, .fa1 and .fa2 (the 193 MB MLIR library alone is ~50 MB xz-compressed, so it is
# split between them). Both folders are git-ignored, so they travel only when carried.
#   here:  bash scripts/fa4_carry.sh pack                  (~4 min: pip download, xz -9e)
#   there, two calls back to back on one warm machine (it goes back after 30 s idle):
#          carry [".fa1"]: bash scripts/fa4_carry.sh unpack
#          carry [".fa2"]: bash scripts/fa4_carry.sh unpack && . scripts/fa4_carry.sh env && ...
# `env` puts $SITE on PYTHONPATH (pip --target skips the .pth that adds CuTe DSL's
# packages) and keeps FA4's compiled kernels on disk between processes. The folder's name
# must be site-packages: quack fingerprints its epilogue functions for its compile cache and
# treats only code under site-packages as installed (it refuses to fingerprint the rest).
SITE=/tmp/fa4/site-packages
if [[ ${1:-} == env ]]; then
  export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages:$PWD \
    FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
  return 0 2>/dev/null || exit 0
fi
set -euo pipefail
IR=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
case ${1:-} in
  pack)
    tmp=$(mktemp -d); rm -rf .fa1 .fa2; mkdir .fa1 .fa2
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 -d "$tmp" flash-attn-4==4.0.0b36 \
      nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
      nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
      quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
    mv "$tmp"/*libs_cu13*.whl "$tmp/cu13.zip"; mv "$tmp"/*.whl .fa1/
    (cd "$tmp" && unzip -q cu13.zip && xz -9e -T2 -c "$IR" > ir.xz && rm "$IR" \
      && tar -cJf rest.tar.xz nvidia_cutlass_dsl nvidia_cutlass_dsl_libs_cu13-*.dist-info)
    mv "$tmp/rest.tar.xz" .fa1/
    head -c 31000000 "$tmp/ir.xz" > .fa1/ir.xz.1; tail -c +31000001 "$tmp/ir.xz" > .fa2/ir.xz.2
    rm -rf "$tmp"; du -sh .fa1 .fa2 ;;
  unpack)
    mkdir -p $SITE
    if [[ -d .fa1 && ! -f $SITE/ir.xz.1 ]]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target $SITE .fa1/*.whl
      tar -xJf .fa1/rest.tar.xz -C $SITE; cp .fa1/ir.xz.1 $SITE/
    fi
    if [[ -d .fa2 ]]; then
      cat $SITE/ir.xz.1 .fa2/ir.xz.2 | xz -d > "$SITE/$IR"
      echo "flash-attn-4 unpacked in $SITE"
    fi ;;
  *) echo "usage: $0 pack | unpack | env" >&2; exit 2 ;;
esac
