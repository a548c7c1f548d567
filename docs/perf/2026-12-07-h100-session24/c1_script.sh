# session 24, call 1 (no carry): megamoe's FP8 grouped-GEMM kernel (grouped_gemm.launch_scaled_rows_mm) on the GPU:
# its CUDA tests and the FP8 experts' CUDA tests, then the four FP8 products of OLMoE's layer, a config sweep against
# torch._scaled_grouped_mm (bench_grouped_gemm.py --fp8).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 200 python3 -m pytest -q -x tests/test_grouped_gemm.py tests/test_experts.py -k "fp8" 2>&1 | tail -3; date -u
timeout 360 python3 bench/bench_grouped_gemm.py --fp8 --geometries olmoe > $OUT/gemm.log 2>&1; echo "gemm rc $?"
cp bench_out/bench_grouped_gemm.jsonl $OUT/ 2>/dev/null; grep -v "^    (" $OUT/gemm.log | cut -c1-220 | tail -20; date -u
