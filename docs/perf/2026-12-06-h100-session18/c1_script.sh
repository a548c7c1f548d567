# session 18, call 1 (lean: little device time left): the experts reading token rows in place
# (experts.READ_TOKENS_IN_PLACE / READ_GRADIENT_IN_PLACE): their CUDA tests, then the A/B in the model (16 layers,
# mb 2, back to back), then the small MoE's forward+backward A/B in the time left. From the repository root.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 100 python3 -m pytest -q -p no:cacheprovider -rs tests/test_grouped_gemm.py tests/test_experts.py tests/test_kernels.py -k "equal_torchs or tokens or permutation_kernels_equals" > $OUT/tests.log 2>&1; echo "tests rc $?"; tail -3 $OUT/tests.log; date -u
S=megamoe.moe.experts
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT timeout 150 python3 bench_ab.py $S.READ_TOKENS_IN_PLACE=False,True $S.READ_GRADIENT_IN_PLACE=False,True --rounds 2 --back-to-back) > $OUT/ab_olmoe.log 2>&1; echo "ab rc $?"
grep -E "medians|Error|error" $OUT/ab_olmoe.log; date -u
left=$((LIMIT - 10 - SECONDS)); echo "small: ${left} s left"
mkdir -p $OUT/small; (cd bench && PYTHONPATH=$PWD/.. OUT=$OUT/small timeout $left python3 bench_ab.py $S.READ_TOKENS_IN_PLACE=False,True $S.READ_GRADIENT_IN_PLACE=False,True --rounds 2 --back-to-back --seq 1024 --mb 32 --set model.d_model=512 model.n_heads=8 model.n_layers=8 moe.ffn_hidden=256) > $OUT/ab_small.log 2>&1; echo "small rc $?"
grep -E "medians|Error|error" $OUT/ab_small.log; date -u
