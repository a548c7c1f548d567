# session 23, call 3 (no carry): the FP8 experts' new path on the GPU: its CUDA tests, then bf16 against FP8
# (weights quantized every forward and backward) and FP8 with the weights quantized once (as the trainer does once a
# step when a step has several micro-batches), forward+backward, 16 layers, mb 2, back to back, one process.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 150 python3 -m pytest -q -x tests/test_experts.py -k "fp8" 2>&1 | tail -4; date -u
timeout 360 python3 bench/bench_model.py --mb 2 --back-to-back --systems megamoe-compile,megamoe-compile-fp8,megamoe-compile-fp8-cached > $OUT/fp8.log 2>&1; echo "bench rc $?"
grep -E "tok/s|quantized in|failed|Error" $OUT/fp8.log | tail -8; date -u
