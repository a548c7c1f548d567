# session 23, call 7 (carry .whl .devdata): the full trainer step with 8 micro-batches a step (global batch 16 at
# micro-batch 2), 8 layers, compiled: bf16, FP8 (the weights quantized once a step: the trainer's cache), and FP8
# with the cache patched off (quantized in every forward and backward). tokens/s per step, median after step 5.
export PYTHONUNBUFFERED=1; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD SKIP_LAYER_BENCH=1 COMPILE_ONLY=1 STEPS=10
for arm in bf16 fp8 fp8-per-call; do
  case $arm in
    bf16) X="" P="";;
    fp8) X="moe.expert_precision=fp8" P="";;
    fp8-per-call) X="moe.expert_precision=fp8" P="import megamoe.train.loop as L2; L2.cache_fp8_weights = lambda m: False";;
  esac
  OUT=$OUT/$arm TAG=s23c7-$arm- EXTRA="train.global_batch_size=16 $X" PATCH="$P" timeout 150 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; date -u
done
rm -rf runs
