# session 24, call 6 (no carry; the machine of c5), as run: the FP8 and CUDA tests with the routing weights' bound at 3e-2
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q tests/test_fp8_fused.py tests/test_grouped_gemm.py tests/test_experts.py tests/test_kernels.py -k "fp8 or cuda" 2>&1 | grep -E "^E  |FAILED|passed|failed" | cut -c1-200 | tail -6
# output: 19 passed, 36 deselected, 2 warnings in 47.65s
