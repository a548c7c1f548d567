# session 23, call 6 (no carry): FP8 experts with each token quantized once (`experts.token_rows`) on the GPU: the CUDA
# tests, then bf16 against FP8 per call and FP8 with the weights quantized once, forward+backward, 16 layers, mb 2,
# back to back, one process; then the cached FP8 run's kernel table.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 150 python3 -m pytest -q -x tests/test_experts.py -k "fp8" 2>&1 | tail -2; date -u
timeout 330 python3 bench/bench_model.py --mb 2 --back-to-back --systems megamoe-compile,megamoe-compile-fp8,megamoe-compile-fp8-cached > $OUT/fp8.log 2>&1; echo "bench rc $?"
grep -E "tok/s|quantized in|failed|Error" $OUT/fp8.log | tail -8; date -u
[ $SECONDS -lt 400 ] && mkdir -p $OUT/prof && OUT=$OUT/prof timeout 150 python3 bench/bench_model.py --mb 2 --systems megamoe-compile-fp8-cached --profile > $OUT/prof/run.log 2>&1; grep -E "tok/s" $OUT/prof/run.log; head -14 $OUT/prof/profile_*.txt 2>/dev/null | cut -c1-140; date -u
