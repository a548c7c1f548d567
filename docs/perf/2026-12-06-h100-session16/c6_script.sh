# session 16, call 6 (the last ~4 minutes of device time): the whole-tile stores (grouped_gemm.WHOLE_TILE_STORES)
# through their CUDA test, then alternated with the halves in the model (forward+backward 16 layers mb 2, back to back)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py -k "cuda and True-True" 2>&1 | tail -1
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT timeout 110 python3 bench_ab.py megamoe.moe.grouped_gemm.WHOLE_TILE_STORES=False,True --rounds 2 --back-to-back --iters 8 --warmup 2) > $OUT/ab.log 2>&1; echo "ab rc $?"
grep -E "medians|Error" $OUT/ab.log; date -u
