export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
PYTHONPATH=/tmp/site:$PWD timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_loss.py 2>&1 | tail -2
PYTHONPATH=/tmp/site:$PWD OUT=$OUT timeout 150 python3 bench/bench_loss.py --sweep 2>&1 | grep -v Warn
for v in new base new base; do P=$PWD; [ $v = base ] && P=$PWD/.base
  mkdir -p $OUT/fb-$v; OUT=$OUT/fb-$v PYTHONPATH=/tmp/site:$P timeout 170 python3 bench/bench_model.py --mb 2 --systems megamoe-compile 2>&1 | grep "median" | head -1 | sed "s/^/$v fwd+bwd /"
done
