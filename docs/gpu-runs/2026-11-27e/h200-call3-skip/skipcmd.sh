export PYTHONUNBUFFERED=1
L="bench latency --preset llama-3-8b --batch 1 --input 128 --output 256 --max-num-seqs 1 --iters 2 --no-roofline"
run() { tag=$1; shift; (cd .ab && PYTHONPATH=$PWD timeout 150 python3 -m kestrel.cli --log-level WARNING $L "$@" --json $OUT/$tag.json > $OUT/$tag.log 2>&1); python3 -c "import json,sys; print('$tag', round(json.load(open('$OUT/$tag.json'))['tpot_s']*1e3, 4))" 2>/dev/null || { echo "$tag FAILED"; tail -5 $OUT/$tag.log; }; }
nvidia-smi -L
run base1
KSKIP=norm run norm
KSKIP=stage run stage
KSKIP=attn run attn
run base2
run fp8base1 --quantization fp8
KSKIP=swq run fp8swq --quantization fp8
KSKIP=norm run fp8norm --quantization fp8
run fp8base2 --quantization fp8
