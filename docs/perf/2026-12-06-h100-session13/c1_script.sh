# session 13, call 1: the first projection with SwiGLU in its epilogue (FUSE_SWIGLU) against the separate
# activation pass, alternated in one process (forward+backward, 16 layers, mb 2, compiled); the expert
# GEMMs at this model's routing loads; the CUDA tests of the kernels
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
(cd bench && timeout 330 python3 bench_ab.py megamoe.moe.grouped_gemm.FUSE_SWIGLU=True,False --rounds 2 --profile) > $OUT/ab.log 2>&1; echo "ab rc $?"
grep -E "median|first step|largest|Error|error" $OUT/ab.log | head -30; date -u
timeout 150 python3 bench/bench_grouped_gemm.py --geometries olmoe --loads $OUT/bench_ab.jsonl > $OUT/gg.log 2>&1; echo "gg rc $?"; tail -12 $OUT/gg.log; date -u
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py tests/test_experts.py tests/test_model.py -x 2>&1 | tail -4; date -u
