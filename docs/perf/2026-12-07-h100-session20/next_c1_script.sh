# for the next session's first device call (carry .peers): the row-grouped products with two persistent programs an
# SM (bench_grouped_gemm.py --programs-per-sm 2: smaller tiles, one program's epilogue beside the other's main loop;
# session 20's c2 found the small MoE's products at 521 TFLOP/s, bound by their stores) against one (the sweep as
# the model runs it), on the small MoE's and OLMoE's shapes; then target 2 beside the peers on the final code.
# If two an SM win on a geometry's products, give rows_config / launch_rows_mm a programs-per-SM choice and A/B it
# in the model (bench_ab.py) before keeping it.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
P="fwd w1,fwd w2,dgrad w2,dgrad w1,fwd w1 +gather,dgrad w2 +gather"
for n in 1 2; do mkdir -p $OUT/x$n; OUT=$OUT/x$n timeout 150 python3 bench/bench_grouped_gemm.py --tma --geometries small,olmoe --programs-per-sm $n --only "$P" 2>&1 | tee $OUT/tma_x$n.log | grep -vE "^    \("; date -u; done
OUT=$OUT/fb timeout 120 python3 bench/bench_model.py --systems megamoe-compile --mb 2 --iters 20 --back-to-back > $OUT/fb.log 2>&1; grep -E "tok/s" $OUT/fb.log; date -u
left=$((590 - SECONDS)); echo "peers: ${left} s left"
OUT=$OUT/peers BENCH_DEADLINE_S=$((left - 15)) timeout $left bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile; date -u
