# for the next session, call 1 (no carry; not run in session 25): does replaying each compiled block as a CUDA graph
# take out FP8's idle (c5: 115.5 ms of kernels in a 120.3 ms step; 70k needs 117.0 ms)? FP8 with the weights cached,
# plain and as CUDA graphs, then bf16 the same two ways, one process, back to back; then a second round as time allows.
# Each FP8 variant also times the weight cache refilled both ways (`experts.FP8_CACHE_IN_PLACE`, off: the A/B).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for r in 1 2; do
  left=$((570 - SECONDS)); [ $left -lt 150 ] && break
  mkdir -p $OUT/r$r
  OUT=$OUT/r$r timeout $left python3 bench/bench_model.py --mb 2 --back-to-back --systems \
      megamoe-compile-fp8-cached,megamoe-compile-fp8-cached-cudagraphs,megamoe-compile,megamoe-compile-cudagraphs \
      > $OUT/r$r/run.log 2>&1
  echo "round $r rc $?"; grep -E " mb=2 median|failed|skipping cudagraphs|quantized" $OUT/r$r/run.log | cut -c1-300 | tail -8; date -u
done
