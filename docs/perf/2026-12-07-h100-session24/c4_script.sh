# session 24, call 4 (carry .whl .devdata): the failing CUDA test's message; then the full trainer step with 8
# micro-batches a step (global batch 16 at micro-batch 2), 8 layers, compiled: bf16 and FP8 (session 23's c7 arms,
# on session 24's FP8 code). tokens/s per step, median after step 5.
export PYTHONUNBUFFERED=1; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 60 python3 -m pytest -q -x tests/test_fp8_fused.py tests/test_grouped_gemm.py -k "cuda" 2>&1 | grep -E "^E |FAILED|passed|failed" | cut -c1-300 | head -12
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD SKIP_LAYER_BENCH=1 COMPILE_ONLY=1 STEPS=10
for arm in bf16 fp8; do
  case $arm in bf16) X="";; fp8) X="moe.expert_precision=fp8";; esac
  OUT=$OUT/$arm TAG=s24c4-$arm- EXTRA="train.global_batch_size=16 $X" timeout 170 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; date -u
done
rm -rf runs
