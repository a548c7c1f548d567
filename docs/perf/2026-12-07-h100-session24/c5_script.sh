# session 24, call 5 (no carry): the FP8 CUDA tests (all of them: c1-c4 stopped at the first failure); bf16 against
# FP8 (weights cached) on the final code (the forward's SwiGLU quantized by fp8_fused's kernel), forward+backward,
# 16 layers, mb 2, back to back, one process; then that kernel against inductor's code (bench_ab.py, FP8 per call).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 150 python3 -m pytest -q tests/test_fp8_fused.py tests/test_grouped_gemm.py tests/test_experts.py tests/test_kernels.py -k "fp8 or cuda" 2>&1 | grep -E "^E  |FAILED|passed|failed" | cut -c1-300 | head -8; date -u
timeout 170 python3 bench/bench_model.py --mb 2 --back-to-back --systems megamoe-compile,megamoe-compile-fp8-cached > $OUT/model.log 2>&1; echo "model rc $?"
grep -E " mb=2 median|quantized in|failed|Error" $OUT/model.log | tail -4; date -u
left=$((500 - SECONDS)); [ $left -ge 100 ] && timeout $left python3 bench/bench_ab.py megamoe.moe.fp8_fused.FUSED_FORWARD=False,True --rounds 1 --back-to-back --set moe.expert_precision=fp8 > $OUT/ab.log 2>&1; echo "ab rc $?"
grep -E "medians|Error" $OUT/ab.log | tail -3; date -u
