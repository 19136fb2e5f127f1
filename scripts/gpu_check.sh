#!/usr/bin/env bash
# GPU tests, the roofline, and the benchmarks of issues 4, 5 and 6; each part fits one device
# call (10 minutes). Usage (on the lent GPU machine, repo root): bash scripts/gpu_check.sh PART...
#   PART: tests | roofline | profile | profile-prefill | kernels | splits | latency | fp8gemm |
#         sweep | sweep-tp2 | hf | decode64 | decode16k | throughput | throughput-fp8 |
#         throughput-kvfp8 | budget | long | fig27 | fp8-70b | serve | pdl | ab | fa4 | quack |
#         realmodel | startup-read | spec | w8a8
# Parts after `roofline` reuse $OUT/roofline.json (measured first if missing). 4k prefills
# (latency, AB_SHAPE=prefill) rest the GPU ${REST:-2} s before each timed run: a GPU at its
# power limit runs a ~95 ms prefill slower right after another (PERFORMANCE.md, "Power").
# Logs and JSON land under $OUT, packed at the end into one gpu_check_HHMMSS.tgz (PACK=0: left
# loose); a summary table is printed last.
set -uo pipefail
OUT=${OUT:-/tmp/kestrel-gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
parts=${*:-tests roofline latency}
has() { [[ " $parts " == *" $1 "* ]]; }
k() { echo "+ kestrel $*" >&2; python3 -m kestrel.cli --log-level WARNING "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
ceil() { [[ -f $OUT/roofline.json ]] || k bench roofline --json "$OUT/roofline.json" >/dev/null
         echo --ceilings "$OUT/roofline.json"; }
L8="k bench latency --preset llama-3-8b"

if has tests; then
  python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/quant tests/kernels \
    tests/spec -m gpu \
    2>&1 | tee "$OUT/tests.log" | tail -n 5
fi
if has realmodel; then  # the real default model, carried by scripts/model_carry.sh (source its
  # `env` first): its GPU tests (greedy = CPU; the FP8 recipe's quality bound; structured
  # outputs, with the xgrammar wheel model_carry.sh carries), then Figure 26's
  # analogue on the GPU (BF16 vs the recipe, per-sequence log-likelihood differences, 512 windows)
  python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py -k default_model 2>&1 \
    | tee "$OUT/realmodel_tests.log" | tail -n 3
  k eval compare --device cuda --dtype bfloat16 --quantization fp8 --window 128 \
    --max-windows 512 --batch-windows 64 --no-progress --plot "$OUT/fig26_gpu.png" \
    --json "$OUT/eval_fp8_gpu.json" | tail -n 14
fi
if has spec; then  # speculative decoding with prompt lookup on the real default model (carried
  # by scripts/model_carry.sh): pydoc continuations, 1, 8 and 64 requests, plain then ngram
  # (K = 4), after one discarded run (a fresh process's first prefill compiles kernels); then
  # where a step's time goes (random 135M, repeated prompts: scripts/profile_spec.py)
  k bench throughput --prompt-source text --input-len 512 --output-len 8 --num-prompts 1 \
    > /dev/null 2>&1
  for n in 1 8 64; do
    for s in "" "--speculative-method ngram --num-speculative-tokens 4"; do
      tag=$(echo "n${n}${s:+_ngram}" | tr -c 'a-z0-9\n' '_')
      k bench throughput --prompt-source text --input-len 512 --output-len 128 --num-prompts $n \
        --max-num-seqs $n $s --json "$OUT/spec_${tag}.json" 2>&1 | tee "$OUT/spec_${tag}.log" \
        | grep -E "output tokens/s|TPOT|guesses" | head -n 4
    done
  done
  for n in 1 64; do
    for s in "" --ngram; do
      python3 scripts/profile_spec.py --requests $n $s 2>&1 | tee -a "$OUT/profile_spec.log" \
        | tail -n 5
    done
  done
fi
if has w8a8; then  # W8A8 (kernels/int8_w8a8.py) against BF16 and the FP8 recipe's every-layer
  # form: batch-1 decode and the 4k prefill, llama-3-8b preset
  c=$(ceil)
  for q in "" "--quantization w8a8" "--quantization fp8 --fp8-attention --no-fp8-skip-layers"; do
    tag=$(echo "bf16${q}" | tr -c 'a-z0-9\n' '_' | tr -s _)
    $L8 --batch 1 --input 128 --output 128 $q --max-num-seqs 1 $c \
      --json "$OUT/w8a8_decode_b1_${tag}.json" | grep -E "time per output|bandwidth /"
    $L8 --batch 1 --input 4096 --output 1 $q --max-num-seqs 1 --max-num-batched-tokens 4096 \
      --rest "${REST:-2}" $c --json "$OUT/w8a8_prefill_4k_${tag}.json" \
      | grep -E "prefill time|prefill FLOP/s /"
  done
fi
if has startup-read; then  # start-up with an 8B checkpoint's read (the presets read nothing):
  # random weights written once as bf16 safetensors, then the 4k prefill from that folder, with
  # FA4 / quack as installed and without; the `model` phase of start-up is the read
  ckpt=${CKPT:-/tmp/ckpt-8b}
  [[ -f $ckpt/config.json ]] || python3 scripts/save_random_checkpoint.py llama-3-8b "$ckpt"
  for off in 0 1; do
    env $( ((off)) && echo KESTREL_FA4=0 KESTREL_QUACK=0) python3 -m kestrel.cli \
      --log-level WARNING bench latency --model "$ckpt" --batch 1 --input 4096 --output 1 \
      --max-num-seqs 1 --max-num-batched-tokens 4096 --json "$OUT/startup_read_off$off.json" \
      | grep -E "prefill time|start-up|KV sizing"
  done
fi
if has roofline; then
  k bench roofline --json "$OUT/roofline.json" | tee "$OUT/roofline.txt"
fi
if has profile; then  # GPU kernel time vs wall time of batch-1 decode, BF16 and the FP8 recipe;
  # each step's kernels in launch order (duration, idle time before) in $OUT/sequence_*.txt
  for q in "" "--quantization fp8"; do
    tag=$(echo "bf16${q}" | tr -c 'a-z0-9\n' '_' | tr -s _)
    python3 scripts/profile_decode.py --max-num-seqs 1 $q --sequence "$OUT/sequence_$tag.txt" \
      2>&1 | tee -a "$OUT/profile.log" | grep -v "^\s*$" | head -n 14
  done
fi
if has profile-prefill; then  # where a 4,096-token prefill's time goes, BF16, the FP8 recipe
  # and FP8 everywhere (the BF16 step's chrome trace lands in $OUT/prefill_trace.json: the
  # host's launch gaps; each step's kernels in launch order in $OUT/prefill_sequence_*.txt)
  for q in "" "--quantization fp8" "--quantization fp8 --fp8-attention --no-fp8-skip-layers"; do
    tag=$(echo "bf16${q}" | tr -c 'a-z0-9\n' '_' | tr -s _)
    python3 scripts/profile_decode.py --prefill --input 4096 --max-num-seqs 1 \
      --max-num-batched-tokens 4096 --no-async-scheduling --cprofile $q \
      --sequence "$OUT/prefill_sequence_$tag.txt" $([[ -z $q ]] && echo --trace "$OUT") 2>&1 \
      | tee -a "$OUT/profile_prefill.log" | grep -E -A7 "^batch|GPU waits"
  done
fi
if has kernels; then  # attention kernels vs torch SDPA (picks the SDPA crossover); decode
  # attention with a BF16 and an FP8 cache
  python3 tests/kernels/bench_kernels.py --only prefill 2>&1 | tee "$OUT/kernels.log" | tail -n 9
  python3 tests/kernels/bench_kernels.py --only decode 2>&1 | tee -a "$OUT/kernels.log" \
    | tail -n 8
fi
if has splits; then  # decode split-K crossover: sets paged_attention.NO_SPLIT_MAX_LEN
  python3 tests/kernels/bench_kernels.py --only splits 2>&1 | tee "$OUT/splits.log" | tail -n 12
fi
if has latency; then
  c=$(ceil)
  for q in "" "--quantization fp8" "--quantization fp8 --fp8-attention --no-fp8-skip-layers"; do
    tag=$(echo "bf16${q}" | tr -c 'a-z0-9\n' '_' | tr -s _)
    $L8 --batch 1 --input 128 --output 256 $q --max-num-seqs 1 $c \
      --json "$OUT/decode_b1_${tag}.json" | tail -n 16
    $L8 --batch 1 --input 4096 --output 1 $q --max-num-seqs 1 --max-num-batched-tokens 4096 \
      --rest "${REST:-2}" \
      $c --json "$OUT/prefill_4k_${tag}.json" | tail -n 16
  done
fi
if has pdl; then  # programmatic dependent launch (kernels/pdl.py): its test, then batch-1
  # decode with it off and on, BF16 and the FP8 recipe, and the kernel sequence with it on
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -m gpu -k "dependent" 2>&1 \
    | tee "$OUT/pdl_tests.log" | tail -n 3
  c=$(ceil)
  for q in "" "--quantization fp8"; do
    for p in 0 1; do
      tag=$(echo "bf16${q}_pdl${p}" | tr -c 'a-z0-9\n' '_' | tr -s _)
      KESTREL_PDL=$p $L8 --batch 1 --input 128 --output 256 $q --max-num-seqs 1 $c \
        --json "$OUT/decode_b1_${tag}.json" | grep -E "TPOT|bandwidth /" | head -n 2
    done
    python3 scripts/profile_decode.py --max-num-seqs 1 $q --sequence "$OUT/sequence_${tag}.txt" \
      2>&1 | tee -a "$OUT/profile_pdl.log" | grep "^batch"
  done
fi
if has fa4; then  # FlashAttention 4 and quack, unpacked by scripts/fa4_carry.sh (source its
  # `env` first): FA4 against cuDNN, quack's gated MLP GEMM against cuBLAS + silu_and_mul,
  # then llama3-paper at 32 requests with FA4 twice (the second run on warm caches: does a
  # chunk after a prefix compile mid-run?) and once with KESTREL_FA4=0 (quack's GEMM stays;
  # KESTREL_QUACK=0 turns it off)
  python3 scripts/bench_cute_kernels.py --tokens 4096 16384 --only fa4 quack-gated 2>&1 \
    | tee "$OUT/fa4_parts.log" | grep -E "^(fa4|quack)"
  i=0
  for fa in 1 1 0; do
    i=$((i + 1))
    KESTREL_FA4=$fa k bench throughput --preset llama-3-8b --workload llama3-paper \
      --num-prompts 32 --max-num-seqs 32 --json "$OUT/tput_fa4_${fa}_$i.json" \
      | grep -E "output tokens/s |TTFT median|start-up"
  done
fi
if has quack; then  # quack, unpacked with FA4 (scripts/fa4_carry.sh; source its `env` first):
  # the gated MLP GEMM's first-use check and GPU tests (with FA4's fallback), the rested 4k
  # BF16 prefill with it on and off (three alternating rounds), and what quack might take next:
  # the FP8 recipe's gated GEMM autotuned, the residual add in o_proj's / down's epilogue
  python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gate_up_swiglu.py \
    tests/kernels/test_attention_backend.py -m gpu 2>&1 | tee "$OUT/quack_tests.log" | tail -n 3
  c=$(ceil)
  for round in 1 2 3; do
    order="1 0"; (( round % 2 )) || order="0 1"
    for qk in $order; do
      KESTREL_QUACK=$qk $L8 --batch 1 --input 4096 --output 1 --max-num-seqs 1 \
        --max-num-batched-tokens 4096 --rest "${REST:-2}" $c \
        --json "$OUT/prefill_4k_quack${qk}_r$round.json" \
        | grep -E "prefill (time|FLOP)|start-up|KV sizing"
    done
  done
  for m in quack.gemm_interface flash_attn.cute; do  # their share of start-up: the import
    python3 -c "import time, torch; t = time.perf_counter(); import $m
print('import $m', round(time.perf_counter() - t, 2), 's')"
  done
  { python3 scripts/bench_cute_kernels.py --tokens 4096 --only quack-fp8
    python3 scripts/bench_prefill_parts.py --tokens 4096 --only residual; } 2>&1 \
    | tee "$OUT/quack_parts.log" | grep -E "^(quack|residual)"
fi
if has ab; then  # batch-1 decode (AB_SHAPE=decode, the default), the 4k prefill
  # (AB_SHAPE=prefill) or batch-1 decode at 8k or 64k context (AB_SHAPE=decode8k, decode64k;
  # llama-3.1-8b), BF16 and the FP8 recipe: another copy of the code at $AB_TREE (default .ab,
  # e.g. `git archive OLD kestrel scripts | tar -x -C .ab`, carried to the device) against this
  # tree, alternating, ${AB_ROUNDS:-1} rounds, in the same call; even rounds run this tree
  # first (an order effect then shows as a sign change). AB_Q="FLAGS": that quantization only
  # (e.g. AB_Q="--quantization fp8 --fp8-attention --no-fp8-skip-layers")
  c=$(ceil)
  preset=llama-3-8b
  case ${AB_SHAPE:-decode} in
    prefill) show="prefill time"
      shape="--input 4096 --output 1 --max-num-batched-tokens 4096 --rest ${REST:-2}";;
    decode64k) preset=llama-3.1-8b show="time per output token"
      shape="--input 65536 --output 64 --max-num-batched-tokens 16384 --iters 1 --warmup 0";;
    decode8k) preset=llama-3.1-8b show="time per output token"
      shape="--input 8192 --output 128 --max-num-batched-tokens 8192";;
    *) shape="--input 128 --output 256"; show="time per output token";;
  esac
  for round in $(seq 1 "${AB_ROUNDS:-1}"); do
    qs=("" "--quantization fp8"); [[ -n ${AB_Q:-} ]] && qs=("$AB_Q")
    for q in "${qs[@]}"; do
      trees="${AB_TREE:-.ab} ."; (( round % 2 )) || trees=". ${AB_TREE:-.ab}"
      for tree in $trees; do
        tag=$(echo "$([[ $tree == . ]] && echo new || echo old)_${AB_SHAPE:-decode}_bf16${q}_r$round" \
              | tr -c 'a-z0-9\n' '_' | tr -s _)
        ( cd "$tree" && PYTHONPATH=$PWD python3 -m kestrel.cli --log-level WARNING bench \
          latency --preset $preset --batch 1 $shape $q --max-num-seqs 1 \
          $c --json "$OUT/ab_${tag}.json" ) | grep -E "$show" | sed "s/^/$tag: /"
      done
    done
  done
