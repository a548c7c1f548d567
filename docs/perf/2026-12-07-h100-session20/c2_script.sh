# session 20, call 2 (carry .whl .devdata): where the small MoE's forward+backward spends its time against its dense
# twin's (kernel tables of two profiled steps each), and the small MoE's full step against the dense twin's on
# this code (the gathering weight gradients at five stages), run twice; first the A/B of the row-grouped products'
# index loaded a tile ahead (grouped_gemm.ROWS_PREFETCH_INDEX) on the small MoE, whose products read rows in place.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
export PYTHONPATH=/tmp/site:$PWD
SM="model.d_model=512 model.n_heads=8 model.n_layers=8 moe.ffn_hidden=256"
mkdir -p $OUT/moe $OUT/dense
OUT=$OUT/moe timeout 100 python3 bench/bench_model.py --systems megamoe-compile --seq 1024 --mb 32 --iters 20 --back-to-back --profile --set $SM > $OUT/fb_moe.log 2>&1; echo "moe rc $?"; date -u
OUT=$OUT/dense timeout 100 python3 bench/bench_model.py --systems megamoe-compile --seq 1024 --mb 32 --iters 20 --back-to-back --profile --set $SM moe.num_experts=0 moe.ffn_hidden=2048 > $OUT/fb_dense.log 2>&1; echo "dense rc $?"; date -u
grep -E "tok/s|tokens/s" $OUT/fb_moe.log $OUT/fb_dense.log | head
head -30 $OUT/moe/profile_megamoe-compile.txt | cut -c1-150; head -22 $OUT/dense/profile_megamoe-compile.txt | cut -c1-150
mkdir -p $OUT/ab; (cd bench && PYTHONPATH=/tmp/site:$PWD/.. OUT=$OUT/ab timeout 100 python3 bench_ab.py megamoe.moe.grouped_gemm.ROWS_PREFETCH_INDEX=False,True --rounds 2 --back-to-back --seq 1024 --mb 32 --set $SM) > $OUT/ab_prefetch.log 2>&1; echo "ab rc $?"
grep -E "medians|Error|error" $OUT/ab_prefetch.log; date -u
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
for v in moe dense moe2; do [ $SECONDS -gt 400 ] && [ $v = moe2 ] && break; extra="$SMALL"; [ $v = dense ] && extra="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"
  TAG=s20c2-small-$v- EXTRA="$extra" COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=30 timeout 55 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; done; date -u
(cd $OUT && tar czf c2_logs.tgz s20c2-* && rm -f s20c2-*)
