export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py tests/test_experts.py -k "cuda or grouped_mm_is" 2>&1 | grep -E "Error|passed|failed" | tail -4
timeout 200 python3 bench/.s9c4.py 2>&1 | grep -v Warn
fb() { local v=$1 tag=$2; shift 2; mkdir -p $OUT/fb-$tag-$v
  export MEGAMOE_GROUPED_GEMM=$v
  OUT=$OUT/fb-$tag-$v timeout 170 python3 bench/bench_model.py --systems megamoe-compile "$@" > /tmp/fb-$tag-$v.log 2>&1; grep "median" /tmp/fb-$tag-$v.log | head -1 | sed "s/^/$tag $v /"; grep -E "Error" /tmp/fb-$tag-$v.log | tail -2
  unset MEGAMOE_GROUPED_GEMM; }
for v in triton torch triton torch triton torch; do fb $v olmoe --mb 2; done
SM="--seq 1024 --mb 32 --set model.n_layers=8 model.d_model=512 model.n_heads=8 moe.ffn_hidden=256"
for v in triton torch; do fb $v small $SM; done
date -u
