# session 24, call 3 (no carry; the machine of c1-c2): the CUDA test fixed (one bf16 step), the FP8 product's stages
# per shape (scaled_rows_config); the cached FP8 forward+backward's kernel table; then inductor's multi-kernel
# reductions off / on for FP8 cached (one round, if time is left).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u
timeout 100 python3 -m pytest -q -x tests/test_fp8_fused.py tests/test_grouped_gemm.py -k "cuda" 2>&1 | tail -2; date -u
mkdir -p $OUT/prof; OUT=$OUT/prof timeout 170 python3 bench/bench_model.py --mb 2 --systems megamoe-compile-fp8-cached --profile > $OUT/prof/run.log 2>&1
grep -E "tok/s" $OUT/prof/run.log | head -2; head -24 $OUT/prof/profile_*.txt 2>/dev/null | cut -c1-150; date -u
for mk in 0 1; do left=$((570 - SECONDS)); [ $left -lt 120 ] && break; mkdir -p $OUT/mk$mk
  OUT=$OUT/mk$mk timeout $left python3 bench/bench_model.py --mb 2 --back-to-back --systems megamoe-compile-fp8-cached --inductor triton.multi_kernel=$mk > $OUT/mk$mk/run.log 2>&1
  echo "multi_kernel=$mk rc $?"; grep -E " mb=2 median" $OUT/mk$mk/run.log | tail -1; date -u; done
