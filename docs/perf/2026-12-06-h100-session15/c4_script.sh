# session 15, call 4: the expert kernels' config sweep with two new configs (128×256×128 tiles, two stages:
# half the k-steps a tile), OLMoE and small shapes, random top-8; then a profile of the code as it stands
# (the MoE block as one graph since 612678d; PDL off) for where the step's time goes
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
OUT=$OUT timeout 200 python3 bench/bench_grouped_gemm.py --tma --geometries olmoe,small > $OUT/sweep.log 2>&1; echo "sweep rc $?"
grep -E "best|all:|olmoe|small" $OUT/sweep.log | cut -c1-170; date -u
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT timeout 200 python3 bench_ab.py megamoe.model.olmoe.FUSED_RESIDUAL=True --rounds 1 --profile) > $OUT/ab.log 2>&1; echo "ab rc $?"
grep -E "medians|Error" $OUT/ab.log; head -12 $OUT/gaps_ab_True.txt; date -u
