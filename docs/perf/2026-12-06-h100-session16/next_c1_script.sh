# for the next session's first device call (NOT RUN in session 16: its device time was spent): target 2 as the
# peers are timed, with and without CUDA graphs, then the peers, in one call; then inductor's autotuned GEMM
# templates for the dense projections against cuBLAS (bench_ab, back to back). Carry .peers.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
mkdir -p $OUT/fb; OUT=$OUT/fb timeout 200 python3 bench/bench_model.py --systems megamoe-compile,megamoe-compile-cudagraphs --mb 2 --iters 20 --back-to-back > $OUT/fb.log 2>&1; echo "fb rc $?"
grep -E "median|failed|Error" $OUT/fb.log | head -4; date -u
OUT=$OUT/peers BENCH_DEADLINE_S=180 timeout 200 bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile; date -u
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT timeout 170 python3 bench_ab.py torch._inductor.config.max_autotune_gemm=False,True --rounds 2 --back-to-back) > $OUT/ab.log 2>&1; echo "ab rc $?"
grep -E "medians|first step|Error" $OUT/ab.log; date -u