fi
if has fp8gemm; then
  python3 tests/quant/bench_fp8_gemm.py --quick 2>&1 | tee "$OUT/fp8_gemm.log" | tail -n 25
fi
if has sweep; then  # tuned skinny-GEMM configs (TUNED / TUNED_16BIT tables) and bf16 vs cuBLAS
  python3 tests/quant/bench_fp8_gemm.py --sweep --json "$OUT/fp8_sweep.json" \
    > "$OUT/fp8_sweep.log" 2>&1; tail -n 30 "$OUT/fp8_sweep.log"
  python3 tests/quant/bench_fp8_gemm.py --sweep-bf16 --json "$OUT/bf16_sweep.json" \
    > "$OUT/bf16_sweep.log" 2>&1; tail -n 30 "$OUT/bf16_sweep.log"
fi
if has sweep-tp2; then  # bf16 skinny GEMM vs cuBLAS on one rank's shapes at TP=2 (one GPU)
  for preset in llama-3-8b llama-3-70b; do
    python3 tests/quant/bench_fp8_gemm.py --sweep-bf16 --preset $preset --tp 2 --m 1 \
      --json "$OUT/bf16_sweep_${preset}_tp2.json" > "$OUT/bf16_sweep_${preset}_tp2.log" 2>&1
    tail -n 12 "$OUT/bf16_sweep_${preset}_tp2.log"
  done
