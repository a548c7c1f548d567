# session 27, call 2 (carry .whl .devdata): the loss curves of FP8 experts and of FP8 experts + FP8 attention
# projections against bf16 (small OLMoE, 300 steps, same data and seed: bench/fp8_curve.sh with ATTENTION=1),
# then the CUDA test of fp8_linear.
export PYTHONUNBUFFERED=1; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
OUT=$OUT/curve STEPS=300 ATTENTION=1 timeout 480 bash bench/fp8_curve.sh 2>&1 | grep -v "^name" | tail -45; date -u
timeout $((585 - SECONDS)) python3 -m pytest -q tests/test_fp8_linear.py 2>&1 | tail -3; date -u
rm -rf runs
