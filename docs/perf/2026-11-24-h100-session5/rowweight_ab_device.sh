export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
PYTHONPATH=/tmp/site:$PWD python3 -m pytest -q -p no:cacheprovider tests/test_experts.py 2>&1 | tail -1
S="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 model.n_layers=8"
for v in base new base new; do
  P=$PWD; [ $v = base ] && P=$PWD/.base
  OUT=/tmp/o-$v PYTHONPATH=/tmp/site:$P timeout 100 python3 bench/bench_model.py --seq 1024 --mb 32 --systems megamoe-compile --set $S 2>&1 | grep "median" | grep -v system | sed "s/^/$v small /"
done
for v in base new; do
  P=$PWD; [ $v = base ] && P=$PWD/.base
  OUT=/tmp/o-$v PYTHONPATH=/tmp/site:$P timeout 130 python3 bench/bench_model.py --mb 2 --systems megamoe-compile 2>&1 | grep "median" | grep -v system | sed "s/^/$v olmoe /"
done
cp /tmp/o-base/bench_model.jsonl $OUT/ab-base.jsonl; cp /tmp/o-new/bench_model.jsonl $OUT/ab-new.jsonl
PYTHONPATH=/tmp/site:$PWD TAG=rw- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=10 timeout 200 bash bench/train_device.sh "11" 2>&1 | tail -1
rm -f $OUT/*.log