fi
if has fp8-70b; then  # issue 6: a 70B model in FP8 on one H200 (BF16 does not fit)
  k bench latency --preset llama-3-70b --quantization fp8 --batch 1 --input 128 --output 128 \
    --max-num-seqs 8 $(ceil) --json "$OUT/fp8_70b_b1.json" | tail -n 16
fi
if has hf; then  # side by side with transformers generate, same process, same shapes
  c=$(ceil)
  $L8 --batch 1 --input 128 --output 128 --max-num-seqs 1 --iters 1 $c --baseline hf \
    --json "$OUT/hf_b1.json" | tail -n 18
  $L8 --batch 32 --input 4096 --output 256 --max-num-seqs 32 --iters 1 $c --baseline hf \
    --max-num-batched-tokens 8192 --json "$OUT/hf_b32_llama3paper.json" | tail -n 18
fi
if has decode64; then
  c=$(ceil)
  for ctx in 1024 4096; do
    $L8 --batch 64 --input $ctx --output 32 --max-num-seqs 64 --max-num-batched-tokens 16384 \
      --iters 2 $c --json "$OUT/decode_b64_${ctx}.json" | tail -n 16
  done
  # the FP8 KV cache halves the KV bytes each step reads (about two thirds of all at 4k)
  $L8 --batch 64 --input 4096 --output 32 --max-num-seqs 64 --max-num-batched-tokens 16384 \
    --iters 2 --kv-cache-dtype fp8 $c --json "$OUT/decode_b64_4096_kvfp8.json" | tail -n 16
