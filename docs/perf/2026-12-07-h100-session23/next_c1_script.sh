# for the next session, call 1 (no carry; not run in session 23): inductor's multi-kernel reductions. The FP8 step's
# quantizing kernels and the RMSNorms over d 2048 compile as two-pass ("red") row reductions because inductor makes
# rows persistent only up to 1024 wide; `triton.multi_kernel` raises that 16× and picks the faster of the two forms
# by timing them at run time. Forward+backward, 16 layers, mb 2, bf16 and FP8 (weights cached), off / on alternated,
# one process each, two rounds; LIMIT (s, default 560) bounds the whole.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=${LIMIT:-560}
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for r in 1 2; do for mk in 0 1; do
  left=$((L - SECONDS)); [ $left -lt 100 ] && break 2
  mkdir -p $OUT/r$r-mk$mk
  OUT=$OUT/r$r-mk$mk timeout $((left < 200 ? left : 200)) python3 bench/bench_model.py --mb 2 --back-to-back \
      --systems megamoe-compile,megamoe-compile-fp8-cached --inductor triton.multi_kernel=$mk > $OUT/r$r-mk$mk/run.log 2>&1
  echo "round $r multi_kernel=$mk rc $?"; grep -E " mb=2 median|failed|Error" $OUT/r$r-mk$mk/run.log | tail -3; date -u
done; done
