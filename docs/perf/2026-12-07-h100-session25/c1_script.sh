# session 25 call 1: session 24's next_c1_script.sh, LIMIT as the time left of 575 s
# for the next session, call 1 (no carry; not run in session 24): FP8 ≥ 70k needs ~2 ms more of the 119.3 ms step.
# The three quantizing passes alone, their (rows, warps) sweep (the combine's backward ran at ~75% of the HBM's
# rate in c3's profile); then inductor's multi-kernel reductions off / on alternated (session 23's next_c1_script.sh:
# bf16 and cached FP8, two rounds; session 24's c3 had one FP8 round: -1.2%).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# first the FP8 and CUDA tests: session 24's final FP8 code (fp8.swiglu, the shared helpers) has not run on a GPU
timeout 150 python3 -m pytest -q tests/test_fp8_fused.py tests/test_grouped_gemm.py tests/test_experts.py tests/test_kernels.py -k "fp8 or cuda" 2>&1 | grep -E "^E  |FAILED|passed|failed" | cut -c1-300 | tail -8
timeout 170 python3 bench/bench_model.py --mb 2 --back-to-back --systems megamoe-compile,megamoe-compile-fp8-cached 2>&1 | grep -E " mb=2 median" ; date -u
timeout 120 python3 bench/bench_fp8_fused.py 2>&1 | tail -8; date -u
LIMIT=$((575 - SECONDS)) bash docs/perf/2026-12-07-h100-session23/next_c1_script.sh
