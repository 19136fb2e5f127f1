#!/usr/bin/env bash
# Issue 8 in one device call: a Llama-3.1-405B-shaped model (random weights) in FP8 row-wise
# (the Llama 3 recipe) on one 8-GPU host, as TP=8 and as TP=4 x PP=2 with micro-batches, on the
# NVIDIA tables' workloads at maximum throughput and at minimum latency (batch 1), plus
# `kestrel plan`'s prediction for each, so prediction and measurement sit side by side.
#
#   bash scripts/run_405b_x8.sh                       # nvidia-h200-x8, the real run
#   PRESET=llama-3-70b LAYOUTS="2x1 1x2" bash scripts/run_405b_x8.sh   # rehearsal on h200-x2
#
# Output: $OUT/<layout>_<workload>_{tput,lat}.json, $OUT/plan_*.txt, $OUT/run.log.
set -uo pipefail
OUT=${OUT:-/tmp/kestrel-405b}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PRESET=${PRESET:-llama-3.1-405b}
LAYOUTS=${LAYOUTS:-"8x1 4x2"}            # TPxPP
GPU=${GPU:-h200}
STEP_LIMIT=${STEP_LIMIT:-170}            # seconds per benchmark, so one call fits its 10 minutes
# workload: input output prompts-at-max-throughput
WORKLOADS=${WORKLOADS:-"trtllm-2k-128:2048:128:64 trtllm-32k-2k:32768:2048:8 trtllm-120k-2k:120000:2048:2"}
k() { echo "+ kestrel $*" | tee -a "$OUT/run.log" >&2
      timeout "$STEP_LIMIT" python3 -m kestrel.cli --log-level WARNING "$@" 2>&1 | tee -a "$OUT/run.log"; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
ngpu=$(nvidia-smi -L | wc -l)
for layout in $LAYOUTS; do
  tp=${layout%x*}; pp=${layout#*x}
  if (( tp * pp > ngpu )); then echo "skip $layout: needs $((tp * pp)) GPUs, have $ngpu"; continue; fi
  par=(--preset "$PRESET" --quantization fp8 -tp "$tp" -pp "$pp" --max-model-len 131072)
  for w in $WORKLOADS; do
    IFS=: read -r name in outl n <<<"$w"
    k plan --model "$PRESET" --gpus $((tp * pp)) --gpus-per-node "$ngpu" --gpu "$GPU" \
      --workload "$name" --objective throughput > "$OUT/plan_${layout}_${name}.txt"
    k bench throughput "${par[@]}" --workload "$name" --num-prompts "$n" --max-num-seqs "$n" \
      --json "$OUT/${layout}_${name}_tput.json" | tail -n 12
    k bench latency "${par[@]}" --batch 1 --input "$in" --output "$outl" --max-num-seqs 1 \
      --max-num-batched-tokens 8192 --json "$OUT/${layout}_${name}_lat.json" | tail -n 14
  done
done
