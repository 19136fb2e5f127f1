#!/usr/bin/env bash
# One device call: GPU tests, the roofline, and the latency benchmarks of issues 5 and 6.
# Usage (on the lent GPU machine, repo root): bash scripts/gpu_check.sh [part]
#   part: tests | latency | decode64 | throughput | all (default). Logs and JSON under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/kestrel-gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
part=${1:-all}
k() { echo "+ kestrel $*" >&2; python3 -m kestrel.cli --log-level WARNING "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"

if [[ $part == tests || $part == all ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/quant -m gpu 2>&1 \
    | tee "$OUT/tests.log" | tail -n 5
fi
if [[ $part == latency || $part == all ]]; then
  k bench roofline --json "$OUT/roofline.json" | tee "$OUT/roofline.txt"
  for q in "" "--quantization fp8" "--quantization fp8 --fp8-attention --no-fp8-skip-layers"; do
    tag=$(echo "bf16${q}" | tr -c 'a-z0-9\n' '_' | tr -s _)
    k bench latency --preset llama-3-8b --batch 1 --input 128 --output 256 $q --max-num-seqs 1 \
      --json "$OUT/decode_b1_${tag}.json" | tail -n 22
    k bench latency --preset llama-3-8b --batch 1 --input 4096 --output 1 $q --max-num-seqs 1 \
      --max-num-batched-tokens 4096 --json "$OUT/prefill_4k_${tag}.json" | tail -n 22
  done
fi
if [[ $part == decode64 || $part == all ]]; then
  for ctx in 1024 4096 16384; do
    k bench latency --preset llama-3-8b --batch 64 --input $ctx --output 32 --max-num-seqs 64 \
      --max-num-batched-tokens 16384 --json "$OUT/decode_b64_${ctx}.json" | tail -n 22
  done
fi
if [[ $part == throughput || $part == all ]]; then
  for c in 32 64; do
    k bench throughput --preset llama-3-8b --workload llama3-paper --num-prompts $c \
      --max-num-seqs $c --json "$OUT/tput_llama3paper_${c}.json" | tail -n 18
  done
  k bench throughput --preset llama-3-8b --workload mixed-100-1024 \
    --json "$OUT/tput_mixed.json" | tail -n 18
  k bench throughput --preset llama-3-8b --workload llama3-paper --num-prompts 32 \
    --max-num-seqs 32 --quantization fp8 --json "$OUT/tput_llama3paper_32_fp8.json" | tail -n 18
fi
