export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p $OUT/a $OUT/b
OUT=$OUT/a timeout 260 python3 bench/bench_model.py --mb 2 --systems megamoe-compile,megamoe-compile-fp8 2>&1 | grep "median"
OUT=$OUT/b timeout 260 python3 bench/bench_model.py --mb 2 --systems megamoe-compile-fp8,megamoe-compile 2>&1 | grep "median"
date -u
