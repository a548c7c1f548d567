# for the next session's first device call (NOT RUN in session 16: its device time was spent). Carry .peers.
# 1. the whole-tile stores (grouped_gemm.WHOLE_TILE_STORES, written after the session's last call): CUDA tests, the
#    products alone (against session 16 c1's sweep: the halves), and alternated with the two halves in the model, back to back;
# 2. target 2 as the peers are timed, with and without CUDA graphs, then the peers, in one call;
# 3. inductor's autotuned GEMM templates for the dense projections against cuBLAS (bench_ab, back to back).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py -k cuda 2>&1 | tail -1
OUT=$OUT timeout 150 python3 bench/bench_grouped_gemm.py --tma --geometries olmoe --whole-tile-stores > $OUT/sweep_whole.log 2>&1; echo "sweep rc $?"
grep -E "fwd|dgrad|wgrad|all:" $OUT/sweep_whole.log | cut -c1-150
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT timeout 200 python3 bench_ab.py megamoe.moe.grouped_gemm.WHOLE_TILE_STORES=False,True --rounds 2 --back-to-back) > $OUT/ab_whole.log 2>&1; echo "ab rc $?"
grep -E "medians|Error" $OUT/ab_whole.log; date -u
mkdir -p $OUT/fb; OUT=$OUT/fb timeout 200 python3 bench/bench_model.py --systems megamoe-compile,megamoe-compile-cudagraphs --mb 2 --iters 20 --back-to-back > $OUT/fb.log 2>&1; echo "fb rc $?"
grep -E "median|failed|Error" $OUT/fb.log | head -4; date -u
OUT=$OUT/peers BENCH_DEADLINE_S=150 timeout 170 bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile; date -u
# in a second call: (cd bench && PYTHONPATH=$PWD/.. OUT=$OUT python3 bench_ab.py torch._inductor.config.max_autotune_gemm=False,True --rounds 2 --back-to-back)
