# session 27, call 1 (session 26's script, tags renamed) (kind nvidia-h200, needs_h200, carry .whl .devdata): the full OLMoE-1B-7B (16 layers) through
# the trainer on one H200, compiled, bf16, micro-batch 2, 10 steps (target 3's row); then the same with FP8 experts
# as time allows.
export PYTHONUNBUFFERED=1; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=10
OUT=$OUT/t3 TAG=s27-h200- timeout $((${LIMIT:-380} - SECONDS)) bash bench/train_device.sh 16 2>&1 | grep -v "^name"; date -u
left=$((585 - SECONDS)); [ $left -ge 150 ] && OUT=$OUT/t3 TAG=s27-h200-fp8- EXTRA="moe.expert_precision=fp8" \
    timeout $left bash bench/train_device.sh 16 2>&1 | grep -v "^name"; date -u
rm -rf runs
