export PYTHONUNBUFFERED=1
nvidia-smi -L
L="bench latency --preset llama-3-8b --batch 1 --input 128 --output 256 --max-num-seqs 1 --iters 2 --no-roofline"
run() { tag=$1; shift; (cd .ab && PYTHONPATH=$PWD timeout 150 python3 -m kestrel.cli --log-level WARNING $L "$@" --json $OUT/$tag.json > $OUT/$tag.log 2>&1); python3 -c "import json; print('$tag', round(json.load(open('$OUT/$tag.json'))['tpot_s']*1e3, 4))" 2>/dev/null || { echo "$tag FAILED"; tail -3 $OUT/$tag.log; }; }
run tp2_base1 -tp 2
KSKIP=arnorm run tp2_arnorm -tp 2
KSKIP=attn run tp2_attn -tp 2
run tp2_base2 -tp 2
run tp1_base -tp 1
KSKIP=attn run tp1_attn -tp 1
