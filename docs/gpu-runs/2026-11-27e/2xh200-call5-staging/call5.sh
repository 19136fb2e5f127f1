export PYTHONUNBUFFERED=1
nvidia-smi -L
timeout 280 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/parallel/test_tp_pp.py -m gpu > $OUT/tests.log 2>&1; echo "tests rc=$?"; grep -E "passed|failed|FAIL" $OUT/tests.log | tail -5
L="bench latency --preset llama-3-8b --batch 1 --input 128 --output 256 --max-num-seqs 1 --iters 2 --no-roofline"
run() { tag=$1; tree=$2; shift 2; (cd $tree && PYTHONPATH=$PWD timeout 150 python3 -m kestrel.cli --log-level WARNING $L "$@" --json $OUT/$tag.json > $OUT/$tag.log 2>&1); python3 -c "import json; print('$tag', round(json.load(open('$OUT/$tag.json'))['tpot_s']*1e3, 4))" 2>/dev/null || { echo "$tag FAILED"; tail -3 $OUT/$tag.log; }; }
for r in 1 2; do run tp1_old_$r .ab -tp 1; run tp1_new_$r . -tp 1; done
for r in 1 2; do run tp2_old_$r .ab -tp 2; run tp2_new_$r . -tp 2; done
