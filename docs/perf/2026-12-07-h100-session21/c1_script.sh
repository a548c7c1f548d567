# session 21, call 1 (carry .peers): session 20's next_c1_script.sh reordered so that what decides comes first
# (device time was short): the model A/B of grouped_gemm.ROWS_TWO_PER_SM_MAX_K (the row-grouped products with
# reductions ≤ K on 128×128×64 tiles, two persistent programs an SM) on the small MoE (0 / 512: its four
# row-grouped products) and OLMoE (0 / 1024: its second projection; 2048: all four), then the peers (target 2,
# with OLMoE's arms) if LIMIT (s, default 585) leaves time, then the products alone with one and two programs an SM on the small shapes if time is left.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
W=megamoe.moe.grouped_gemm.ROWS_TWO_PER_SM_MAX_K
mkdir -p $OUT/small $OUT/olmoe
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT/small timeout 100 python3 bench_ab.py $W=0,512 --rounds 2 --back-to-back --seq 1024 --mb 32 --set model.d_model=512 model.n_heads=8 model.n_layers=8 moe.ffn_hidden=256) > $OUT/ab_small.log 2>&1; echo "small rc $?"
grep -E "medians|Error|error" $OUT/ab_small.log; date -u
left=$((${LIMIT:-585} - SECONDS)); (cd bench && PYTHONPATH=$PWD/.. OUT=$OUT/olmoe timeout $((left < 200 ? left : 200)) python3 bench_ab.py $W=0,1024,2048 --rounds 2 --back-to-back) > $OUT/ab_olmoe.log 2>&1; echo "olmoe rc $?"
grep -E "medians|Error|error" $OUT/ab_olmoe.log; date -u
left=$((${LIMIT:-585} - SECONDS)); [ $left -ge 150 ] && OUT=$OUT/peers BENCH_DEADLINE_S=120 timeout 140 bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile 2>&1 | grep -E "tok|Error|error" | tail -6; date -u
P="fwd w1,fwd w2,dgrad w2,dgrad w1,fwd w1 +gather,dgrad w2 +gather"
for n in 1 2; do left=$((${LIMIT:-585} - SECONDS)); [ $left -lt 30 ] && break; mkdir -p $OUT/x$n
  OUT=$OUT/x$n timeout $((left < 90 ? left : 90)) python3 bench/bench_grouped_gemm.py --tma --geometries small --programs-per-sm $n --only "$P" 2>&1 | tee $OUT/tma_x$n.log | grep -vE "^    \("; date -u; done
