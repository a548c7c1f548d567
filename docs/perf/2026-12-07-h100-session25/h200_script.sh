# session 25 (session 24's script), H200 (carry .whl .devdata; kind nvidia-h200, needs_h200): the FP8 CUDA tests (the fixed one), then the
# full OLMoE-1B-7B through the trainer (session 23's next_h200_command.sh), then FP8 with 4 micro-batches a step.
export PYTHONUNBUFFERED=1; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q tests/test_fp8_fused.py tests/test_grouped_gemm.py tests/test_experts.py tests/test_kernels.py -k "fp8 or cuda" 2>&1 | grep -E "^E |FAILED|passed|failed" | cut -c1-300 | head -8
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=12
OUT=$OUT/t3 TAG=s25-h200- timeout 370 bash bench/train_device.sh 16 2>&1 | grep -v "^name"; date -u
left=$((580 - SECONDS)); [ $left -ge 150 ] && OUT=$OUT/t3-fp8 TAG=s25-h200-fp8- STEPS=8 EXTRA="moe.expert_precision=fp8 train.global_batch_size=8" timeout $left bash bench/train_device.sh 16 2>&1 | grep -v "^name"; date -u
rm -rf runs
