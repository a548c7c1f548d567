# for the next session's first device call (carry .peers): the row-grouped products with two persistent programs an
# SM (session 20 wrote grouped_gemm.ROWS_TWO_PER_SM_MAX_K / ROWS_TWO_PER_SM_CONFIG, off: smaller tiles, one
# program's epilogue beside the other's main loop; session 20's c2 found the small MoE's products at 521 TFLOP/s,
# bound by their stores): the products alone with one program an SM (the sweep as the model runs it) and two
# (bench_grouped_gemm.py --programs-per-sm 2 over tiles two of which fit an SM), then the model A/B on the small
# MoE (K ≤ 512: its four row-grouped products) and OLMoE (K ≤ 1024: its second projection; ≤ 2048: all four), then
# the peers (target 2 in one call with OLMoE's arms). If the sweep prefers another of its tiles to
# ROWS_TWO_PER_SM_CONFIG's, set that one before the A/B. Keep the switch only where the A/B wins.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
P="fwd w1,fwd w2,dgrad w2,dgrad w1,fwd w1 +gather,dgrad w2 +gather"
for n in 1 2; do mkdir -p $OUT/x$n; OUT=$OUT/x$n timeout 100 python3 bench/bench_grouped_gemm.py --tma --geometries small,olmoe --programs-per-sm $n --only "$P" 2>&1 | tee $OUT/tma_x$n.log | grep -vE "^    \("; date -u; done
W=megamoe.moe.grouped_gemm.ROWS_TWO_PER_SM_MAX_K
mkdir -p $OUT/small $OUT/olmoe
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT/small timeout 100 python3 bench_ab.py $W=0,512 --rounds 2 --back-to-back --seq 1024 --mb 32 --set model.d_model=512 model.n_heads=8 model.n_layers=8 moe.ffn_hidden=256) > $OUT/ab_small.log 2>&1; echo "small rc $?"
grep -E "medians|Error|error" $OUT/ab_small.log; date -u
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT/olmoe timeout 200 python3 bench_ab.py $W=0,1024,2048 --rounds 2 --back-to-back) > $OUT/ab_olmoe.log 2>&1; echo "olmoe rc $?"
grep -E "medians|Error|error" $OUT/ab_olmoe.log; date -u
left=$((590 - SECONDS)); echo "peers: ${left} s left"
OUT=$OUT/peers BENCH_DEADLINE_S=$((left - 15)) timeout $left bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile; date -u
