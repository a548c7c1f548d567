# session 24, call 5 (no carry): the CUDA tests with the fixed bounds; then inductor's multi-kernel reductions off / on
# alternated, bf16 and FP8 (weights cached), forward+backward, 16 layers, mb 2, one process each, two rounds
# (session 23's next_c1_script.sh, LIMIT 470 s after the tests).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u
timeout 150 python3 -m pytest -q tests/test_fp8_fused.py tests/test_grouped_gemm.py tests/test_experts.py tests/test_kernels.py -k "fp8 or cuda" 2>&1 | grep -E "^E |FAILED|passed|failed" | cut -c1-300 | head -8
LIMIT=$((SECONDS + 420)) bash docs/perf/2026-12-07-h100-session23/next_c1_script.sh
