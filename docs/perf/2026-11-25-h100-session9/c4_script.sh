export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py -k cuda 2>&1 | tail -1
timeout 200 python3 bench/.s9c4.py 2>&1 | grep -v Warn
fb() { local v=$1 tag=$2; shift 2; mkdir -p $OUT/fb-$tag-$v
  export MEGAMOE_GROUPED_GEMM=$v
  OUT=$OUT/fb-$tag-$v timeout 170 python3 bench/bench_model.py --systems megamoe-compile "$@" 2>&1 | grep "median" | head -1 | sed "s/^/$tag $v /"
  unset MEGAMOE_GROUPED_GEMM; }
for v in triton torch triton-ragged triton torch triton-ragged; do fb $v olmoe --mb 2; done
date -u
