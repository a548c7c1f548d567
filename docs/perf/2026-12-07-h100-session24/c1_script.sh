# session 24, call 1 (no carry): megamoe's FP8 grouped-GEMM kernel (grouped_gemm.launch_scaled_rows_mm) and the FP8
# expert block as one Function (fp8.token_sums, fp8_fused's kernels) on the GPU: their CUDA tests; the four FP8
# products of OLMoE's layer, a config sweep against torch._scaled_grouped_mm (bench_grouped_gemm.py --fp8); then
# bf16 against FP8 (weights cached), forward+backward, 16 layers, mb 2, back to back, one process.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 200 python3 -m pytest -q -x tests/test_fp8_fused.py tests/test_grouped_gemm.py tests/test_experts.py tests/test_kernels.py -k "fp8 or cuda" 2>&1 | tail -4; date -u
timeout 200 python3 bench/bench_grouped_gemm.py --fp8 --geometries olmoe > $OUT/gemm.log 2>&1; echo "gemm rc $?"
grep -v "^    (" $OUT/gemm.log | cut -c1-230 | tail -12; date -u
left=$((590 - SECONDS)); [ $left -ge 150 ] && timeout $left python3 bench/bench_model.py --mb 2 --back-to-back --systems megamoe-compile,megamoe-compile-fp8-cached > $OUT/model.log 2>&1; echo "model rc $?"
grep -E "tok/s|quantized in|failed|Error" $OUT/model.log | tail -6; date -u
