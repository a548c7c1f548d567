export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py tests/test_experts.py 2>&1 | grep -E "FAILED|passed|failed"
for v in triton torch; do mkdir -p $OUT/p-$v
  if [ $v = torch ]; then export MEGAMOE_GROUPED_GEMM=torch; else unset MEGAMOE_GROUPED_GEMM; fi
  OUT=$OUT/p-$v timeout 200 python3 bench/bench_model.py --systems megamoe-compile --mb 2 --profile 2>&1 | grep "median" | head -1 | sed "s/^/$v /"
  head -22 $OUT/p-$v/profile_megamoe-compile.txt | cut -c1-150
done
unset MEGAMOE_GROUPED_GEMM
date -u
