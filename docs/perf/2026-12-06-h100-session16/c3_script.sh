# session 16, call 3: session 16's sweep configs (grouped_gemm.RETUNED) A/B in the model, timed back to back;
# then the compiled forward+backward with and without CUDA graphs, back to back
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py -k cuda 2>&1 | tail -1
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT timeout 260 python3 bench_ab.py megamoe.moe.grouped_gemm.RETUNED=False,True --rounds 2 --back-to-back) > $OUT/ab.log 2>&1; echo "ab rc $?"
grep -E "medians|Error" $OUT/ab.log; date -u
mkdir -p $OUT/fb; OUT=$OUT/fb timeout 200 python3 bench/bench_model.py --systems megamoe-compile,megamoe-compile-cudagraphs --mb 2 --iters 20 --back-to-back > $OUT/fb.log 2>&1; echo "fb rc $?"
grep -E "median|failed|Error" $OUT/fb.log | head -4; date -u
