# for the next session's first device call (NOT RUN in session 19: its device time was spent). Carry .peers.
# The weight gradient's gathering forms at five stages (grouped_gemm.WGRAD_GATHER_STAGES, 3 by default until
# timed): the model A/B of the rows gathered, read in place at three stages, read in place at five (OLMoE 16
# layers mb 2, and the small MoE), the products alone, then the peers in the time left (target 2 in one call).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
S=megamoe.moe.experts
G=megamoe.moe.grouped_gemm.WGRAD_GATHER_STAGES
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT timeout 150 python3 bench_ab.py $S.READ_TOKENS_IN_PLACE=False,True,True $S.READ_GRADIENT_IN_PLACE=False,True,True $G=3,3,5 --rounds 2 --back-to-back) > $OUT/ab_olmoe.log 2>&1; echo "ab rc $?"
grep -E "medians|Error|error" $OUT/ab_olmoe.log; date -u
mkdir -p $OUT/small; (cd bench && PYTHONPATH=$PWD/.. OUT=$OUT/small timeout 120 python3 bench_ab.py $S.READ_TOKENS_IN_PLACE=False,True,True $S.READ_GRADIENT_IN_PLACE=False,True,True $G=3,3,5 --rounds 2 --back-to-back --seq 1024 --mb 32 --set model.d_model=512 model.n_heads=8 model.n_layers=8 moe.ffn_hidden=256) > $OUT/ab_small.log 2>&1; echo "small rc $?"
grep -E "medians|Error|error" $OUT/ab_small.log; date -u
P="wgrad w1,wgrad w1 +gather,wgrad w2,wgrad w2 +gather"
OUT=$OUT timeout 120 python3 bench/bench_grouped_gemm.py --tma --geometries olmoe,small --only "$P" 2>&1 | tee $OUT/tma_wgrad.log | grep -vE "^    \("; date -u
left=$((590 - SECONDS)); echo "peers: ${left} s left"
OUT=$OUT/peers BENCH_DEADLINE_S=$((left - 15)) timeout $left bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile; date -u
