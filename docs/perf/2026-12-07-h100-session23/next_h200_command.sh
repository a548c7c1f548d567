# for the next session (carry .whl .devdata; kind nvidia-h200, needs_h200: the 16-layer step needs ~105 GiB): the full
# OLMoE-1B-7B through the trainer (session 22's c3_command.sh), then, in the time left, the same with FP8 experts and 4
# micro-batches a step (the weight cache on). Not run in session 23: no H200 started.
export PYTHONUNBUFFERED=1; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=12
OUT=$OUT/t3 TAG=s24-h200- timeout 370 bash bench/train_device.sh 16 2>&1 | grep -v "^name"; date -u
left=$((580 - SECONDS)); [ $left -ge 150 ] && OUT=$OUT/t3-fp8 TAG=s24-h200-fp8- STEPS=8 EXTRA="moe.expert_precision=fp8 train.global_batch_size=8" timeout $left bash bench/train_device.sh 16 2>&1 | grep -v "^name"; date -u
rm -rf runs
