# session 19, call 4: the weight gradient's gathering forms at five stages (grouped_gemm.WGRAD_GATHER_STAGES:
# three buffers an operand, as the TMA form's three stages); the model A/B of both in-place reads again
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
S=megamoe.moe.experts
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT timeout 110 python3 bench_ab.py $S.READ_TOKENS_IN_PLACE=False,True,False,True $S.READ_GRADIENT_IN_PLACE=False,False,True,True --rounds 2 --back-to-back) > $OUT/ab_olmoe.log 2>&1; echo "ab rc $?"
grep -E "medians|Error|error" $OUT/ab_olmoe.log; date -u
P="wgrad w1,wgrad w1 +gather,wgrad w2,wgrad w2 +gather"
OUT=$OUT timeout 70 python3 bench/bench_grouped_gemm.py --tma --geometries olmoe --only "$P" 2>&1 | tee $OUT/tma_wgrad.log | grep -vE "^    \("; date -u
left=$((190 - SECONDS)); echo "small: $left s"; [ $left -lt 80 ] && exit 0
mkdir -p $OUT/small; (cd bench && PYTHONPATH=$PWD/.. OUT=$OUT/small timeout $left python3 bench_ab.py $S.READ_TOKENS_IN_PLACE=False,True,False,True $S.READ_GRADIENT_IN_PLACE=False,False,True,True --rounds 2 --back-to-back --seq 1024 --mb 32 --set model.d_model=512 model.n_heads=8 model.n_layers=8 moe.ffn_hidden=256) > $OUT/ab_small.log 2>&1; echo "small rc $?"
grep -E "medians|Error|error" $OUT/ab_small.log; date -u
