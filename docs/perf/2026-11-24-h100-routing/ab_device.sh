export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
S="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 model.n_layers=8"
for v in base new base new; do
  P=$PWD; [ $v = base ] && P=$PWD/.base
  mkdir -p $OUT/$v-small; OUT=$OUT/$v-small PYTHONPATH=/tmp/site:$P timeout 120 python3 bench/bench_model.py --seq 1024 --mb 32 --systems megamoe-compile --set $S 2>&1 | grep "median" | sed "s/^/$v small /"
done
for v in base new; do
  P=$PWD; [ $v = base ] && P=$PWD/.base
  mkdir -p $OUT/$v-olmoe; OUT=$OUT/$v-olmoe PYTHONPATH=/tmp/site:$P timeout 150 python3 bench/bench_model.py --mb 2 --systems megamoe-compile 2>&1 | grep "median" | sed "s/^/$v olmoe /"
done
mkdir -p $OUT/new-small-prof; OUT=$OUT/new-small-prof PYTHONPATH=/tmp/site:$PWD timeout 120 python3 bench/bench_model.py --seq 1024 --mb 32 --systems megamoe-compile --profile --set $S 2>&1 | grep "median"
