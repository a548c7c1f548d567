export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py tests/test_experts.py -k "cuda or grouped_mm_is or fp8" 2>&1 | grep -E "FAILED|passed|failed" | tail -4
mkdir -p $OUT/fp8; OUT=$OUT/fp8 timeout 200 python3 bench/bench_model.py --mb 2 --systems megamoe-compile-fp8,megamoe-compile 2>&1 | grep "median"
date -u
