export PYTHONUNBUFFERED=1; ls /tmp/site >/dev/null 2>&1 || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
PYTHONPATH=/tmp/site:$PWD timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_experts.py -k grouped_mm_equals 2>&1 | grep -E "^E|assert" | head -20
for v in new base; do P=$PWD; [ $v = base ] && P=$PWD/.base
  mkdir -p $OUT/$v; OUT=$OUT/$v PYTHONPATH=/tmp/site:$P timeout 200 python3 bench/bench_model.py --mb 2 --systems megamoe-compile --profile > $OUT/$v/log 2>&1; grep median $OUT/$v/log | head -2
done; ls $OUT/*