fi
if has decode16k; then  # 16k contexts on one GPU: batch 32 in BF16, batch 64 with an FP8 cache
  # (batch 64 in BF16 needs 134 GB of KV). One prompt per step: enough output tokens that
  # the whole batch decodes together for a while (the TPOT counts only such steps).
  for a in "--batch 32 --output 64" "--batch 64 --output 96 --kv-cache-dtype fp8"; do
    k bench latency --preset llama-3.1-8b $a --input 16384 --max-model-len 16480 --max-num-seqs 64 --max-num-batched-tokens 16384 \
      --iters 1 --warmup 0 $(ceil) --json "$OUT/decode_16k_$(echo $a | tr -c 'a-z0-9' _).json" \
      | tail -n 16
  done
fi
throughputs() {  # the issue's workloads; $1: JSON tag, then extra engine arguments
  local tag=$1 c n; shift; c=$(ceil)
  for n in 32 64; do
    k bench throughput --preset llama-3-8b --workload llama3-paper --num-prompts $n \
      --max-num-seqs $n $c "$@" --json "$OUT/tput${tag}_llama3paper_${n}.json" | tail -n 16
  done
  k bench throughput --preset llama-3-8b --workload mixed-100-1024 $c "$@" \
    --json "$OUT/tput${tag}_mixed.json" | tail -n 16
}
if has throughput; then
  throughputs ""
