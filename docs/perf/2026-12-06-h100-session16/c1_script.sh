# session 16, call 1: the weight gradient flat loop (grouped_gemm.WGRAD_FLAT): CUDA tests, sweep, model A/B
# (written in session 15 as next_c1_script.sh)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py -k cuda 2>&1 | tail -1
OUT=$OUT timeout 200 python3 bench/bench_grouped_gemm.py --tma --geometries olmoe,small > $OUT/sweep.log 2>&1; echo "sweep rc $?"
grep -E "wgrad|all:" $OUT/sweep.log | cut -c1-150; date -u
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT timeout 230 python3 bench_ab.py megamoe.moe.grouped_gemm.WGRAD_FLAT=False,True --rounds 2) > $OUT/ab.log 2>&1; echo "ab rc $?"
grep -E "medians|Error" $OUT/ab.log; date -u
