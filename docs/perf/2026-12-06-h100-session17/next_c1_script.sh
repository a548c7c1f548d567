# for the next session's first device call (NOT RUN in session 17: its device time was spent). Carry .peers.
# 1. target 2 on another machine: the forward+backward timed back to back twice, then the peers, in one call;
# 2. in the time left: inductor's autotuned GEMM templates for the dense projections against cuBLAS, alternated.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for r in 1 2; do mkdir -p $OUT/fb$r; OUT=$OUT/fb$r timeout 110 python3 bench/bench_model.py --systems megamoe-compile --mb 2 --iters 20 --back-to-back > $OUT/fb$r.log 2>&1; echo "fb$r rc $?"
  grep -E "median|failed|Error" $OUT/fb$r.log | head -2; done; date -u
OUT=$OUT/peers BENCH_DEADLINE_S=150 timeout 165 bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile; date -u
left=$((575 - SECONDS)); echo "autotune A/B: ${left} s left"
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT timeout $left python3 bench_ab.py torch._inductor.config.max_autotune_gemm=False,True --rounds 2 --back-to-back) > $OUT/ab_autotune.log 2>&1; echo "ab rc $?"
grep -E "medians|Error" $OUT/ab_autotune.log; date -u
