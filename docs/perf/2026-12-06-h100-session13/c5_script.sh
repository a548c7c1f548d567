# session 13, call 5 (H100): the final code's forward+backward, 16 layers, mb 2 (compiled, and with CUDA
# graphs), then the peers (torchtitan 0.3.0, OLMo-core 3.0.0) in the same call, then megamoe again
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
mkdir -p $OUT/fb; OUT=$OUT/fb timeout 150 python3 bench/bench_model.py --systems megamoe-compile,megamoe-compile-cudagraphs --mb 2 > $OUT/fb.log 2>&1; echo "fb rc $?"
grep -E "median|largest|failed|Error" $OUT/fb.log | head; date -u
OUT=$OUT/peers timeout 200 bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile; date -u
mkdir -p $OUT/fb2; OUT=$OUT/fb2 timeout 100 python3 bench/bench_model.py --systems megamoe-compile --mb 2 > $OUT/fb2.log 2>&1; echo "fb2 rc $?"
grep -E "median|failed|Error" $OUT/fb2.log | head -4; date -u
