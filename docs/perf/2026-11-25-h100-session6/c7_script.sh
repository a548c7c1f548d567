export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
S="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 model.n_layers=8"
for knob in "" "max_pointwise_cat_inputs=1" "aggressive_fusion=True" ""; do
  timeout 150 python3 bench/bench_model.py --seq 1024 --mb 32 --systems megamoe-compile --set $S --inductor $knob 2>&1 | grep "median\|failed" | sed "s/^/small [$knob] /"
done
for knob in "" "max_pointwise_cat_inputs=1" "aggressive_fusion=True"; do
  timeout 170 python3 bench/bench_model.py --mb 2 --systems megamoe-compile --inductor $knob 2>&1 | grep "median\|failed" | sed "s/^/olmoe [$knob] /"
done
