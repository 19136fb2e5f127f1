#!/usr/bin/env bash
# Issue 7 on two GPUs: NCCL and one-shot all-reduce correctness, TP=2 decode latency vs one
# GPU, PP=2 with micro-batching at high load vs one GPU, llama-3-70b BF16 serving with TP=2, and
# `kestrel plan`'s predictions for the same runs with their error.
#
#   bash scripts/parallel_check.sh [part ...]  # on a 2-GPU machine (nvidia-h200-x2), repo root
#   part: tests | latency | throughput | throughput-high | serve70b | validate | decode16k |
#         all (default: every part but throughput-high and decode16k)
#
# Logs and JSON land in $OUT, packed at the end into one parallel_check_HHMMSS.tgz (PACK=0:
# left loose); validate reads the latency and throughput JSON back, so name it in the same
# invocation as those parts. serve70b needs fastapi and uvicorn, which the device machines
# lack: carry them as wheels (the device tool's README says how; PYTHONPATH is kept; fastapi
# 0.165 also needs opentelemetry-api, without which `kestrel serve` is not registered).
set -uo pipefail
OUT=${OUT:-/tmp/kestrel-parallel}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
parts=" ${*:-all} "
has() { [[ $parts == *" $1 "* || ( $parts == *" all "* && $1 != decode16k
                                   && $1 != throughput-high ) ]]; }
LIMIT=${LIMIT:-280}  # seconds per benchmark command
k() { echo "+ kestrel $*" | tee -a "$OUT/run.log" >&2
      timeout "$LIMIT" python3 -m kestrel.cli --log-level WARNING "$@" 2>&1 | tee -a "$OUT/run.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
case "$(head -2 "$OUT/gpu.txt" | tail -1)" in *H200*) GPU=h200 ;; *) GPU=h100 ;; esac

if has tests; then
  # TP=2 and PP=2 over NCCL give one GPU's tokens and logits (random 4-layer checkpoint).
  # The symmetric-memory one-shot all-reduce equals NCCL's, eager and in a CUDA graph.
  timeout 400 python3 -m pytest -q -p no:cacheprovider tests/parallel/test_tp_pp.py \
    tests/parallel/test_symm_mem.py -m gpu \
    2>&1 | tee "$OUT/tests.log" | tail -n 15
fi
if has latency; then
  k bench roofline --json "$OUT/roofline.json" | tail -n 8
  # llama-3-8b, batch 1: time per output token with TP=2 (NVLink all-reduces) vs one GPU.
  for tp in 1 2; do
    k bench latency --preset llama-3-8b -tp "$tp" --batch 1 --input 128 --output 256 \
      --max-num-seqs 1 --iters 2 --no-roofline --json "$OUT/latency_tp${tp}_pp1.json" \
      | tail -n 14
  done
  # the same TP=2 run with every all-reduce on NCCL: what the one-shot kernel buys
  k bench latency --preset llama-3-8b -tp 2 --batch 1 --input 128 --output 256 \
    --max-num-seqs 1 --iters 2 --no-roofline --disable-custom-all-reduce \
    --json "$OUT/latency_tp2_pp1_nccl.json" | tail -n 14
fi
# Runs a command while nvidia-smi samples every GPU's utilization (share of time a kernel ran,
# start-up included) into $OUT/util_TAG.csv; prints each GPU's mean: do the stages idle?
util() {
  local tag=$1; shift
  nvidia-smi --query-gpu=index,utilization.gpu --format=csv,noheader,nounits -lms 200 \
    >"$OUT/util_$tag.csv" 2>/dev/null &
  local sampler=$!
  "$@"; local rc=$?
  kill $sampler 2>/dev/null; wait $sampler 2>/dev/null
  awk -F', ' '{s[$1] += $2; n[$1]++} END {for (g in s) printf "GPU %s busy %.0f%%  ", g, s[g] / n[g]}
              END {print ""}' "$OUT/util_$tag.csv" | sed "s/^/$tag: /" | tee -a "$OUT/run.log"
  return $rc
}
# llama3-paper (4,096 in / 256 out) with N requests; layouts "TP PP" (default: one GPU, PP=2,
# TP=2); extra arguments go to every run, JSON tagged
layouts_throughput() {
  local n=$1 tag=$2 layouts=${3:-"1 1,1 2,2 1"} tp pp layout
  shift 3 2>/dev/null || shift $#
  IFS=, read -ra layouts <<<"$layouts"
  for layout in "${layouts[@]}"; do
    read -r tp pp <<<"$layout"
    util "throughput${tag}_tp${tp}_pp${pp}" \
      k bench throughput --preset llama-3-8b -tp "$tp" -pp "$pp" --workload llama3-paper \
      --num-prompts "$n" --max-num-seqs "$n" --max-num-batched-tokens 8192 "$@" \
      --json "$OUT/throughput${tag}_tp${tp}_pp${pp}.json" | tail -n 10
  done
}
if has throughput; then
  # PP=2 with two micro-batches in flight vs one GPU (and TP=2 for reference), 64 requests
  layouts_throughput 64 "" "1 1,1 2,2 1"