fi
if has throughput-fp8; then  # the same in FP8 (the recipe)
  throughputs _fp8 --quantization fp8
fi
if has budget; then  # the same workloads at several step token budgets (BUDGETS)
  for b in ${BUDGETS:-2048 4096 8192 16384}; do
    throughputs _budget$b --max-num-batched-tokens $b
  done
fi
if has throughput-kvfp8; then  # BF16 weights with the FP8 KV cache (half the KV bytes a step)
  throughputs _kvfp8 --kv-cache-dtype fp8
fi
if has long; then  # long prompts (llama-3.1-8b, 131k positions): the attention kernels against
  # SDPA for chunks after a prefix, one 64k prompt in 16k chunks (prefill and TPOT at ~64k
  # context, BF16 and FP8 KV cache), and NVIDIA's 32k/2k throughput shape with 8 requests
  python3 tests/kernels/bench_sdpa.py --only long-queries 2>&1 | tee "$OUT/long_queries.log" \
    | tail -n 31
  for kv in auto fp8; do
    k bench latency --preset llama-3.1-8b --batch 1 --input 65536 --output 64 --max-num-seqs 1 \
      --max-num-batched-tokens 16384 --kv-cache-dtype $kv --iters 1 $(ceil) \
      --json "$OUT/lat_64k_kv$kv.json" | tail -n 16
  done
  k bench throughput --preset llama-3.1-8b --workload trtllm-32k-2k --num-prompts 8 $(ceil) \
    --json "$OUT/tput_trtllm_32k.json" | tail -n 16
