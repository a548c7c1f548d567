# session 21, call 2 (carry .whl .devdata): target 3's figures on this code (they were of session 8-11 code): on an
# H100 the largest OLMoE geometry whose full step fits (11 layers; 12 failed at its first step in session 7 on the
# weights' and AdamW state's ~79 GiB alone), then the full OLMoE-1B-7B with the optimizer state in host memory; on an
# H200 the full OLMoE-1B-7B through the trainer; then FP8 experts against bf16 (forward+backward) if time is left.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
date -u; G=$(nvidia-smi --query-gpu=name --format=csv,noheader); nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
export PYTHONPATH=/tmp/site:$PWD
if echo "$G" | grep -q H200; then
  TAG=s21c2-h200- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=12 timeout 400 bash bench/train_device.sh 16 2>&1 | grep -v "^name"; date -u
else
  TAG=s21c2- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=12 timeout 200 bash bench/train_device.sh 11 2>&1 | grep -v "^name"; date -u
  left=$((585 - SECONDS)); echo "offload: $left s left"
  TAG=s21c2-offload- EXTRA="optim.offload=cpu train.global_batch_size=16" STEPS=8 COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 timeout $((left < 330 ? left : 330)) bash bench/train_device.sh 16 2>&1 | grep -v "^name"; date -u
fi
left=$((585 - SECONDS)); echo "fp8: $left s left"  # FP8's figure is of session 9's code too
[ $left -ge 100 ] && timeout $left python3 bench/bench_model.py --mb 2 --systems megamoe-compile,megamoe-compile-fp8 2>&1 | grep -E "tok|rror" | tail -4; date -u
(cd $OUT && tar czf c2_logs.tgz s21c2-* && rm -f s21c2-*)
