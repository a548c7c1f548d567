# session 20, call 3 (carry .whl .devdata): whole-tile stores for the row-grouped products with short reductions
# (grouped_gemm.ROWS_WHOLE_TILE_MAX_K: 0 = halves everywhere, 512 = the small MoE's four products, 1024 = also
# OLMoE's second projection), forward+backward A/Bs (the small MoE's first), the small MoE's full step with them; OLMoE's A/B if time is left.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
export PYTHONPATH=/tmp/site:$PWD
SM="model.d_model=512 model.n_heads=8 model.n_layers=8 moe.ffn_hidden=256"
W=megamoe.moe.grouped_gemm.ROWS_WHOLE_TILE_MAX_K
mkdir -p $OUT/small $OUT/olmoe
(cd bench && PYTHONPATH=/tmp/site:$PWD/.. OUT=$OUT/small timeout 120 python3 bench_ab.py $W=0,512 --rounds 3 --back-to-back --seq 1024 --mb 32 --set $SM) > $OUT/ab_small.log 2>&1; echo "small rc $?"
grep -E "medians|Error|error" $OUT/ab_small.log; date -u
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
for v in 512; do
  TAG=s20c3-small-w$v- EXTRA="$SMALL" PATCH="import megamoe.moe.grouped_gemm as G; G.ROWS_WHOLE_TILE_MAX_K = $v" COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=30 timeout 55 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; done; date -u
[ $SECONDS -lt 200 ] && (cd bench && PYTHONPATH=/tmp/site:$PWD/.. OUT=$OUT/olmoe timeout 150 python3 bench_ab.py $W=0,1024 --rounds 2 --back-to-back) > $OUT/ab_olmoe.log 2>&1; echo "olmoe rc $?"
grep -E "medians|Error|error" $OUT/ab_olmoe.log; date -u
(cd $OUT && tar czf c3_logs.tgz s20c3-* 2>/dev/null; rm -f s20c3-*)
