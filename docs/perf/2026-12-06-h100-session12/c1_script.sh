# session 12, call 1: forward+backward of OLMoE-1B-7B (16 layers, mb 2) compiled and with CUDA graphs,
# kernel tables of both; then the 8-layer trainer step (target 1) on the same code
export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; git log --oneline -1 2>/dev/null
mkdir -p $OUT/fb; OUT=$OUT/fb timeout 170 python3 bench/bench_model.py --systems megamoe-compile,megamoe-compile-cudagraphs --mb 2 --profile > $OUT/fb.log 2>&1; echo "fb rc $?"
grep -E "median|first step|failed|Error" $OUT/fb.log | head; date -u
TAG=s12- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=20 timeout 100 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; date -u
