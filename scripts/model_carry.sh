#!/usr/bin/env bash
# The default model (SmolLM2-135M-Instruct's 98 MB GGUF) for the lent GPU machine, which has no
# internet and takes 64 MiB a call: xz-compressed (90.5 MB) and split in two, plus the `gguf`
# wheel its converter needs (and xgrammar's, for structured outputs), over three carried folders
# that fit beside fa4_carry.sh's: .m1 (the wheels, 4.6 MB) with .fa1, .m2 (the first 36 MB)
# with .fa2, .m3 (the rest) alone. Unpacking puts the
# GGUF where `pull_default_model` looks ($KESTREL_HOME/models): the engine converts it there as
# it would here. All three folders are git-ignored.
#   here:  bash scripts/model_carry.sh pack        (after `kestrel pull`)
#   there: carry [".m1"], then [".m2"], then [".m3"]: bash scripts/model_carry.sh unpack
#          (back to back on one warm machine), then `. scripts/model_carry.sh env`
SITE=/tmp/kmodel/site-packages
if [[ ${1:-} == env ]]; then
  export KESTREL_HOME=/tmp/kmodel/home PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$SITE
  return 0 2>/dev/null || exit 0
fi
set -euo pipefail
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
case ${1:-} in
  pack)
    src=$(python3 -c "from kestrel.loader.pull import default_gguf_path as p; print(p())")
    rm -rf .m1 .m2 .m3; mkdir .m1 .m2 .m3
    python3 -m pip download -q --no-deps "gguf>=0.10" -d .m1
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 -d .m1 xgrammar==0.2.9 \
      apache-tvm-ffi==0.1.15.post2
    xz -6 -T2 -c "$src" > /tmp/model.xz
    dd if=/tmp/model.xz of=.m2/part1 bs=1M iflag=count_bytes count=36000000 status=none
    dd if=/tmp/model.xz of=.m3/part2 bs=1M iflag=skip_bytes skip=36000000 status=none
    rm /tmp/model.xz; du -sh .m1 .m2 .m3 ;;
  unpack)
    mkdir -p /tmp/kmodel/home/models "$SITE"
    for f in .m2/part1 .m3/part2; do [[ -f $f ]] && cp "$f" /tmp/kmodel/; done
    if [[ -d .m1 ]]; then
      python3 -m pip install -q --no-index --no-deps --target "$SITE" .m1/*.whl
    fi
    if [[ -f /tmp/kmodel/part2 ]]; then
      cat /tmp/kmodel/part1 /tmp/kmodel/part2 | xz -d > /tmp/kmodel/home/models/$GGUF
      echo "default model unpacked: $(ls -la /tmp/kmodel/home/models/$GGUF)"
    fi ;;
  *) echo "usage: $0 pack | unpack | env" >&2; exit 2 ;;
esac
