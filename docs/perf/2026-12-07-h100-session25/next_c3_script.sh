# for the next session, call 3 (no carry; not run in session 25): the weight gradient of e4m3 rows with their
# scales (grouped_gemm.launch_weight_grad_mm(..., scale=), written in session 25, not used by the model) against
# megamoe's bf16 weight gradient of the same rows dequantized, OLMoE's two shapes, a config sweep; its CUDA test.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 120 python3 -m pytest -q tests/test_grouped_gemm.py -k "fp8_rows or cuda" 2>&1 | grep -E "^E  |FAILED|passed|failed" | cut -c1-300 | tail -6
timeout 300 python3 bench/bench_grouped_gemm.py --fp8-wgrad --geometries olmoe 2>&1 | tail -12; date -u
