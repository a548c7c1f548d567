# session 14, call 5 (H100): the final code (half tail tiles off, the counting sort's tuned tile): the sort's
# CUDA test, forward+backward 16 layers mb 2 compiled, then the peers in the same call (target 2)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 50 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "counting_sort" 2>&1 | tail -1
mkdir -p $OUT/fb; OUT=$OUT/fb timeout 100 python3 bench/bench_model.py --systems megamoe-compile --mb 2 > $OUT/fb.log 2>&1; echo "fb rc $?"
grep -E "median|largest|failed|Error" $OUT/fb.log | head -4; date -u
OUT=$OUT/peers BENCH_DEADLINE_S=180 timeout 200 bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile; date -u