fi
if has throughput-high; then
  # More requests than one GPU's KV cache holds at once (256 × 4,352 tokens: ~140 GB of BF16
  # KV): each layout runs as many at a time as its memory allows. PP=2 stores half the layers'
  # KV per GPU, so about twice one GPU's concurrent requests; at the same total batch its
  # decode reads the same weight bytes per token as one GPU (see docs/PARALLEL.md).
  layouts_throughput 256 _high "${HIGH_LAYOUTS:-1 1,1 2,2 1}"
  # the same PP=2 run with 2 and 4 micro-batches in flight (the default is 3)
  for m in 2 4; do
    layouts_throughput 256 "_high_mb$m" "1 2" --pipeline-micro-batches $m
  done
fi
if has serve70b; then
  # llama-3-70b in BF16 (140 GB) does not fit one GPU; TP=2 serves it. Health, a completion,
  # then a short serving benchmark, then SIGTERM.
  port=8765
  python3 -m kestrel.cli serve --preset llama-3-70b -tp 2 --max-model-len 4096 --port $port \
    >"$OUT/serve70b.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 $pid 2>/dev/null || break
    sleep 3
  done
  curl -s "http://127.0.0.1:$port/health" | tee "$OUT/serve70b_health.json"; echo
  curl -s "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "llama-3-70b", "prompt": [1, 2, 3, 4], "max_tokens": 16}' \
    | tee "$OUT/serve70b_completion.json"; echo
  k bench serve --base-url "http://127.0.0.1:$port" --vocab-size 128256 --num-prompts 32 \
    --input-len 512 --output-len 128 --request-rate 4 --json "$OUT/serve70b_bench.json" \
    | tail -n 12
  kill -TERM $pid; wait $pid; echo "server exit code $?" | tee -a "$OUT/serve70b.log"
  tail -n 5 "$OUT/serve70b.log"
fi
if has decode16k; then
  # Issue 5's batch-64 decode at 16k context: 134 GB of BF16 KV cache, which needs two H200s.
  k bench latency --preset llama-3.1-8b -tp 2 --batch 64 --input 16384 --output 96 \
    --max-model-len 16480 --max-num-seqs 64 --max-num-batched-tokens 16384 --iters 1 \
    --json "$OUT/decode_b64_16k_tp2.json" | tail -n 16
fi
if has validate; then
  # The roofline model's predictions for the runs above, with the error of each.
  cat >"$OUT/validate.json" <<EOF
{"roofline": "roofline.json", "runs": [
  {"kind": "latency", "file": "latency_tp1_pp1.json", "model": "llama-3-8b", "tp": 1, "pp": 1},
  {"kind": "latency", "file": "latency_tp2_pp1.json", "model": "llama-3-8b", "tp": 2, "pp": 1},
  {"kind": "throughput", "file": "throughput_tp1_pp1.json", "model": "llama-3-8b", "tp": 1,
   "pp": 1, "max_num_seqs": 64, "max_num_batched_tokens": 8192},
  {"kind": "throughput", "file": "throughput_tp1_pp2.json", "model": "llama-3-8b", "tp": 1,
   "pp": 2, "max_num_seqs": 64, "max_num_batched_tokens": 8192},
  {"kind": "throughput", "file": "throughput_tp2_pp1.json", "model": "llama-3-8b", "tp": 2,
   "pp": 1, "max_num_seqs": 64, "max_num_batched_tokens": 8192}]}
EOF
  k plan --gpu "$GPU" --gpus-per-node 2 --validate "$OUT/validate.json" | tee "$OUT/validate.md"
  for n in 16 8; do
    g=$([[ $n == 16 ]] && echo h100 || echo h200)
    k plan --model llama-3.1-405b --gpus $n --gpus-per-node 8 --gpu $g --objective throughput \
      > "$OUT/plan_405b_${n}x${g}.md"
  done
fi
# The device tool returns only a few files from $OUT: pack this call's results into one archive
# (roofline.json stays for the next invocation in the same call). PACK=0 keeps them loose.
if [[ ${PACK:-1} == 1 ]]; then
  ( cd "$OUT" && shopt -s nullglob && f=( *.json *.log *.txt *.md *.png ) && f=( "${f[@]/roofline.json}" ) \
    && [[ ${#f[@]} -gt 0 ]] && tar czf "parallel_check_$(date +%H%M%S).tgz" --remove-files ${f[@]} )
fi