fi
if has serve; then  # the OpenAI server under mixed-100-1024 (streamed), then the offline engine
  # on the same workload. Needs fastapi/uvicorn/uvloop/httptools: carry .whl and install it to
  # /tmp/site first (PYTHONPATH=/tmp/site:...). Each rate gets its own seed (prompts and
  # lengths drawn anew from the same distribution), so no run finds the previous one's prompts
  # in the server's prefix cache. SERVE_PRESET / SERVE_VOCAB / SERVE_RATES override;
  # SERVE_ARGS: more `kestrel serve` arguments, SERVE_TAG names their files, SERVE_OFFLINE=0
  # skips the offline run.
  port=8766 seed=0 preset=${SERVE_PRESET:-llama-3-8b} vocab=${SERVE_VOCAB:-128256}
  tag=${SERVE_TAG:-}
  python3 -m kestrel.cli serve --preset $preset --port $port ${SERVE_ARGS:-} \
    > "$OUT/serve$tag.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 150); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  for rate in ${SERVE_RATES:-inf 16}; do
    seed=$((seed + 1))
    k bench serve --base-url "http://127.0.0.1:$port" --workload mixed-100-1024 \
      --request-rate $rate --workload-seed $seed --goodput ttft:1000 tpot:50 \
      --gpu-hour-price 3.5 --vocab-size $vocab --no-progress \
      --json "$OUT/serve${tag}_mixed_rate${rate}.json" | grep -E "output token|TTFT median|TPOT median"
  done
  kill -TERM $pid; wait $pid
  if [[ ${SERVE_OFFLINE:-1} == 1 ]]; then
    k bench throughput --preset $preset --workload mixed-100-1024 \
      --json "$OUT/tput_mixed_offline.json" | grep -E "output tokens/s"
  fi
fi
if has fig27; then  # the Llama 3 paper's Figure 27: BF16 vs FP8 throughput against latency
  k bench sweep --preset llama-3-8b --config bf16= --config "fp8=-q fp8" \
    --batch-sizes 1,2,4,8,16,32 --input-len 4096 --output-len 256 --iters 1 \
    --max-num-batched-tokens 8192 --json "$OUT/fig27.json" --plot "$OUT/fig27.png" | tail -n 20
fi
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'run':34} {'TPOT ms':>8} {'BW frac':>8} {'prefill ms':>10} {'FLOP frac':>9} {'vs HF':>6}")
for f in sorted(out.glob("*.json")):
    r = json.loads(f.read_text())
    if "tpot_s" not in r:
        continue
    # four decimals: A/B runs differ by tenths of a percent
    g = lambda k, s=1.0: f"{r[k] * s:.4f}" if r.get(k) is not None else "-"
    print(f"{f.stem:34} {g('tpot_s', 1e3):>8} {g('decode_bandwidth_fraction'):>8} "
          f"{g('prefill_time_s', 1e3):>10} {g('prefill_flops_fraction'):>9} {g('speedup_vs_hf'):>6}")
runs = [(f.stem, r) for f in sorted(out.glob("tput*.json"))
        for r in [json.loads(f.read_text())] if "output_throughput" in r]
if runs:
    print(f"{'throughput run':34} {'out tok/s':>9} {'time s':>7} {'TTFT med':>8} "
          f"{'TPOT med':>8} {'roofline':>8} {'start s':>7}")
for name, r in runs:
    frac = r.get("roofline_fraction")
    print(f"{name:34} {r['output_throughput']:9.0f} {r['duration_s']:7.2f} "
          f"{r['ttft_ms']['median']:8.0f} {r['tpot_ms']['median']:8.1f} "
          f"{frac if frac is None else round(frac, 3)!s:>8} {r.get('startup_s', 0):7.1f}")
PY
# The device tool returns only a few files from $OUT: pack this call's results into one archive
# (roofline.json stays for the next invocation in the same call). PACK=0 keeps them loose.
if [[ ${PACK:-1} == 1 ]]; then
  ( cd "$OUT" && shopt -s nullglob && f=( *.json *.log *.txt *.md *.png ) && f=( "${f[@]/roofline.json}" ) \
    && [[ ${#f[@]} -gt 0 ]] && tar czf "gpu_check_$(date +%H%M%S).tgz" --remove-files ${f[@]} )
fi
