# session 27, call 1 (no carry): attention's four projections (q, k, v, o) as FP8 products
# (`megamoe.model.fp8_linear.Linear.fp8`, the class default; `model.attention_precision: fp8` in a config) against
# bf16, forward+backward, 16 layers, mb 2, alternated in one process, two rounds, the weights of every FP8 layer
# quantized once before each value's steps (--fp8-cache): FP8 experts (profile of the FP8-projection arm), then
# bf16 experts as time allows. First: the CUDA path of `fp8_linear` against its dequantized reference.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 120 python3 -m pytest -q tests/test_fp8_linear.py 2>&1 | tail -2
cd bench
timeout $((340 - SECONDS)) python3 bench_ab.py megamoe.model.fp8_linear.Linear.fp8=True,False --rounds 2 --back-to-back \
    --fp8-cache --set moe.expert_precision=fp8 --profile > $OUT/ab_proj_fp8.log 2>&1; echo "fp8 rc $?"
grep -E "medians|Error|error" $OUT/ab_proj_fp8.log | tail -4; date -u
left=$((575 - SECONDS)); [ $left -ge 150 ] && timeout $left python3 bench_ab.py megamoe.model.fp8_linear.Linear.fp8=False,True \
    --rounds 2 --back-to-back --fp8-cache > $OUT/ab_proj_bf16.log 2>&1
grep -E "medians|Error|error" $OUT/ab_proj_bf16.log 2>/dev/null | tail -4; date -u
