# for the next session, call 2 (no carry; not run in session 25): q, k and v as one product against the three
# (`megamoe.model.attention.FUSED_QKV`, off by default), forward+backward, 16 layers, mb 2, alternated in one
# process, two rounds: bf16, then FP8 with the weights cached as time allows; the CUDA tests first.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# first the CUDA tests this session added (the compiled in-place weight quantization) with the FP8 ones (~90 s)
timeout 200 python3 -m pytest -q tests/test_fp8_fused.py tests/test_grouped_gemm.py tests/test_experts.py tests/test_kernels.py -k "fp8 or cuda" 2>&1 | grep -E "^E  |FAILED|passed|failed" | cut -c1-300 | tail -8
cd bench
timeout $((560 - SECONDS)) python3 bench_ab.py megamoe.model.attention.FUSED_QKV=False,True --rounds 2 --back-to-back \
    > $OUT/ab_qkv_bf16.log 2>&1; echo "bf16 rc $?"; grep -E "medians|Error" $OUT/ab_qkv_bf16.log | tail -4; date -u
left=$((575 - SECONDS)); [ $left -ge 150 ] && timeout $left python3 bench_ab.py megamoe.model.attention.FUSED_QKV=False,True \
    --rounds 2 --back-to-back --fp8-cache --set moe.expert_precision=fp8 > $OUT/ab_qkv_fp8.log 2>&1
grep -E "medians|Error" $OUT/ab_qkv_fp8.log 2>/dev/null | tail -4; date -u
