# session 15, call 1: the CUDA-only tests (all five files), then 612678d+'s forward+backward, 16 layers, mb 2,
# compiled (the MoE block as one graph), and the peers in the same call (target 2)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 170 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_loss.py tests/test_grouped_gemm.py tests/test_experts.py tests/test_step_stats.py -k "cuda or graph or host_copy_waits" > $OUT/tests.log 2>&1; echo "tests rc $?"; tail -3 $OUT/tests.log; date -u
mkdir -p $OUT/fb; OUT=$OUT/fb timeout 100 python3 bench/bench_model.py --systems megamoe-compile --mb 2 > $OUT/fb.log 2>&1; echo "fb rc $?"
grep -E "median|largest|failed|Error" $OUT/fb.log | head -4; date -u
OUT=$OUT/peers BENCH_DEADLINE_S=180 timeout 200 bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile; date -u
