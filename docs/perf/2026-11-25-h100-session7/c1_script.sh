export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
PYTHONPATH=/tmp/site:$PWD timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_experts.py tests/test_kernels.py -k "not fused_swiglu_backward_kernel and not permutation_kernels_gather" 2>&1 | tail -3
S="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 model.n_layers=8"
for v in new base new base; do
  P=$PWD; [ $v = base ] && P=$PWD/.base
  mkdir -p $OUT/$v-olmoe; OUT=$OUT/$v-olmoe TORCH_LOGS=graph_breaks PYTHONPATH=/tmp/site:$P timeout 170 python3 bench/bench_model.py --mb 2 --systems megamoe-compile > $OUT/$v-olmoe/log 2>&1
  grep -c "Graph break" $OUT/$v-olmoe/log | sed "s/^/$v olmoe graph-break lines: /"
  tail -1 $OUT/$v-olmoe/bench_model.jsonl | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('$v olmoe', round(r['tok_s']), round(r['median_ms'],2), round(r['peak_gib'],1))" || tail -5 $OUT/$v-olmoe/log
done
for v in new base new; do
  P=$PWD; [ $v = base ] && P=$PWD/.base
  mkdir -p $OUT/$v-small; OUT=$OUT/$v-small PYTHONPATH=/tmp/site:$P timeout 120 python3 bench/bench_model.py --seq 1024 --mb 32 --systems megamoe-compile --set $S 2>&1 | grep "median" | sed "s/^/$v small /"
done
