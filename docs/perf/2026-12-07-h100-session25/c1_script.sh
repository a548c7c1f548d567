# session 25, call 1 (no carry): the FP8 and CUDA tests on this code (session 24's final FP8 code and this session's
# weighted token sum have not run on a GPU), then FP8 (weights cached) forward+backward, 16 layers, mb 2, three arms
# alternated in one process, two rounds: inductor's weighted sum (session 24's code), the sum kernel, the sum kernel
# with inductor's multi-kernel reductions.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 150 python3 -m pytest -q tests/test_fp8_fused.py tests/test_grouped_gemm.py tests/test_experts.py tests/test_kernels.py -k "fp8 or cuda" 2>&1 | grep -E "^E  |FAILED|passed|failed" | cut -c1-300 | tail -8
date -u
cd bench && timeout $((585 - SECONDS)) python3 bench_ab.py megamoe.moe.fp8.SUM_KERNEL=False,True,True \
    torch._inductor.config.triton.multi_kernel=0,0,1 --rounds 2 --back-to-back --fp8-cache \
    --set moe.expert_precision=fp8 > $OUT/ab_fp8.log 2>&1; echo "rc $?"
grep -E "medians|Error|error" $OUT/ab_fp8.log | tail -8; date -u
