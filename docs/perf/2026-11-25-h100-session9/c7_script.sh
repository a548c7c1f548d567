export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
(cd bench && OUT=$OUT timeout 200 python3 bench_grouped_gemm.py --tma 2>&1 | grep -E "^  |^[a-z]+:" | grep -v "    (")
fb() { local v=$1 tag=$2; shift 2; mkdir -p $OUT/fb-$tag-$v
  export MEGAMOE_GROUPED_GEMM=$v
  OUT=$OUT/fb-$tag-$v timeout 170 python3 bench/bench_model.py --systems megamoe-compile "$@" > /tmp/fb-$tag-$v.log 2>&1; grep "median" /tmp/fb-$tag-$v.log | head -1 | sed "s/^/$tag $v /"; grep -E "Error" /tmp/fb-$tag-$v.log | tail -2
  unset MEGAMOE_GROUPED_GEMM; }
SM="--seq 1024 --mb 32 --set model.n_layers=8 model.d_model=512 model.n_heads=8 moe.ffn_hidden=256"
for v in torch triton torch triton; do fb $v small $SM; done
date -u
