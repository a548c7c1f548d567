# session 13, call 3 (H100): the row-grouped products store their tiles by TMA through ragged descriptors
# (grouped_gemm.ROWS_TMA_STORE) against masked stores from registers, alternated in one process (forward+backward,
# 16 layers, mb 2, compiled); the expert GEMMs at this model's loads both ways; the CUDA tests
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
(cd bench && timeout 300 python3 bench_ab.py megamoe.moe.grouped_gemm.ROWS_TMA_STORE=True,False --rounds 2 --profile) > $OUT/ab.log 2>&1; echo "ab rc $?"
grep -E "median|first step|largest|Error|error" $OUT/ab.log | head -30; date -u
for v in True False; do timeout 100 python3 -c "import sys; sys.path.insert(0, 'bench'); import megamoe.moe.grouped_gemm as G; G.ROWS_TMA_STORE = $v; sys.argv = ['bench_grouped_gemm.py', '--geometries', 'olmoe', '--loads', '$OUT/bench_ab.jsonl']; import runpy; runpy.run_path('bench/bench_grouped_gemm.py', run_name='__main__')" > $OUT/gg_$v.log 2>&1; echo "gg $v rc $?"; grep -E "ours" $OUT/gg_$v.log; done; date -u
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py -x 2>&1 | tail -2; date -u
