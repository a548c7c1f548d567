export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/olmoe $OUT/small
OUT=$OUT/olmoe timeout 330 python3 bench/bench_model.py --mb 2 --systems megamoe-compile,megamoe-compile-cudagraphs --profile 2>&1 | grep "median\|failed"
for f in $OUT/olmoe/gaps_*.txt; do echo "== $f"; head -4 $f | cut -c1-250; grep -A26 "most launched" $f | cut -c1-120; done
S="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 model.n_layers=8"
OUT=$OUT/small timeout 200 python3 bench/bench_model.py --seq 1024 --mb 32 --systems megamoe-compile,megamoe-compile-cudagraphs --profile --set $S 2>&1 | grep "median\|failed"
for f in $OUT/small/gaps_*.txt; do echo "== $f"; head -4 $f | cut -c1-250; grep -A26 "most launched" $f | cut -c1-120; done
