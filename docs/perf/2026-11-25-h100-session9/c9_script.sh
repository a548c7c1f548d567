export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p $OUT/a $OUT/b
OUT=$OUT/a timeout 170 python3 bench/bench_model.py --mb 2 --systems megamoe-compile 2>&1 | grep "median"
BENCH_DEADLINE_S=300 OUT=$OUT/peers timeout 330 bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile > /dev/null 2>&1
python3 -c "import json; [print(r.get('peer'), r.get('status'), round(r.get('tokens_per_sec') or 0), r.get('median_ms'), r.get('peak_gib')) for r in map(json.loads, open('$OUT/peers/peers.jsonl'))]" 2>&1 | tail -3
OUT=$OUT/b timeout 170 python3 bench/bench_model.py --mb 2 --systems megamoe-compile 2>&1 | grep "median"
date -u
