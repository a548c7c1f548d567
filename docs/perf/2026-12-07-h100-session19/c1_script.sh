# for the next session's first device call (NOT RUN in session 18: no machine could be started). Carry .peers.
# The experts reading token rows in place (experts.READ_TOKENS_IN_PLACE / READ_GRADIENT_IN_PLACE, off by default
# until timed): their CUDA tests, the A/B in the model (16 layers, mb 2, back to back, the four combinations
# alternated in two rounds: also target 2's figure), the small MoE's forward+backward A/B (d 512, 8 layers,
# 64 x 256, seq 1024, mb 32), then the peers in the time left (target 2 in the same call).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_grouped_gemm.py tests/test_experts.py tests/test_kernels.py -k "cuda or graph or tokens" > $OUT/tests.log 2>&1; echo "tests rc $?"; tail -3 $OUT/tests.log; date -u
S=megamoe.moe.experts
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT timeout 220 python3 bench_ab.py $S.READ_TOKENS_IN_PLACE=False,True,False,True $S.READ_GRADIENT_IN_PLACE=False,False,True,True --rounds 2 --back-to-back) > $OUT/ab_olmoe.log 2>&1; echo "ab rc $?"
grep -E "medians|Error|error" $OUT/ab_olmoe.log; date -u
mkdir -p $OUT/small; (cd bench && PYTHONPATH=$PWD/.. OUT=$OUT/small timeout 150 python3 bench_ab.py $S.READ_TOKENS_IN_PLACE=False,True,False,True $S.READ_GRADIENT_IN_PLACE=False,False,True,True --rounds 2 --back-to-back --seq 1024 --mb 32 --set model.d_model=512 model.n_heads=8 model.n_layers=8 moe.ffn_hidden=256) > $OUT/ab_small.log 2>&1; echo "small rc $?"
grep -E "medians|Error|error" $OUT/ab_small.log; date -u
left=$((590 - SECONDS)); echo "peers: ${left} s left"
OUT=$OUT/peers BENCH_DEADLINE_S=$((left - 15)) timeout $left bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile; date -u
